"""The zero-config user-mode forward: a host UDP port relayed to the guest's port 7000.

The guest sees a tiny virtual LAN with one gateway (slirp-like). Each client
(host address, port) is given a virtual source port on the gateway; the
guest's replies to that port go back to that client. The mapping is device
state: it travels in snapshots and checkpoints, so replies to requests in
flight still reach their clients after a restore or failover.
"""

from __future__ import annotations

import ipaddress
import socket
from collections import OrderedDict

from ..errors import KemariError
from . import netpkt

GATEWAY_MAC = b"\x52\x54\x00\x12\x35\x02"
FIRST_VPORT, LAST_VPORT = 32768, 60999
MAX_CLIENTS = 4096


class ForwardPort:
    """Frames for the guest, made from datagrams received on a host UDP socket."""

    def __init__(self, listen: tuple[str, int], guest_mac: bytes,
                 guest: ipaddress.IPv4Interface, guest_port: int = 7000) -> None:
        self.guest_mac, self.guest_port = guest_mac, guest_port
        self.guest_ip = guest.ip.packed
        gw = guest.network.network_address + 2
        if gw == guest.ip:
            gw = guest.network.network_address + 1
        self.gateway_ip = gw.packed
        family = socket.AF_INET6 if ":" in listen[0] else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind(listen)
        except OSError as exc:
            self.sock.close()
            raise KemariError(f"forward {listen[0]}:{listen[1]}: cannot bind: {exc.strerror}") \
                from exc
        self.sock.setblocking(False)
        self.clients: OrderedDict[tuple[str, int], int] = OrderedDict()
        self.by_vport: dict[int, tuple[str, int]] = {}
        self.next_vport = FIRST_VPORT
        self.ident = 0
        self.pending_frames: list[bytes] = []   # ARP replies owed to the guest
        self.version = 0                          # bumped whenever state() would change
        self.dropped = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    # Host -> guest ---------------------------------------------------------
    def recv(self) -> bytes | None:
        if self.pending_frames:
            return self.pending_frames.pop(0)
        while True:
            try:
                payload, client = self.sock.recvfrom(65535)
            except BlockingIOError:
                return None
            if 28 + len(payload) > 1500:
                self.dropped += 1   # would be IP fragments on a real link: dropped there too
                continue
            self.ident += 1
            return netpkt.udp_frame(self.guest_mac, GATEWAY_MAC, self.gateway_ip, self.guest_ip,
                                    self._vport(client[:2]), self.guest_port, payload, self.ident)

    def _vport(self, client: tuple[str, int]) -> int:
        vport = self.clients.get(client)
        if vport is not None:
            self.clients.move_to_end(client)
            return vport
        if len(self.clients) >= MAX_CLIENTS:
            _old, vport = self.clients.popitem(last=False)
            self.by_vport.pop(vport, None)
        else:
            vport = self.next_vport
            self.next_vport = FIRST_VPORT if vport == LAST_VPORT else vport + 1
        self.clients[client] = vport
        self.by_vport[vport] = client
        self.version += 1
        return vport

    # Guest -> host ---------------------------------------------------------
    def send(self, frame: bytes) -> None:
        pkt = netpkt.parse(frame)
        if isinstance(pkt, netpkt.ArpRequest):
            if pkt.target_ip == self.gateway_ip:
                reply = netpkt.arp(2, GATEWAY_MAC, self.gateway_ip, pkt.sender_mac,
                                   pkt.sender_ip)
                self.pending_frames.append(
                    netpkt.ethernet(pkt.sender_mac, GATEWAY_MAC, netpkt.ETH_P_ARP, reply))
            return
        if not isinstance(pkt, netpkt.Udp) or pkt.dst_ip != self.gateway_ip:
            return
        client = self.by_vport.get(pkt.dport)
        if client is None or pkt.sport != self.guest_port:
            self.dropped += 1
            return
        try:
            self.sock.sendto(pkt.payload, client)
        except OSError:
            self.dropped += 1   # the client went away: UDP drops

    def has_pending(self) -> bool:
        return bool(self.pending_frames)

    # Device state ------------------------------------------------------------
    def state(self) -> dict:
        """The client table (in vport order: the LRU order is not worth a checkpoint)."""
        return {"clients": sorted([[h, p, v] for (h, p), v in self.clients.items()],
                                  key=lambda c: c[2]),
                "next_vport": self.next_vport}

    def restore_state(self, state: dict) -> None:
        self.clients.clear()
        self.by_vport.clear()
        for host, port, vport in state.get("clients", []):
            self.clients[(host, port)] = vport
            self.by_vport[vport] = (host, port)
        self.next_vport = state.get("next_vport", FIRST_VPORT)
        self.version += 1

    def close(self) -> None:
        self.sock.close()
