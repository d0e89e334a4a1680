"""The frame decoder on its own: one link-layer frame in, one TCP segment out, or None and a counter saying why.

Frames are built with scapy (or by hand where a field must be wrong), so each test states exactly which
bytes the decoder sees. No other stage runs.
"""

from __future__ import annotations

import socket
import struct

import pytest
from scapy.compat import raw
from scapy.layers.inet import IP, TCP, UDP, IPOption_NOP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop
from scapy.layers.l2 import ARP, CookedLinux, CookedLinuxV2, Dot1AD, Dot1Q, Ether

from agent._core import CaptureFile
from agent._core import (
    DLT_EN10MB, DLT_LINUX_SLL, DLT_LINUX_SLL2, DLT_LOOP, DLT_NULL, TCP_ACK, TCP_FIN, TCP_SYN, FrameDecoder,
    flow_hash,
)
from conftest import CAPTURES

DLT_RAW = 101
CLIENT4, SERVER4 = "10.0.0.1", "10.0.0.2"
CLIENT6, SERVER6 = "2001:db8::1", "2001:db8::2"
PAYLOAD = b"GET /orders HTTP/1.1\r\nHost: api.example.com\r\n\r\n"
PSH = 0x08
MACS = {"src": "02:00:00:00:00:01", "dst": "02:00:00:00:00:02"}


def tcp(payload: bytes = PAYLOAD, flags: str = "PA", sport: int = 40000, dport: int = 8000) -> TCP:
    return TCP(sport=sport, dport=dport, seq=1000, ack=2000, flags=flags) / payload


def ipv4(payload: bytes = PAYLOAD, **fields) -> IP:
    return IP(src=CLIENT4, dst=SERVER4, **fields) / tcp(payload)


def ipv6(payload: bytes = PAYLOAD) -> IPv6:
    return IPv6(src=CLIENT6, dst=SERVER6) / tcp(payload)


def expected(version: int = 4, payload: bytes = PAYLOAD) -> tuple:
    family, client, server = (socket.AF_INET, CLIENT4, SERVER4) if version == 4 else (socket.AF_INET6, CLIENT6, SERVER6)
    return (socket.inet_pton(family, client), 40000, socket.inet_pton(family, server), 8000, 1000, 2000,
            TCP_ACK | PSH, payload)


# name: (linktype, frame, IP version)
LINK_FRAMES = {
    "ethernet": (DLT_EN10MB, raw(Ether(**MACS) / ipv4()), 4),
    "ethernet-ipv6": (DLT_EN10MB, raw(Ether(**MACS) / ipv6()), 6),
    "802.1q": (DLT_EN10MB, raw(Ether(**MACS) / Dot1Q(vlan=100) / ipv4()), 4),
    "qinq": (DLT_EN10MB, raw(Ether(**MACS) / Dot1AD(vlan=200) / Dot1Q(vlan=100) / ipv4()), 4),
    "qinq-ipv6": (DLT_EN10MB, raw(Ether(**MACS) / Dot1AD(vlan=200) / Dot1Q(vlan=100) / ipv6()), 6),
    "sll": (DLT_LINUX_SLL, raw(CookedLinux(pkttype=0, lladdrtype=1, lladdrlen=6, src=b"\x02\0\0\0\0\x01\0\0",
                                           proto=0x0800) / ipv4()), 4),
    "sll-ipv6": (DLT_LINUX_SLL, raw(CookedLinux(pkttype=4, lladdrtype=772, lladdrlen=6, src=b"\0" * 8,
                                                proto=0x86DD) / ipv6()), 6),
    "sll2": (DLT_LINUX_SLL2, raw(CookedLinuxV2(proto=0x0800, ifindex=2, lladdrtype=1, pkttype=0, lladdrlen=6,
                                               src=b"\x02\0\0\0\0\x01\0\0") / ipv4()), 4),
    "sll2-ipv6": (DLT_LINUX_SLL2, raw(CookedLinuxV2(proto=0x86DD, ifindex=1, lladdrtype=772, pkttype=0,
                                                    lladdrlen=6, src=b"\0" * 8) / ipv6()), 6),
    "raw-ipv4": (DLT_RAW, raw(ipv4()), 4),
    "raw-ipv6": (DLT_RAW, raw(ipv6()), 6),
    "null-ipv4": (DLT_NULL, struct.pack("=I", 2) + raw(ipv4()), 4),
    "null-ipv6-linux": (DLT_NULL, struct.pack("=I", 10) + raw(ipv6()), 6),
    "null-ipv6-bsd": (DLT_NULL, struct.pack("=I", 24) + raw(ipv6()), 6),
    "null-ipv6-macos": (DLT_NULL, struct.pack("=I", 30) + raw(ipv6()), 6),
    "loop-ipv4": (DLT_LOOP, struct.pack("!I", 2) + raw(ipv4()), 4),
    "loop-ipv6": (DLT_LOOP, struct.pack("!I", 28) + raw(ipv6()), 6),
    "ipv6-hop-by-hop": (DLT_EN10MB, raw(Ether(**MACS) / IPv6(src=CLIENT6, dst=SERVER6) / IPv6ExtHdrHopByHop()
                                        / tcp()), 6),
    "ipv6-two-extension-headers": (DLT_RAW, raw(IPv6(src=CLIENT6, dst=SERVER6) / IPv6ExtHdrHopByHop()
                                                / IPv6ExtHdrDestOpt() / tcp()), 6),
}


@pytest.mark.parametrize("name", LINK_FRAMES)
def test_every_supported_link_type_decodes_to_the_same_segment(name):
    linktype, frame, version = LINK_FRAMES[name]
    decoder = FrameDecoder()
    assert decoder.decode(linktype, frame) == expected(version)
    assert decoder.counters["corrupt"] == decoder.counters["not_tcp"] == decoder.counters["unsupported_link"] == 0


def test_null_link_written_on_a_big_endian_host_decodes():
    decoder = FrameDecoder()
    assert decoder.decode(DLT_NULL, struct.pack(">I", 2) + raw(ipv4())) == expected(4)
    assert decoder.decode(DLT_NULL, struct.pack(">I", 30) + raw(ipv6())) == expected(6)


def test_loop_link_written_in_host_byte_order_still_decodes():
    """DLT_LOOP is meant to be network order; some writers use little-endian anyway."""
    decoder = FrameDecoder()
    assert decoder.decode(DLT_LOOP, struct.pack("<I", 2) + raw(ipv4())) == expected(4)


@pytest.mark.parametrize("capture", ["crafted-link-vlan.pcap", "crafted-link-qinq.pcap", "crafted-link-sll.pcap",
                                     "crafted-link-sll2.pcap", "crafted-link-raw.pcap", "crafted-link-null.pcap",
                                     "crafted-link-ipv6.pcap"])
def test_frames_of_a_recorded_capture_all_decode_to_gateway_traffic(capture):
    """Real capture files, not just scapy's idea of each link type: every frame is TCP to or from port 8000."""
    reader = CaptureFile(str(CAPTURES / capture))
    decoder = FrameDecoder()
    try:
        frames = list(reader)
    finally:
        reader.close()
    segments = [decoder.decode(linktype, frame) for _, linktype, frame in frames]
    assert frames and all(segment is not None for segment in segments)
    assert all(8000 in (segment[1], segment[3]) for segment in segments)
    assert segments[0][6] & TCP_SYN, "a crafted capture begins with the handshake"
    assert any(b"HTTP/1.1" in segment[7] for segment in segments)
    assert decoder.counters["corrupt"] == 0


def test_ipv4_fragments_are_counted_and_skipped():
    decoder = FrameDecoder()
    first = raw(Ether(**MACS) / ipv4(flags="MF", frag=0))
    later = raw(Ether(**MACS) / ipv4(frag=8))
    assert decoder.decode(DLT_EN10MB, first) is None
    assert decoder.decode(DLT_EN10MB, later) is None
    assert decoder.counters["fragments"] == 2
    assert decoder.counters["corrupt"] == 0


def test_dont_fragment_flag_is_not_a_fragment():
    decoder = FrameDecoder()
    assert decoder.decode(DLT_EN10MB, raw(Ether(**MACS) / ipv4(flags="DF"))) == expected(4)
    assert decoder.counters["fragments"] == 0


def test_ipv6_fragment_header_is_counted_and_skipped():
    decoder = FrameDecoder()
    frame = raw(IPv6(src=CLIENT6, dst=SERVER6) / IPv6ExtHdrFragment(m=1, id=7) / tcp())
    assert decoder.decode(DLT_RAW, frame) is None
    assert decoder.counters["fragments"] == 1


def _set_byte(frame: bytes, index: int, value: int) -> bytes:
    return frame[:index] + bytes([value]) + frame[index + 1:]


ETHER_IPV4 = raw(Ether(**MACS) / ipv4())
IP_AT, TCP_AT = 14, 34  # offsets in ETHER_IPV4

CORRUPT_FRAMES = {
    "shorter-than-ethernet-header": (DLT_EN10MB, ETHER_IPV4[:10]),
    "ethernet-header-only": (DLT_EN10MB, ETHER_IPV4[:14]),
    "vlan-tag-cut": (DLT_EN10MB, raw(Ether(**MACS) / Dot1Q(vlan=1) / ipv4())[:15]),
    "ipv4-header-cut": (DLT_EN10MB, ETHER_IPV4[:IP_AT + 12]),
    "ipv4-total-length-beyond-frame": (DLT_EN10MB, ETHER_IPV4[:-10]),
    "ihl-below-5": (DLT_EN10MB, _set_byte(ETHER_IPV4, IP_AT, 0x44)),
    "ihl-beyond-total-length": (DLT_EN10MB, raw(Ether(**MACS) / IP(src=CLIENT4, dst=SERVER4, ihl=15, len=40)
                                                / TCP(dport=8000))),
    "ipv4-version-not-4": (DLT_EN10MB, _set_byte(ETHER_IPV4, IP_AT, 0x65)),
    "tcp-header-cut": (DLT_RAW, raw(IP(src=CLIENT4, dst=SERVER4, proto=6, len=30) / (b"\x1f\x40" * 5))),
    "tcp-offset-below-5": (DLT_EN10MB, _set_byte(ETHER_IPV4, TCP_AT + 12, 0x30)),
    "tcp-offset-beyond-segment": (DLT_EN10MB, raw(Ether(**MACS) / IP(src=CLIENT4, dst=SERVER4)
                                                  / TCP(dport=8000, dataofs=15))),
    "sll-cut": (DLT_LINUX_SLL, bytes(10)),
    "sll2-cut": (DLT_LINUX_SLL2, b"\x08"),
    "null-cut": (DLT_NULL, b"\x02\x00"),
    "raw-empty": (DLT_RAW, b""),
    "ipv6-payload-length-beyond-frame": (DLT_RAW, raw(ipv6())[:-5]),
    "ipv6-header-cut": (DLT_RAW, raw(ipv6())[:30]),
    "ipv6-extension-header-cut": (DLT_RAW, raw(IPv6(src=CLIENT6, dst=SERVER6, nh=0, plen=1)) + b"\x06"),
    "ipv6-extension-runs-past-end": (DLT_RAW, raw(IPv6(src=CLIENT6, dst=SERVER6, nh=0, plen=8)) + b"\x06\x05"
                                     + bytes(6)),
}


@pytest.mark.parametrize("name", CORRUPT_FRAMES)
def test_corrupt_frames_are_counted_never_raised(name):
    linktype, frame = CORRUPT_FRAMES[name]
    decoder = FrameDecoder()
    assert decoder.decode(linktype, frame) is None
    assert decoder.counters["corrupt"] == 1
    assert decoder.counters["fragments"] == decoder.counters["not_tcp"] == 0


def test_every_truncation_of_a_frame_is_counted_never_raised():
    """A snap length can cut a frame anywhere; whatever is left is either decoded or counted."""
    decoder = FrameDecoder()
    for linktype, frame in ((DLT_EN10MB, ETHER_IPV4), (DLT_RAW, raw(ipv6())),
                            (DLT_LINUX_SLL2, LINK_FRAMES["sll2"][1])):
        for length in range(len(frame)):
            assert decoder.decode(linktype, frame[:length]) is None
    assert decoder.counters["corrupt"] == len(ETHER_IPV4) + len(raw(ipv6())) + len(LINK_FRAMES["sll2"][1])


def test_other_protocols_and_link_types_are_counted_apart_from_corruption():
    decoder = FrameDecoder()
    assert decoder.decode(DLT_EN10MB, raw(Ether(**MACS) / IP(src=CLIENT4, dst=SERVER4) / UDP(dport=53))) is None
    assert decoder.decode(DLT_EN10MB, raw(Ether(**MACS) / ARP())) is None
    assert decoder.counters["not_tcp"] == 2
    assert decoder.decode(105, ETHER_IPV4) is None  # 802.11
    assert decoder.counters["unsupported_link"] == 1
    assert decoder.counters["corrupt"] == 0


PADDED_LINKS = {
    "ethernet": (DLT_EN10MB, lambda packet: Ether(**MACS) / packet, 60),
    "ethernet-ip-options": (DLT_EN10MB, lambda packet: Ether(**MACS) / packet, 64),
    "802.1q": (DLT_EN10MB, lambda packet: Ether(**MACS) / Dot1Q(vlan=100) / packet, 64),
    "sll": (DLT_LINUX_SLL, lambda packet: CookedLinux(pkttype=0, lladdrtype=1, lladdrlen=6, proto=0x0800) / packet, 62),
}


@pytest.mark.parametrize("link", PADDED_LINKS)
@pytest.mark.parametrize("payload", [b"", b"hi", b"GET"])
def test_ethernet_padding_is_not_taken_as_payload(link, payload):
    """Frames under 60 bytes are padded on the wire; the IP total length says where the segment ends."""
    linktype, wrap, padded_length = PADDED_LINKS[link]
    options = {"options": [IPOption_NOP()] * 4} if link == "ethernet-ip-options" else {}
    frame = raw(wrap(ipv4(payload, **options)))
    padded = frame + b"\xaa" * (padded_length - len(frame))
    assert len(padded) > len(frame)
    segment = FrameDecoder().decode(linktype, padded)
    assert segment is not None
    assert segment[7] == payload


def test_zero_ip_total_length_of_an_offloaded_super_frame_trusts_the_frame():
    frame = raw(Ether(**MACS) / ipv4(b"x" * 3000, len=0))
    segment = FrameDecoder().decode(DLT_EN10MB, frame)
    assert segment is not None and segment[7] == b"x" * 3000


def test_flags_are_reported():
    decoder = FrameDecoder()
    syn = decoder.decode(DLT_RAW, raw(IP(src=CLIENT4, dst=SERVER4) / TCP(dport=8000, flags="S")))
    fin = decoder.decode(DLT_RAW, raw(IP(src=CLIENT4, dst=SERVER4) / TCP(dport=8000, flags="FA")))
    assert syn is not None and syn[6] == TCP_SYN
    assert fin is not None and fin[6] == TCP_FIN | TCP_ACK


def _both_directions(link: str) -> tuple[int, bytes, bytes]:
    forward_ip = IP(src=CLIENT4, dst=SERVER4) / TCP(sport=40000, dport=8000, flags="PA") / PAYLOAD
    reverse_ip = IP(src=SERVER4, dst=CLIENT4) / TCP(sport=8000, dport=40000, flags="PA") / b"HTTP/1.1 200 OK\r\n"
    forward_ip6 = IPv6(src=CLIENT6, dst=SERVER6) / TCP(sport=40000, dport=8000, flags="PA") / PAYLOAD
    reverse_ip6 = IPv6(src=SERVER6, dst=CLIENT6) / TCP(sport=8000, dport=40000, flags="A")
    if link == "ethernet":
        return DLT_EN10MB, raw(Ether(**MACS) / forward_ip), raw(Ether(**MACS) / reverse_ip)
    if link == "vlan-ipv6":
        return (DLT_EN10MB, raw(Ether(**MACS) / Dot1Q(vlan=3) / forward_ip6),
                raw(Ether(**MACS) / Dot1Q(vlan=3) / reverse_ip6))
    return (DLT_LINUX_SLL2, raw(CookedLinuxV2(proto=0x0800) / forward_ip),
            raw(CookedLinuxV2(proto=0x0800) / reverse_ip))


@pytest.mark.parametrize("link", ["ethernet", "vlan-ipv6", "sll2"])
def test_flow_hash_is_the_same_for_both_directions_of_a_connection(link):
    linktype, forward, reverse = _both_directions(link)
    assert flow_hash(linktype, forward) == flow_hash(linktype, reverse) != -1


def test_flow_hash_tells_connections_apart_and_is_minus_one_for_non_tcp():
    one = raw(Ether(**MACS) / IP(src=CLIENT4, dst=SERVER4) / tcp(sport=40000))
    other = raw(Ether(**MACS) / IP(src=CLIENT4, dst=SERVER4) / tcp(sport=40001))
    assert flow_hash(DLT_EN10MB, one) != flow_hash(DLT_EN10MB, other)
    assert flow_hash(DLT_EN10MB, raw(Ether(**MACS) / IP() / UDP())) == -1
    assert flow_hash(DLT_EN10MB, one[:20]) == -1
    assert flow_hash(DLT_EN10MB, one[:25]) == -1
