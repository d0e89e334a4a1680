"""The classic BPF program the kernel runs on every packet before it reaches the ring.

Only TCP segments to or from the gateway's ports get through, so the agent never spends a cycle on the
host's other traffic. Two more cuts halve the packet rate on a busy loopback:

- On loopback the kernel shows every packet twice: once leaving (PACKET_OUTGOING), once arriving. The
  outgoing copy is dropped there. On any other interface the outgoing packets are the gateway's responses
  and are kept.
- Pure ACKs (no payload, no SYN/FIN/RST) carry nothing to meter: reassembly reads acknowledgements from
  the data segments, which always carry one. Payload length is the IP length minus both header lengths; a
  zero IP length (what segmentation offload leaves in a super-frame) wraps around and is kept.

Not matched, by design: IPv6 packets with extension headers before TCP, IPv4 non-first fragments (they
hold no ports; with `--workers N` the fanout's DEFRAG flag reassembles IPv4 before this program runs, and
a lone socket's first fragments reach the core, which counts them), frames with an in-band VLAN tag
(capture on the VLAN interface instead). Every accepted packet is kept whole.
"""

from __future__ import annotations

import ctypes
import socket
import struct
from collections.abc import Iterable

# Instruction classes, sizes, modes and operations, as in linux/filter.h and linux/bpf_common.h.
BPF_LD, BPF_LDX, BPF_ST, BPF_ALU, BPF_JMP, BPF_RET, BPF_MISC = 0x00, 0x01, 0x02, 0x04, 0x05, 0x06, 0x07
BPF_W, BPF_H, BPF_B = 0x00, 0x08, 0x10
BPF_ABS, BPF_IND, BPF_MEM, BPF_MSH = 0x20, 0x40, 0x60, 0xA0
BPF_SUB, BPF_AND, BPF_RSH = 0x10, 0x50, 0x70
BPF_JA, BPF_JEQ, BPF_JSET = 0x00, 0x10, 0x40
BPF_K, BPF_X = 0x00, 0x08
BPF_TAX = 0x00

SKF_AD_OFF = 0xFFFFF000  # -0x1000: loads from here read packet metadata instead of packet bytes
SKF_AD_PROTOCOL = 0      # skb->protocol: the ethertype, whatever the link header
SKF_AD_PKTTYPE = 4       # PACKET_HOST, PACKET_OUTGOING, ...
PACKET_OUTGOING = 4

SO_ATTACH_FILTER = 26
ACCEPT_WHOLE = 0xFFFFFFFF  # the snap length a filter returns: no cut

ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
IPPROTO_TCP = 6
TCP_FIN_SYN_RST = 0x07
MAX_PORTS = 32  # conditional jumps reach 255 instructions: four port lists and the rest must fit


class Assembler:
    """Classic BPF with symbolic jump targets; `program()` resolves them to the relative offsets BPF uses."""

    def __init__(self) -> None:
        self._code: list[tuple[int, str | int, str | int, str | int]] = []
        self._labels: dict[str, int] = {}

    def label(self, name: str) -> None:
        self._labels[name] = len(self._code)

    def op(self, code: int, k: int = 0, jt: str | int = 0, jf: str | int = 0) -> None:
        """An instruction; `jt`/`jf` of a conditional jump are labels or 0 (the next instruction)."""
        self._code.append((code, jt, jf, k & 0xFFFFFFFF))

    def jump(self, target: str) -> None:
        self._code.append((BPF_JMP | BPF_JA, 0, 0, target))

    def program(self) -> list[tuple[int, int, int, int]]:
        resolved = []
        for index, (code, jt, jf, k) in enumerate(self._code):
            k = self._offset(index, k, 0xFFFF) if isinstance(k, str) else k
            resolved.append((code, self._offset(index, jt, 255), self._offset(index, jf, 255), k))
        return resolved

    def _offset(self, index: int, target: str | int, limit: int) -> int:
        if isinstance(target, int):
            return target
        offset = self._labels[target] - index - 1
        if not 0 <= offset <= limit:
            raise ValueError(f"jump to {target} out of range ({offset})")
        return offset


def capture_filter(ports: Iterable[int], link_header: int, drop_outgoing: bool) -> list[tuple[int, int, int, int]]:
    """The program: `link_header` is 14 for Ethernet and loopback, 0 for raw-IP (tun) interfaces."""
    ports = sorted(set(ports))
    if not 0 < len(ports) <= MAX_PORTS:
        raise ValueError(f"between 1 and {MAX_PORTS} ports")
    link = link_header
    a = Assembler()
    if drop_outgoing:
        a.op(BPF_LD | BPF_W | BPF_ABS, SKF_AD_OFF + SKF_AD_PKTTYPE)
        a.op(BPF_JMP | BPF_JEQ | BPF_K, PACKET_OUTGOING, "drop", 0)
    a.op(BPF_LD | BPF_W | BPF_ABS, SKF_AD_OFF + SKF_AD_PROTOCOL)
    a.op(BPF_JMP | BPF_JEQ | BPF_K, ETH_P_IP, "ipv4", 0)
    a.op(BPF_JMP | BPF_JEQ | BPF_K, ETH_P_IPV6, "ipv6", "drop")

    a.label("ipv4")
    a.op(BPF_LD | BPF_B | BPF_ABS, link + 9)                   # protocol
    a.op(BPF_JMP | BPF_JEQ | BPF_K, IPPROTO_TCP, 0, "drop")
    a.op(BPF_LD | BPF_H | BPF_ABS, link + 6)                   # flags and fragment offset
    a.op(BPF_JMP | BPF_JSET | BPF_K, 0x1FFF, "drop", 0)        # a non-first fragment: no TCP header
    a.op(BPF_LDX | BPF_B | BPF_MSH, link)                      # X = IP header length
    _match_ports(a, ports, BPF_IND, link, "ipv4_port")
    a.label("ipv4_port")
    a.op(BPF_LD | BPF_B | BPF_IND, link + 13)                  # TCP flags
    a.op(BPF_JMP | BPF_JSET | BPF_K, TCP_FIN_SYN_RST, "accept", 0)
    a.op(BPF_LD | BPF_B | BPF_IND, link + 12)                  # data offset, in the high nibble
    a.op(BPF_ALU | BPF_RSH | BPF_K, 2)
    a.op(BPF_ALU | BPF_AND | BPF_K, 0x3C)                      # TCP header length
    a.op(BPF_ST, 0)                                            # M[0] = TCP header length
    a.op(BPF_LD | BPF_H | BPF_ABS, link + 2)                   # IP total length
    a.op(BPF_ALU | BPF_SUB | BPF_X)                            # - IP header length
    a.op(BPF_LDX | BPF_W | BPF_MEM, 0)
    a.op(BPF_ALU | BPF_SUB | BPF_X)                            # - TCP header length = payload length
    a.op(BPF_JMP | BPF_JEQ | BPF_K, 0, "drop", "accept")

    a.label("ipv6")
    a.op(BPF_LD | BPF_B | BPF_ABS, link + 6)                   # next header: TCP right after the fixed header
    a.op(BPF_JMP | BPF_JEQ | BPF_K, IPPROTO_TCP, 0, "drop")
    _match_ports(a, ports, BPF_ABS, link + 40, "ipv6_port")
    a.label("ipv6_port")
    a.op(BPF_LD | BPF_B | BPF_ABS, link + 53)                  # TCP flags
    a.op(BPF_JMP | BPF_JSET | BPF_K, TCP_FIN_SYN_RST, "accept", 0)
    a.op(BPF_LD | BPF_B | BPF_ABS, link + 52)
    a.op(BPF_ALU | BPF_RSH | BPF_K, 2)
    a.op(BPF_ALU | BPF_AND | BPF_K, 0x3C)
    a.op(BPF_MISC | BPF_TAX)                                   # X = TCP header length
    a.op(BPF_LD | BPF_H | BPF_ABS, link + 4)                   # IPv6 payload length
    a.op(BPF_ALU | BPF_SUB | BPF_X)                            # = TCP payload length
    a.op(BPF_JMP | BPF_JEQ | BPF_K, 0, "drop", 0)

    a.label("accept")
    a.op(BPF_RET | BPF_K, ACCEPT_WHOLE)
    a.label("drop")
    a.op(BPF_RET | BPF_K, 0)
    return a.program()


def _match_ports(a: Assembler, ports: list[int], mode: int, tcp_offset: int, matched: str) -> None:
    """Jump to `matched` if the source or destination port is one of `ports`, else to "drop"."""
    for field in (0, 2):  # source port, destination port
        a.op(BPF_LD | BPF_H | mode, tcp_offset + field)
        for port in ports:
            a.op(BPF_JMP | BPF_JEQ | BPF_K, port, matched, 0)
    a.jump("drop")


# Takes nothing: what sockets that will share a fanout group hold until the last has joined (see ring_store.py)
REJECT_ALL = [(BPF_RET | BPF_K, 0, 0, 0)]


def attach(sock: socket.socket, program: list[tuple[int, int, int, int]]) -> None:
    """SO_ATTACH_FILTER: the kernel copies the program, so the buffer only has to live through the call."""
    code = b"".join(struct.pack("=HBBI", *instruction) for instruction in program)
    buffer = ctypes.create_string_buffer(code, len(code))
    fprog = struct.pack("@HP", len(program), ctypes.addressof(buffer))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
