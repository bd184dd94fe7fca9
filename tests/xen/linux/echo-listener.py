#!/usr/bin/env python3
"""Log each ICMP echo request dom0 receives for one address (netgate-test.sh).

Usage: echo-listener.py ADDRESS OUT
Prints "start <epoch seconds>" on stdout once its socket is open, then
appends one line per echo request to ADDRESS to OUT, flushed line by line:
    <seconds since start> <source> <ICMP id> <ICMP sequence>
The time is the kernel's receive time (SO_TIMESTAMPNS), not the moment this
process got to the packet: under TCG it can be seconds behind.

A raw ICMP socket gets a copy of every ICMP packet delivered locally, before
ICMP counts it in InEchos, and whether dom0 answers it or not
(icmp_echo_ignore_all): so the test can say which ping came twice where
InEchos only gives a total.  Runs until killed.
"""

from __future__ import annotations

import socket
import struct
import sys
import time

SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
SOL_RAW = 255
ICMP_FILTER = 1  # a mask of the ICMP types the socket does not get
ECHO_REQUEST = 8
RCVBUF = 16 << 20  # ~4000 of netback's skbs: the test's 32 senders never fill it


def main() -> None:
    addr, out = sys.argv[1], sys.argv[2]
    want = socket.inet_aton(addr)
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    try:  # as root, past net.core.rmem_max
        s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
    except OSError:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
    s.setsockopt(SOL_RAW, ICMP_FILTER, struct.pack("I", ~(1 << ECHO_REQUEST) & 0xFFFFFFFF))
    s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    start = time.time()
    with open(out, "a", buffering=1) as f:  # line-buffered: one write per packet
        print(f"start {start:.6f}", flush=True)
        while True:
            data, anc, _, _ = s.recvmsg(65535, 256)
            ihl = (data[0] & 0x0F) * 4
            if data[16:20] != want or len(data) < ihl + 8:
                continue
            icmp_type, _, _, ident, seq = struct.unpack("!BBHHH", data[ihl : ihl + 8])
            if icmp_type != ECHO_REQUEST:
                continue
            t = time.time()
            for level, kind, value in anc:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(value) >= 16:
                    sec, nsec = struct.unpack("qq", value[:16])
                    t = sec + nsec / 1e9
            f.write(f"{t - start:.6f} {socket.inet_ntoa(data[12:16])} {ident} {seq}\n")


if __name__ == "__main__":
    main()
