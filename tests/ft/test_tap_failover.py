"""Failover on a real bridged network: the new primary takes up the guest's TAP
only when promoted and announces the guest's MAC/IP with a gratuitous ARP."""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest
from ftlab import FtLab

from kemari_agent.kvclient import KvClient

pytestmark = pytest.mark.kvm

MAC = "52:54:00:aa:bb:51"


def listen_for_garp(lab_net, seen: list, stop: threading.Event) -> None:
    """Raw socket in the client namespace: record ARP announcements for the guest."""
    with lab_net.in_client():
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
    s.settimeout(0.1)
    guest = socket.inet_aton(lab_net.guest_ip)
    while not stop.is_set():
        try:
            frame = s.recv(128)
        except TimeoutError:
            continue
        op, sha, spa, _tha, tpa = struct.unpack_from("!6xH6s4s6s4s", frame, 14)
        if spa == guest and tpa == guest:
            seen.append((op, sha.hex(":"), time.monotonic()))
    s.close()


def test_promoted_node_takes_the_tap_and_announces_the_guest(tmp_path, netlab):
    net = f"""[net]
tap = "{netlab.tap}"
bridge = "{netlab.bridge}"
address = "{netlab.guest_ip}/24"
mac = "{MAC}"
"""
    lab = FtLab(tmp_path, net=net, netns=netlab.host_ns)
    addr = (netlab.guest_ip, 7000)
    seen: list = []
    stop = threading.Event()
    listener = threading.Thread(target=listen_for_garp, args=(netlab, seen, stop))
    try:
        lab.secondary.start("secondary")
        links = netlab.exec_host("ip", "-o", "link").stdout
        assert netlab.tap not in links                   # a secondary holds no identity
        lab.primary.start("primary")
        lab.wait_synced()
        with netlab.in_client(), KvClient(addr) as c:
            assert c.put("where", "before").kind == "OK"
            counted = [c.incr("n").value for _ in range(10)]
        assert counted[-1] == "10"
        listener.start()
        lab.primary.kill()
        killed = time.monotonic()
        lab.secondary.kemari("promote", lab.name)
        fdb = netlab.exec_host("bridge", "fdb", "show", "br", netlab.bridge).stdout
        assert f"{MAC} dev {netlab.tap}" in fdb             # learned from the announcement
        with netlab.in_client(), KvClient(addr) as c:
            assert c.get("where").value == "before"
            assert c.incr("n").value == "11"
        ping = netlab.exec_client("ping", "-c", "2", "-W", "2", netlab.guest_ip, check=False)
        assert ping.returncode == 0, ping.stdout
        time.sleep(0.2)
        announced = [s for s in seen if s[2] > killed and s[1] == MAC]
        assert announced, f"no gratuitous ARP for {netlab.guest_ip} from {MAC}: {seen}"
    finally:
        stop.set()
        if listener.is_alive():
            listener.join()
        lab.close()
