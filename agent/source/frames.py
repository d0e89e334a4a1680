"""Frame decoding: link layer -> IPv4/IPv6 -> TCP, by hand with struct.

This is the per-packet hot path, so it unpacks only the fields the pipeline needs instead of building
dpkt objects for every layer. Anything it cannot make sense of is counted, never raised.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from struct import Struct
from struct import error as struct_error
from struct import unpack_from

DLT_NULL = 0
DLT_EN10MB = 1
DLT_RAW_ALIASES = (12, 14, 101)
DLT_LOOP = 108
DLT_LINUX_SLL = 113
DLT_IPV4 = 228
DLT_IPV6 = 229
DLT_LINUX_SLL2 = 276
SUPPORTED_LINK_TYPES = frozenset({DLT_NULL, DLT_EN10MB, *DLT_RAW_ALIASES, DLT_LOOP, DLT_LINUX_SLL, DLT_IPV4,
                                  DLT_IPV6, DLT_LINUX_SLL2})
SUPPORTED_LINKS = "Ethernet, Linux SLL/SLL2, raw IP, BSD loopback"  # for users: the names they know them by

ETH_IPV4 = 0x0800
ETH_IPV6 = 0x86DD
ETH_VLAN_TAGS = (0x8100, 0x88A8, 0x9100)
BSD_AF_INET6 = (10, 24, 28, 30)
NATIVE_ORDER = "<" if sys.byteorder == "little" else ">"  # AF_INET6 differs between Linux, NetBSD, FreeBSD and macOS

IPPROTO_TCP = 6
IPV6_EXTENSION_HEADERS = (0, 43, 60, 51)  # hop-by-hop, routing, destination options, AH
IPV6_FRAGMENT = 44

TCP_FIN = 0x01
TCP_SYN = 0x02
TCP_RST = 0x04
TCP_ACK = 0x10


# (src, sport, dst, dport, seq, ack, flags, payload): a plain tuple, made for every packet.
Segment = tuple[bytes, int, bytes, int, int, int, int, bytes]


@dataclass
class DecodeCounters:
    corrupt: int = 0       # truncated or inconsistent headers
    fragments: int = 0     # IP fragments: not reassembled (a gateway's loopback traffic has none)
    not_tcp: int = 0       # other protocols and link types we do not meter
    unsupported_link: int = 0


_ETHERNET_IPV4_TCP = Struct("!H2xHxB2x4s4sHHIIH").unpack_from


def flow_hash(linktype: int, frame: bytes) -> int:
    """The same number for both directions of a connection (-1 for a frame that is not TCP over IP), so
    that workers can share the traffic by connection. Cheap for the common Ethernet + IPv4 frame."""
    try:
        if linktype == DLT_EN10MB and frame[12:14] == b"\x08\x00" and frame[23] == IPPROTO_TCP:
            sport, dport = unpack_from("!HH", frame, 14 + (frame[14] & 0x0F) * 4)
            return _mix(sport ^ dport)
    except (IndexError, struct_error):
        return -1
    segment = _HASHING_DECODER.decode(linktype, frame)
    return _mix(segment[1] ^ segment[3]) if segment is not None else -1


def _mix(ports: int) -> int:
    """Spread the bits: Linux hands out even client ports, so the ports' low bits alone would not."""
    return (ports * 0x9E3779B1 & 0xFFFFFFFF) >> 16


class FrameDecoder:
    """Turns `(linktype, frame)` into a `Segment`, or None after counting why not."""

    def __init__(self) -> None:
        self.counters = DecodeCounters()

    def decode(self, linktype: int, frame: bytes) -> Segment | None:
        if linktype == DLT_EN10MB and frame[12:15] == b"\x08\x00\x45" and len(frame) >= 54:
            # the common frame (Ethernet, IPv4 without options, TCP) in one unpack
            total_length, fragment, protocol, src, dst, sport, dport, seq, ack, offset_flags = _ETHERNET_IPV4_TCP(
                frame, 16)
            end = 14 + total_length
            header_end = 34 + (offset_flags >> 12) * 4
            if protocol == IPPROTO_TCP and not fragment & 0x3FFF and 54 <= header_end <= end <= len(frame):
                return src, sport, dst, dport, seq, ack, offset_flags & 0x3F, frame[header_end:end]
        network = self._network_layer(linktype, frame)
        if network is None:
            return None
        ethertype, offset = network
        if ethertype == ETH_IPV4:
            return self._ipv4(frame, offset)
        if ethertype == ETH_IPV6:
            return self._ipv6(frame, offset)
        self.counters.not_tcp += 1
        return None

    def _network_layer(self, linktype: int, frame: bytes) -> tuple[int, int] | None:
        """(ethertype, offset of the IP header), or None (counted)."""
        try:
            if linktype == DLT_EN10MB:
                ethertype, offset = unpack_from("!H", frame, 12)[0], 14
                while ethertype in ETH_VLAN_TAGS:
                    ethertype, offset = unpack_from("!H", frame, offset + 2)[0], offset + 4
                return ethertype, offset
            if linktype == DLT_LINUX_SLL:
                return unpack_from("!H", frame, 14)[0], 16
            if linktype == DLT_LINUX_SLL2:
                return unpack_from("!H", frame, 0)[0], 20
            if linktype in (DLT_NULL, DLT_LOOP):
                order = ">" if linktype == DLT_LOOP else NATIVE_ORDER  # as specified; some writers differ
                family = unpack_from(order + "I", frame, 0)[0]
                if family != 2 and family not in BSD_AF_INET6:
                    family = unpack_from(("<" if order == ">" else ">") + "I", frame, 0)[0]
                return (ETH_IPV4 if family == 2 else ETH_IPV6 if family in BSD_AF_INET6 else 0), 4
            if linktype in DLT_RAW_ALIASES or linktype in (DLT_IPV4, DLT_IPV6):
                version = frame[0] >> 4
                return (ETH_IPV4 if version == 4 else ETH_IPV6 if version == 6 else 0), 0
        except (struct_error, IndexError):  # a frame shorter than its link header
            self.counters.corrupt += 1
            return None
        self.counters.unsupported_link += 1
        return None

    def _ipv4(self, frame: bytes, offset: int) -> Segment | None:
        try:
            version_ihl, total_length, fragment, protocol = (
                frame[offset], *unpack_from("!H2xHxB", frame, offset + 2)
            )
        except (struct_error, IndexError):
            self.counters.corrupt += 1
            return None
        header_length = (version_ihl & 0x0F) * 4
        if version_ihl >> 4 != 4 or header_length < 20:
            self.counters.corrupt += 1
            return None
        if protocol != IPPROTO_TCP:
            self.counters.not_tcp += 1
            return None
        if fragment & 0x3FFF:  # more-fragments flag or a non-zero offset
            self.counters.fragments += 1
            return None
        # A zero total length is what segmentation offload leaves in a super-frame: trust the frame then.
        end = offset + total_length if total_length else len(frame)
        if end > len(frame) or total_length and total_length < header_length:
            self.counters.corrupt += 1
            return None
        src = frame[offset + 12 : offset + 16]
        dst = frame[offset + 16 : offset + 20]
        return self._tcp(frame, offset + header_length, end, src, dst)

    def _ipv6(self, frame: bytes, offset: int) -> Segment | None:
        try:
            payload_length, next_header = unpack_from("!HB", frame, offset + 4)
        except struct_error:
            self.counters.corrupt += 1
            return None
        if frame[offset] >> 4 != 6:
            self.counters.corrupt += 1
            return None
        src = frame[offset + 8 : offset + 24]
        dst = frame[offset + 24 : offset + 40]
        end = offset + 40 + payload_length if payload_length else len(frame)  # 0: jumbogram / offload
        if end > len(frame):
            self.counters.corrupt += 1
            return None
        position = offset + 40
        while next_header in IPV6_EXTENSION_HEADERS:
            if position + 2 > end:
                self.counters.corrupt += 1
                return None
            length = (frame[position + 1] + 2) * 4 if next_header == 51 else (frame[position + 1] + 1) * 8
            next_header, position = frame[position], position + length
        if next_header == IPV6_FRAGMENT:
            self.counters.fragments += 1
            return None
        if next_header != IPPROTO_TCP:
            self.counters.not_tcp += 1
            return None
        return self._tcp(frame, position, end, src, dst)

    def _tcp(self, frame: bytes, offset: int, end: int, src: bytes, dst: bytes) -> Segment | None:
        if offset + 20 > end:
            self.counters.corrupt += 1
            return None
        sport, dport, seq, ack, offset_flags = unpack_from("!HHIIH", frame, offset)
        header_length = (offset_flags >> 12) * 4
        if header_length < 20 or offset + header_length > end:
            self.counters.corrupt += 1
            return None
        return src, sport, dst, dport, seq, ack, offset_flags & 0x3F, frame[offset + header_length : end]


_HASHING_DECODER = FrameDecoder()  # its counters are not reported: the pipeline's own decoder counts
