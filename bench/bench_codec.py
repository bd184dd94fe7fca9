"""Replication stream cost, from the pure-Python codec up to TLS on loopback.

* codec: one checkpoint of N dirty pages (+ a vCPU and a device blob) built by
  the Primary, decoded, checked and applied by the Secondary into an
  ImageSink, its ACK consumed by the Primary: all in one process, no I/O.
* tls: the same round trip with the secondary in another process behind a
  real TLS 1.3 loopback connection: checkpoint() -> send -> ACK -> Acked.
* bulk: a full sync of a guest's memory over TLS loopback (GiB/s), next to
  the raw byte rate on the same connection type; with the primary's bytes
  in frames (the default) and in TLS records (KEMARI_FRAMES=0).
* deltas: checkpoints of pages from a hot set, 8 bytes changed in each, sent
  whole and as deltas (PAGES_XOR, BLOB_XOR): both sides' cost in-process, and
  the bytes on the wire.
* crc: the stream's checksum (CRC-32, both nodes compute it over every
  byte), zlib's and zlib-ng's implementation side by side, over a 1-page
  checkpoint's bytes, a 32-page one's, and a full-sync batch.

Run: python -m bench.bench_codec [--quick]
"""

from __future__ import annotations

import multiprocessing
import os
import random
import sys
import tempfile
import time
from pathlib import Path

from bench.common import percentile, report
from kemari_agent.ft import heap
from kemari_agent.replication import keys, transport
from kemari_agent.replication.codec import PAGE_SIZE, Device, Vcpu
from kemari_agent.replication.events import Acked, SyncComplete
from kemari_agent.replication.image import ImageSink
from kemari_agent.replication.primary import Primary
from kemari_agent.replication.secondary import Secondary

SIZES = (1, 8, 32, 256)
GUEST = 64 << 20
BULK_GUEST = 512 << 20
VCPU_BLOB = os.urandom(3 * 1024)  # about what a KVM vCPU's full state takes
DEVICE_BLOB = os.urandom(256)


def _records() -> list:
    return [Vcpu(0, 1, VCPU_BLOB), Device(1, 1, DEVICE_BLOB), Device(2, 1, DEVICE_BLOB)]


def _pair(memory_size: int, delta_cache_pages: int = 0
          ) -> tuple[Primary, Secondary, bytearray]:
    mem = bytearray(os.urandom(memory_size))
    sec = Secondary(ImageSink(memory_size), name="bench", memory_size=memory_size,
                    generation=0, checkpoint_seq=0, has_checkpoint=False, now=0.0)
    prim = Primary(name="bench", memory_size=memory_size, generation=1, checkpoint_seq=0,
                   now=0.0, delta_cache_pages=delta_cache_pages)
    prim.receive_data(sec.data_to_send(), 0.0)
    prim.end_sync_round(0, now=0.0)
    prim.checkpoint(mem, range(memory_size // PAGE_SIZE), now=0.0)
    sec.receive_data(prim.data_to_send(), 0.0)
    prim.receive_data(sec.data_to_send(), 0.0)
    return prim, sec, mem


def bench_codec(iters: int) -> dict[int, dict[str, float]]:
    prim, sec, mem = _pair(GUEST)
    npages = GUEST // PAGE_SIZE
    rng = random.Random(1)
    out = {}
    for size in SIZES:
        enc, dec, total = [], [], []
        n = iters if size <= 32 else iters // 4
        for i in range(n + 50):
            pfns = sorted(rng.sample(range(npages), size))
            t0 = time.perf_counter()
            prim.checkpoint(mem, pfns, _records(), now=t0)
            data = prim.data_to_send()
            t1 = time.perf_counter()
            sec.receive_data(data, t1)
            ack = sec.data_to_send()
            t2 = time.perf_counter()
            events = prim.receive_data(ack, t2)
            t3 = time.perf_counter()
            assert isinstance(events[0], Acked)
            if i >= 50:
                enc.append(t1 - t0)
                dec.append(t2 - t1)
                total.append(t3 - t0)
        out[size] = {"encode_p50_us": percentile(enc, 50) * 1e6,
                     "apply_p50_us": percentile(dec, 50) * 1e6,
                     "round_trip_p50_us": percentile(total, 50) * 1e6,
                     "round_trip_p99_us": percentile(total, 99) * 1e6}
    assert bytes(sec.sink.memory) == bytes(mem)  # type: ignore[attr-defined]
    return out


def bench_deltas(iters: int) -> dict[str, dict[int, dict[str, float]]]:
    """Checkpoints of pages from a hot set of 1,024, each with 8 bytes changed
    (and a vCPU blob with 8 bytes changed), whole and as deltas: in-process cost
    of both sides and bytes on the wire."""
    out: dict[str, dict[int, dict[str, float]]] = {}
    for name, cache in (("whole", 0), ("deltas", 4096)):
        prim, sec, mem = _pair(GUEST, cache)
        rng = random.Random(2)
        vcpu = bytearray(VCPU_BLOB)
        out[name] = {}
        for size in SIZES:
            enc, dec, nbytes = [], [], []
            n = iters if size <= 32 else iters // 4
            for i in range(n + 50):
                pfns = sorted(rng.sample(range(1024), size))
                for pfn in pfns:
                    offset = pfn * PAGE_SIZE + rng.randrange(0, PAGE_SIZE, 8)
                    mem[offset:offset + 8] = rng.randbytes(8)
                offset = rng.randrange(0, len(vcpu) - 8, 8)
                vcpu[offset:offset + 8] = rng.randbytes(8)
                t0 = time.perf_counter()
                prim.checkpoint(mem, pfns, [Vcpu(0, 2, bytes(vcpu))], now=t0)
                data = prim.data_to_send()
                t1 = time.perf_counter()
                sec.receive_data(data, t1)
                t2 = time.perf_counter()
                prim.receive_data(sec.data_to_send(), t2)
                if i >= 50:
                    enc.append(t1 - t0)
                    dec.append(t2 - t1)
                    nbytes.append(len(data))
            out[name][size] = {"encode_p50_us": percentile(enc, 50) * 1e6,
                               "apply_p50_us": percentile(dec, 50) * 1e6,
                               "bytes": percentile(nbytes, 50)}
        assert bytes(sec.sink.memory) == bytes(mem)  # type: ignore[attr-defined]
    return out


def _secondary_server(key: str, port_queue: multiprocessing.Queue, memory_size: int) -> None:
    """Child process: accept one primary and run the Secondary until it leaves."""
    listener = transport.listen(key)
    port_queue.put(listener.address[1])
    sink = ImageSink(memory_size)
    with listener, listener.accept(timeout=30) as ch:
        cpu0 = time.process_time()
        sec = Secondary(sink, name="bench", memory_size=memory_size,
                        generation=0, checkpoint_seq=0, has_checkpoint=False,
                        now=time.monotonic())
        ch.send_all(sec.data_to_send())
        while data := ch.recv_some():
            sec.receive_data(data, time.monotonic())
            if out := sec.data_to_send():
                ch.send_all(out)
        port_queue.put(time.process_time() - cpu0)


def _raw_sink(key: str, port_queue: multiprocessing.Queue, total: int) -> None:
    """Child process: read and drop `total` bytes, then answer with one byte."""
    listener = transport.listen(key)
    port_queue.put(listener.address[1])
    with listener, listener.accept(timeout=30) as ch:
        while total > 0:
            total -= len(ch.recv_some())
        ch.send_all(b"A")


def _pingpong(key: str, port_queue: multiprocessing.Queue, size: int) -> None:
    """Child process: for every `size` bytes received, answer 16 bytes (no codec)."""
    listener = transport.listen(key)
    port_queue.put(listener.address[1])
    with listener, listener.accept(timeout=30) as ch:
        got = 0
        while data := ch.recv_some():
            got += len(data)
            while got >= size:
                got -= size
                ch.send_all(bytes(16))


def bench_tls_floor(key: str, size: int, iters: int) -> float:
    """p50 of sending `size` bytes and getting 16 back over the same TLS setup."""
    proc, port, _ = _spawn(_pingpong, key, size)
    rtts = []
    try:
        payload = os.urandom(size)
        with transport.connect(key, "127.0.0.1", port) as ch:
            for i in range(iters + 100):
                t0 = time.perf_counter()
                ch.send_all(payload)
                got = 0
                while got < 16:
                    got += len(ch.recv_some())
                if i >= 100:
                    rtts.append(time.perf_counter() - t0)
    finally:
        proc.join(timeout=30)
    return percentile(rtts, 50) * 1e6


def _spawn(target: object, key: str, arg: int
           ) -> tuple[multiprocessing.Process, int, multiprocessing.Queue]:
    # spawn, not fork: a forked child would share (and copy-on-write) our heap.
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=target, args=(key, q, arg))
    proc.start()
    return proc, q.get(timeout=60), q


def _wait(prim: Primary, ch: transport.Channel, kind: type) -> object:
    while True:
        for event in prim.receive_data(ch.recv_some(), time.monotonic()):
            if isinstance(event, kind):
                return event


def bench_tls(key: str, iters: int) -> tuple[dict[int, dict[str, float]], dict[str, float]]:
    proc, port, _ = _spawn(_secondary_server, key, GUEST)
    out: dict[int, dict[str, float]] = {}
    bulk: dict[str, float] = {}
    try:
        with transport.connect(key, "127.0.0.1", port) as ch:
            mem = bytearray(os.urandom(GUEST))
            prim = Primary(name="bench", memory_size=GUEST, generation=1, checkpoint_seq=0,
                           now=time.monotonic())
            prim.receive_data(ch.recv_some(), time.monotonic())
            for start in range(0, GUEST // PAGE_SIZE, 4096):
                prim.sync_pages(mem, range(start, start + 4096), now=time.monotonic(),
                                detect_zero=False)
                ch.send_all(prim.data_to_send())
            prim.end_sync_round(0, now=time.monotonic())
            prim.checkpoint(mem, [], _records(), now=time.monotonic())
            ch.send_all(prim.data_to_send())
            _wait(prim, ch, SyncComplete)
            rng = random.Random(2)
            npages = GUEST // PAGE_SIZE
            for size in SIZES:
                rtts = []
                n = iters if size <= 32 else iters // 4
                for i in range(n + 100):
                    pfns = sorted(rng.sample(range(npages), size))
                    t0 = time.perf_counter()
                    prim.checkpoint(mem, pfns, _records(), now=t0)
                    ch.send_all(prim.data_to_send())
                    _wait(prim, ch, Acked)
                    if i >= 100:
                        rtts.append(time.perf_counter() - t0)
                out[size] = {"p50_us": percentile(rtts, 50) * 1e6,
                             "p99_us": percentile(rtts, 99) * 1e6}
    finally:
        proc.join(timeout=30)
    return out, bulk


def bench_bulk(key: str, memory_size: int) -> dict[str, float]:
    """Full sync of `memory_size` bytes of random memory over TLS loopback.

    Also reports CPU seconds per GiB on each side: on a shared machine the
    wall-clock rate depends on the neighbours, the CPU cost does not."""
    mem = bytearray(os.urandom(memory_size))
    proc, port, results = _spawn(_secondary_server, key, memory_size)
    try:
        with transport.connect(key, "127.0.0.1", port) as ch:
            prim = Primary(name="bench", memory_size=memory_size, generation=1,
                           checkpoint_seq=0, now=time.monotonic())
            prim.receive_data(ch.recv_some(), time.monotonic())
            t0 = time.perf_counter()
            cpu0 = time.process_time()
            for start in range(0, memory_size // PAGE_SIZE, 4096):
                prim.sync_pages(mem, range(start, start + 4096), now=time.monotonic(),
                                detect_zero=False)
                ch.send_all(prim.data_to_send())
            prim.end_sync_round(0, now=time.monotonic())
            prim.checkpoint(mem, [], _records(), now=time.monotonic())
            ch.send_all(prim.data_to_send())
            _wait(prim, ch, SyncComplete)
            elapsed = time.perf_counter() - t0
            primary_cpu = time.process_time() - cpu0
    finally:
        proc.join(timeout=60)
    secondary_cpu = results.get(timeout=10)
    gib = memory_size / (1 << 30)
    sync = gib / elapsed

    block = os.urandom(16 << 20)
    rounds = max(1, memory_size // len(block))
    proc, port, _ = _spawn(_raw_sink, key, rounds * len(block))
    try:
        with transport.connect(key, "127.0.0.1", port) as ch:
            t0 = time.perf_counter()
            for _ in range(rounds):
                ch.send_all(block)
            assert ch.recv_some() == b"A"
            raw = memory_size / (time.perf_counter() - t0) / (1 << 30)
    finally:
        proc.join(timeout=60)
    return {"full_sync_gib_s": sync, "raw_tls_gib_s": raw,
            "primary_cpu_s_per_gib": primary_cpu / gib,
            "secondary_cpu_s_per_gib": secondary_cpu / gib}


CRC_SIZES = {"1-page checkpoint (33 KiB)": 33 << 10, "32-page checkpoint (160 KiB)": 160 << 10,
             "full-sync batch (2 MiB)": 2 << 20}


def bench_crc(iters: int) -> dict[str, dict[str, float]]:
    """Median us per call of each implementation (the same value: checked)."""
    import zlib

    from zlib_ng import zlib_ng

    out = {}
    for label, size in CRC_SIZES.items():
        data = os.urandom(size)
        assert zlib.crc32(data, 7) == zlib_ng.crc32(data, 7)
        out[label] = {}
        for name, fn in (("zlib", zlib.crc32), ("zlib-ng", zlib_ng.crc32)):
            times = []
            for _ in range(iters):
                t0 = time.perf_counter_ns()
                fn(data)
                times.append(time.perf_counter_ns() - t0)
            out[label][name] = percentile(times, 50) / 1e3
    return out


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    quick = "--quick" in argv
    heap.keep_large_buffers()        # as both daemons do: a fair price for large buffers
    iters = 300 if quick else 2000
    with tempfile.TemporaryDirectory() as tmp:
        key = str(Path(tmp) / "bench.key")
        keys.keygen(key)
        codec = bench_codec(iters)
        deltas = bench_deltas(iters)
        tls, _ = bench_tls(key, iters)
        floor = bench_tls_floor(key, 32 * PAGE_SIZE + 4096, iters)
        bulk = {}
        for name, switch in (("frames", "1"), ("TLS records", "0")):
            os.environ["KEMARI_FRAMES"] = switch         # both ends, children included
            bulk[name] = bench_bulk(key, (64 << 20) if quick else BULK_GUEST)
        del os.environ["KEMARI_FRAMES"]
    crc = bench_crc(iters // 4)
    rows: list[tuple[str, object, str]] = []
    for size in SIZES:
        c = codec[size]
        rows += [(f"codec {size:>3} pages encode p50", c["encode_p50_us"], "us"),
                 (f"codec {size:>3} pages decode+apply p50", c["apply_p50_us"], "us"),
                 (f"codec {size:>3} pages round trip p50", c["round_trip_p50_us"], "us"),
                 (f"codec {size:>3} pages round trip p99", c["round_trip_p99_us"], "us")]
    for size in SIZES:
        w, d = deltas["whole"][size], deltas["deltas"][size]
        rows += [(f"hot {size:>3} pages, whole / deltas: encode p50",
                  f"{w['encode_p50_us']:.1f} / {d['encode_p50_us']:.1f}", "us"),
                 (f"hot {size:>3} pages, whole / deltas: decode+apply p50",
                  f"{w['apply_p50_us']:.1f} / {d['apply_p50_us']:.1f}", "us"),
                 (f"hot {size:>3} pages, whole / deltas: bytes",
                  f"{w['bytes']:.0f} / {d['bytes']:.0f}", "B")]
    for size in SIZES:
        rows += [(f"tls {size:>3} pages checkpoint+ACK p50", tls[size]["p50_us"], "us"),
                 (f"tls {size:>3} pages checkpoint+ACK p99", tls[size]["p99_us"], "us")]
    rows.append(("tls 132 KiB + 16 B reply, no codec p50 (floor)", floor, "us"))
    for name, b in bulk.items():
        rows += [(f"full sync, {name}", b["full_sync_gib_s"], "GiB/s"),
                 (f"full sync, {name}: primary CPU", b["primary_cpu_s_per_gib"], "s/GiB"),
                 (f"full sync, {name}: secondary CPU", b["secondary_cpu_s_per_gib"], "s/GiB"),
                 (f"raw stream, {name} (same connection type)", b["raw_tls_gib_s"], "GiB/s")]
    for label, by in crc.items():
        rows += [(f"crc32 {label}, zlib / zlib-ng p50",
                  f"{by['zlib']:.1f} / {by['zlib-ng']:.1f}", "us")]
    return report("codec", rows, {"iterations": iters, "guest_bytes": GUEST,
                                  "bulk_guest_bytes": (64 << 20) if quick else BULK_GUEST})


if __name__ == "__main__":
    main()
