"""The kernel filter, judged by the kernel itself: the program is attached to a packet socket on loopback
and real packets are sent past it.

Crafted frames are sent on `lo` through a packet socket with a foreign destination MAC, so the kernel
shows each one to packet sockets twice (leaving, then arriving as PACKET_OTHERHOST) but the IP stack
ignores them. Real connections check the same on traffic the kernel's own TCP makes. Needs root.
"""

from __future__ import annotations

import fcntl
import os
import select
import socket
import struct
import subprocess
import threading
import time
from typing import NamedTuple

import pytest
from scapy.compat import raw
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrHopByHop
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Padding

from agent.live.startup_checks import interface_link
from agent._core import DLT_EN10MB, TCP_FIN, TCP_RST, TCP_SYN, FrameDecoder
from agent.source.kernel_filter import MAX_PORTS, attach, capture_filter
from agent.source.packet_ring import PacketRing

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="needs root: packet sockets")]

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
MACS = {"src": "02:00:00:00:00:02", "dst": "02:00:00:00:00:01"}  # not lo's: the IP stack drops them
PORT, OTHER_PORT = 47911, 47912
BODY = b"GET /orders HTTP/1.1\r\nHost: gateway\r\n\r\n"
TIMESTAMPS = [("Timestamp", (1, 2)), ("NOP", None), ("NOP", None)]


class Seg(NamedTuple):
    src: bytes
    sport: int
    dst: bytes
    dport: int
    seq: int
    ack: int
    flags: int
    payload: bytes


def v4(tcp_layer, **ip_fields) -> Ether:
    return Ether(**MACS) / IP(src="127.0.0.9", dst="127.0.0.8", **ip_fields) / tcp_layer


def v6(tcp_layer) -> Ether:
    return Ether(**MACS) / IPv6(src="::1", dst="::1") / tcp_layer


def seg(flags: str = "PA", payload: bytes = BODY, sport: int = 51000, dport: int = PORT, options=()) -> TCP:
    layer = TCP(sport=sport, dport=dport, seq=1, ack=1, flags=flags, options=list(options))
    return layer / payload if payload else layer


# name: (frame, kept by the filter)
CASES = {
    "v4 request to the port": (v4(seg()), True),
    "v4 response from the port": (v4(seg(sport=PORT, dport=51000)), True),
    "v4 pure ack": (v4(seg("A", b"")), False),
    "v4 pure ack, tcp options": (v4(seg("A", b"", options=TIMESTAMPS)), False),
    "v4 one byte, tcp options": (v4(seg("A", b"x", options=TIMESTAMPS)), True),
    "v4 pure ack, ip options": (v4(seg("A", b""), options=[b"\x01\x01\x01\x00"]), False),
    "v4 data, ip options": (v4(seg(), options=[b"\x01\x01\x01\x00"]), True),
    "v4 pure ack, ethernet padding": (v4(seg("A", b"")) / Padding(b"\0" * 20), False),
    "v4 syn": (v4(seg("S", b"")), True),
    "v4 syn-ack": (v4(seg("SA", b"", sport=PORT, dport=51000)), True),
    "v4 fin": (v4(seg("FA", b"")), True),
    "v4 rst": (v4(seg("R", b"")), True),
    "v4 rst-ack": (v4(seg("RA", b"", sport=PORT, dport=51000)), True),
    "v4 zero total length (offload)": (v4(seg(), len=0), True),
    "v4 first fragment": (v4(seg(), flags="MF"), True),
    # its first bytes look like ports: only the fragment offset tells it holds no TCP header
    "v4 later fragment": (Ether(**MACS) / IP(src="127.0.0.9", dst="127.0.0.8", proto=6, frag=100)
                          / (struct.pack("!HH", 51000, PORT) + b"x" * 40), False),
    "v4 other port": (v4(seg(dport=OTHER_PORT)), False),
    "v4 udp to the port": (Ether(**MACS) / IP(src="127.0.0.9", dst="127.0.0.8") / UDP(sport=51000, dport=PORT) / BODY,
                           False),
    "v6 request to the port": (v6(seg()), True),
    "v6 response from the port": (v6(seg(sport=PORT, dport=51000)), True),
    "v6 pure ack": (v6(seg("A", b"")), False),
    "v6 pure ack, tcp options": (v6(seg("A", b"", options=TIMESTAMPS)), False),
    "v6 syn": (v6(seg("S", b"")), True),
    "v6 fin": (v6(seg("FA", b"")), True),
    "v6 rst": (v6(seg("R", b"")), True),
    "v6 other port": (v6(seg(dport=OTHER_PORT)), False),
    "v6 extension header before tcp": (Ether(**MACS) / IPv6(src="::1", dst="::1") / IPv6ExtHdrHopByHop() / seg(),
                                       False),
    "arp": (Ether(src=MACS["src"], dst="ff:ff:ff:ff:ff:ff") / ARP(), False),
}


def capture_socket(program: list) -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    attach(sock, program)
    sock.bind(("lo", ETH_P_ALL))
    sock.setblocking(False)
    return sock


def receive_all(sock: socket.socket, quiet: float = 0.3, limit: float = 5.0) -> list[tuple[bytes, int]]:
    """(frame, packet type) until nothing has arrived for `quiet` seconds."""
    received = []
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and select.select([sock], [], [], quiet)[0]:
        while True:
            try:
                frame, address = sock.recvfrom(1 << 17)
            except BlockingIOError:
                break
            received.append((frame, address[2]))
    return received


def send_crafted(frames: list[bytes]) -> None:
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as sender:
        sender.bind(("lo", 0))
        for frame in frames:
            sender.send(frame)


@pytest.mark.parametrize("loopback", [True, False], ids=["loopback program", "other-interface program"])
def test_only_tcp_of_the_port_with_payload_or_syn_fin_rst_is_kept(loopback: bool) -> None:
    frames = {name: raw(frame) for name, (frame, _) in CASES.items()}
    sock = capture_socket(capture_filter([PORT], 14, drop_outgoing=loopback))
    try:
        send_crafted(list(frames.values()))
        received = receive_all(sock)
    finally:
        sock.close()
    for name, (_, kept) in CASES.items():
        copies = [kind for frame, kind in received if frame == frames[name]]
        if not kept:
            assert copies == [], name
        elif loopback:  # the leaving copy is dropped: each packet once
            assert copies == [socket.PACKET_OTHERHOST], name
        else:  # elsewhere the leaving packets are the gateway's responses: both copies kept
            assert sorted(copies) == sorted([socket.PACKET_OTHERHOST, PACKET_OUTGOING]), name


def test_the_interface_type_chooses_whether_outgoing_packets_are_dropped() -> None:
    assert interface_link("lo").loopback
    others = [name for name in os.listdir("/sys/class/net")
              if name != "lo" and open(f"/sys/class/net/{name}/type").read().strip() == "1"]
    if not others:
        pytest.skip("no Ethernet interface on this host")
    link = interface_link(others[0])
    assert not link.loopback and link.linktype == DLT_EN10MB and link.header_length == 14


@pytest.mark.parametrize("family, host", [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")])
def test_real_connection_every_byte_syn_fin_and_rst_arrive_once_without_pure_acks(family: int, host: str) -> None:
    decoder = FrameDecoder()
    with socket.socket(family, socket.SOCK_STREAM) as server:
        server.bind((host, 0))
        server.listen()
        port = server.getsockname()[1]
        sock = capture_socket(capture_filter([port], 14, drop_outgoing=True))
        try:
            sent_up, sent_down = _converse(server, family, host, port)
            received = receive_all(sock)
        finally:
            sock.close()
    segments = [Seg(*segment) for segment in (decoder.decode(DLT_EN10MB, frame) for frame, _ in received)
                if segment is not None]
    segments = [s for s in segments if port in (s.sport, s.dport)]
    upstream = b"".join(s.payload for s in segments if s.dport == port and s.sport == sent_up[0])
    downstream = b"".join(s.payload for s in segments if s.sport == port and s.dport == sent_up[0])
    assert upstream == sent_up[1]  # each byte once: no outgoing duplicate, nothing lost
    assert downstream == sent_down
    flags = [s.flags for s in segments]
    assert sum(1 for f in flags if f & TCP_SYN) == 2  # SYN, SYN-ACK
    assert any(f & TCP_FIN for f in flags)            # the server's FIN
    assert any(f & TCP_RST for f in flags)            # the client's abortive close
    assert all(s.payload or s.flags & (TCP_SYN | TCP_FIN | TCP_RST) for s in segments)  # no pure ACK


def _converse(server: socket.socket, family: int, host: str, port: int) -> tuple[tuple[int, bytes], bytes]:
    """Three requests and answers; the server closes its side, the client resets. Returns what each sent."""
    answers = [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" * (n + 1) for n in range(3)]
    requests = [BODY, BODY + b"x" * 3000, BODY * 2]

    def serve() -> None:
        connection, _ = server.accept()
        with connection:
            for request, answer in zip(requests, answers):
                received = b""
                while len(received) < len(request):
                    received += connection.recv(65536)
                connection.sendall(answer)
            connection.shutdown(socket.SHUT_WR)
            try:
                connection.recv(1)
            except ConnectionResetError:
                pass  # the client's RST, as meant

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    with socket.socket(family, socket.SOCK_STREAM) as client:
        client.settimeout(5)
        client.connect((host, port))
        client_port = client.getsockname()[1]
        for request, answer in zip(requests, answers):
            client.sendall(request)
            received = b""
            while len(received) < len(answer):
                received += client.recv(65536)
        assert client.recv(1) == b""  # the server's FIN
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")  # close with RST
    thread.join(5)
    return (client_port, b"".join(requests)), b"".join(answers)


def test_port_lists_up_to_the_limit_assemble_and_more_are_refused() -> None:
    program = capture_filter(range(40000, 40000 + MAX_PORTS), 14, drop_outgoing=True)
    sock = capture_socket(program)  # the kernel's verifier accepts it
    sock.close()
    with pytest.raises(ValueError):
        capture_filter(range(40000, 40001 + MAX_PORTS), 14, drop_outgoing=True)


TUNSETIFF, IFF_TUN, IFF_NO_PI = 0x400454CA, 0x0001, 0x1000


def test_raw_ip_interface_tun_same_rules_without_link_header() -> None:
    """A tun device has no link header (the filter's offsets start at IP) and no loopback copies."""
    tun = os.open("/dev/net/tun", os.O_RDWR)
    try:
        name = fcntl.ioctl(tun, TUNSETIFF, struct.pack("16sH", b"agenttest%d", IFF_TUN | IFF_NO_PI))
        interface = name[:16].rstrip(b"\0").decode()
        subprocess.run(["ip", "link", "set", interface, "up"], check=True)
        link = interface_link(interface)
        assert (link.linktype, link.header_length, link.loopback) == (101, 0, False)
        ring = PacketRing(interface, link.linktype, capture_filter([PORT], link.header_length, link.loopback), 4 << 20)
        try:
            packets = {  # to an address beyond the tun device: the host does not answer them
                "v4 data": (IP(src="10.213.0.2", dst="10.213.0.9") / seg(), True),
                "v4 pure ack": (IP(src="10.213.0.2", dst="10.213.0.9") / seg("A", b""), False),
                "v4 other port": (IP(src="10.213.0.2", dst="10.213.0.9") / seg(dport=OTHER_PORT), False),
                "v6 data": (IPv6(src="fd00::2", dst="fd00::9") / seg(sport=PORT, dport=51000), True),
                "v6 fin": (IPv6(src="fd00::2", dst="fd00::9") / seg("FA", b""), True),
            }
            for packet, _ in packets.values():
                os.write(tun, raw(packet))
            frames = [frame for block in iter(lambda: _next_block_within(ring, 1.0), None) for _, _, frame in block]
        finally:
            ring.close()
    finally:
        os.close(tun)
    for name, (packet, kept) in packets.items():
        assert frames.count(raw(packet)) == (1 if kept else 0), name


def _next_block_within(ring: PacketRing, seconds: float) -> list | None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        block = ring.next_block()
        if block is not None:
            return block
        ring.wait(50)
    return None
