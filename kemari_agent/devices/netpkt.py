"""Just enough Ethernet/ARP/IPv4/UDP to relay datagrams and announce a guest.

The guest has its own full stack; the host side only needs to wrap and
unwrap UDP for the user-mode forward and to build gratuitous ARP frames.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
BROADCAST = b"\xff" * 6
IPPROTO_UDP = 17


def inet_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ethernet(dst: bytes, src: bytes, ethertype: int, payload: bytes) -> bytes:
    return dst + src + struct.pack("!H", ethertype) + payload


def arp(op: int, sha: bytes, spa: bytes, tha: bytes, tpa: bytes) -> bytes:
    return struct.pack("!HHBBH6s4s6s4s", 1, ETH_P_IP, 6, 4, op, sha, spa, tha, tpa)


def gratuitous_arp(mac: bytes, ip: bytes) -> bytes:
    """An ARP announcement: switches and neighbours learn mac -> ip from it."""
    return ethernet(BROADCAST, mac, ETH_P_ARP, arp(1, mac, ip, b"\0" * 6, ip))


def udp_frame(dst_mac: bytes, src_mac: bytes, src_ip: bytes, dst_ip: bytes,
              sport: int, dport: int, payload: bytes, ident: int = 0) -> bytes:
    udp_len = 8 + len(payload)
    pseudo = src_ip + dst_ip + struct.pack("!BBH", 0, IPPROTO_UDP, udp_len)
    udp = struct.pack("!HHHH", sport, dport, udp_len, 0) + payload
    csum = inet_checksum(pseudo + udp) or 0xFFFF
    udp = udp[:6] + struct.pack("!H", csum) + udp[8:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + udp_len, ident & 0xFFFF, 0x4000, 64,
                     IPPROTO_UDP, 0, src_ip, dst_ip)
    ip = ip[:10] + struct.pack("!H", inet_checksum(ip)) + ip[12:]
    return ethernet(dst_mac, src_mac, ETH_P_IP, ip + udp)


@dataclass(frozen=True)
class Udp:
    src_mac: bytes
    src_ip: bytes
    dst_ip: bytes
    sport: int
    dport: int
    payload: bytes


@dataclass(frozen=True)
class ArpRequest:
    sender_mac: bytes
    sender_ip: bytes
    target_ip: bytes


def parse(frame: bytes) -> Udp | ArpRequest | None:
    """The UDP datagram or ARP request in a frame; None for anything else."""
    if len(frame) < 14:
        return None
    (ethertype,) = struct.unpack_from("!H", frame, 12)
    if ethertype == ETH_P_ARP and len(frame) >= 42:
        _h, _p, _hl, _pl, op, sha, spa, _tha, tpa = struct.unpack_from("!HHBBH6s4s6s4s", frame, 14)
        return ArpRequest(sha, spa, tpa) if op == 1 else None
    if ethertype != ETH_P_IP or len(frame) < 34:
        return None
    vihl, _tos, total, _id, frag, _ttl, proto = struct.unpack_from("!BBHHHBB", frame, 14)
    ihl = (vihl & 0xF) * 4
    if vihl >> 4 != 4 or ihl < 20 or proto != IPPROTO_UDP or frag & 0x3FFF:
        return None
    if total > len(frame) - 14 or total < ihl + 8:
        return None
    src, dst = frame[26:30], frame[30:34]
    u = 14 + ihl
    sport, dport, ulen = struct.unpack_from("!HHH", frame, u)
    if ulen < 8 or u + ulen > 14 + total:
        return None
    return Udp(frame[6:12], src, dst, sport, dport, bytes(frame[u + 8 : u + ulen]))
