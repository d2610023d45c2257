#!/usr/bin/env python3
"""Throughput of the portable presentation: ext4 on loop on the FUSE file of a PseudoVolume,
against the same ext4 on loop on DEST directly (root).

    .venv/bin/python bench/bench_engine.py [--size 1G] [--file 512M] [--direct-io both]

Steps: build an ext4 image holding a random file, use it as an in-memory backup, restore it
fully through the engine (so reads hit the restored tier), then with O_DIRECT dd (no page cache
above the loop device) measure: sequential read of the restored file, sequential write of a new
file (overlay tier), and 4 KiB random reads, through FUSE and on DEST directly. DEST's page
cache is dropped (fadvise DONTNEED) before each read pass. Also measures on-demand fetch
latency while the background restorer runs (a source with 5 ms per chunk), and an
application's write+fsync latency through the FUSE file while the restore runs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import dd, drop_cache, random_reads, seq_read  # noqa: E402

from dmrecover.backends.fuse.server import FuseServer  # noqa: E402
from dmrecover.engine.fetcher import MemorySource  # noqa: E402
from dmrecover.engine.pseudovolume import PseudoVolume  # noqa: E402
from dmrecover.system import command  # noqa: E402
from dmrecover.system.loops import attach as loop_attach  # noqa: E402
from dmrecover.system.loops import detach as loop_detach  # noqa: E402
from dmrecover.units import format_size, parse_size  # noqa: E402

MiB = 1 << 20


@contextmanager
def mounted(dev: str) -> object:
    mnt = Path(tempfile.mkdtemp(prefix="dmr-bench-mnt."))
    command.run(["mount", "-t", "ext4", dev, str(mnt)])
    try:
        yield mnt
    finally:
        command.run(["umount", str(mnt)])
        mnt.rmdir()


def measure(dev: str, file_size: int, drop: Path, write_size: int) -> dict[str, float]:
    out: dict[str, float] = {}
    with mounted(dev) as mnt:
        drop_cache(drop)
        out["seq_read"] = seq_read(mnt / "data.bin")
        drop_cache(drop)
        out["rand_read_4k_iops"] = random_reads(mnt / "data.bin", file_size)
        out["seq_write"] = dd(["if=/dev/zero", f"of={mnt}/new.bin", "bs=1M",
                               f"count={write_size // MiB}", "oflag=direct", "conv=fsync"])
        out["seq_write_buffered"] = dd(["if=/dev/zero", f"of={mnt}/new2.bin", "bs=1M",
                                        f"count={write_size // MiB}", "conv=fsync"])
        drop_cache(drop)
        out["reread_overlay"] = dd([f"if={mnt}/new.bin", "of=/dev/null", "bs=1M",
                                    "iflag=direct"])
        os.unlink(mnt / "new.bin")
        os.unlink(mnt / "new2.bin")
    return out


def demand_latency(tmp: Path) -> dict[str, float]:
    """On-demand fetch latency while the restorer runs, against a 5 ms-per-chunk source."""
    data = os.urandom(256 * MiB)
    src = MemorySource(data, 1 * MiB, delay=0.005)
    dest = tmp / "lat-dest"
    with open(dest, "wb") as f:
        f.truncate(len(data))
    with PseudoVolume(src, dest, tmp / "lat-state") as pv:
        lats_idle = []
        for i in range(20):
            t0 = time.monotonic()
            pv.read((255 - i) * MiB, 4096)
            lats_idle.append(time.monotonic() - t0)
        pv.start_restore()
        time.sleep(0.2)
        lats = []
        for i in range(40):
            t0 = time.monotonic()
            pv.read((200 - i * 4) * MiB + 8192, 4096)
            lats.append(time.monotonic() - t0)
            time.sleep(0.01)
        s = pv.stats()
        pv.stop_restore()
    lats.sort()
    return {"idle_mean_ms": 1000 * sum(lats_idle) / len(lats_idle),
            "restoring_p50_ms": 1000 * lats[len(lats) // 2],
            "restoring_max_ms": 1000 * lats[-1],
            "background_chunks_meanwhile": s["background_fetches"]}


def fsync_latency(tmp: Path, seconds: float = 5.0) -> dict[str, float]:
    """An application's 4 KiB write + fsync through the FUSE file while the background
    restore runs (source at 20 ms per 4 MiB chunk): what PseudoVolume.flush() costs."""
    data = os.urandom(1024 * MiB)
    dest = tmp / "fsync-dest"
    with open(dest, "wb") as f:
        f.truncate(len(data))
    with PseudoVolume(MemorySource(data, 4 * MiB, delay=0.02), dest, tmp / "fsync-state") as pv:
        srv = FuseServer(pv, tmp / "fsync-fuse")
        srv.start()
        try:
            fd = os.open(srv.path, os.O_RDWR)
            try:
                pv.start_restore()
                lats = []
                end = time.monotonic() + seconds
                i = 0
                while time.monotonic() < end and not pv.restored_all():
                    os.pwrite(fd, b"x" * 4096, (i % 1000) * 4096)
                    t0 = time.monotonic()
                    os.fsync(fd)
                    lats.append(time.monotonic() - t0)
                    i += 1
                    time.sleep(0.01)
            finally:
                os.close(fd)
                pv.stop_restore()
        finally:
            srv.stop()
    lats.sort()
    return {"fsyncs": len(lats), "p50_ms": 1000 * lats[len(lats) // 2],
            "p99_ms": 1000 * lats[int(len(lats) * 0.99)], "max_ms": 1000 * lats[-1]}


class _BigSource:
    """A huge volume for memory measurements: all-zero chunks except every 1000th."""

    def __init__(self, size: int, chunk_size: int) -> None:
        self.size, self.chunk_size = size, chunk_size
        self.chunk_count = (size + chunk_size - 1) // chunk_size

    def is_zero(self, index: int) -> bool:
        return index % 1000 != 0

    def read_chunk(self, index: int) -> bytes:
        return index.to_bytes(8, "little") * (self.chunk_size // 8)


def memory_at(size: int, tmp: Path) -> dict[str, float]:
    """Peak RSS of the engine on a `size` volume (sparse DEST and overlay): open, 20000
    random 4 KiB writes, flushes, on-demand reads, 3 s of background restore (mostly hole
    punching), close, reopen (map recovery), close."""
    import resource

    def rss_mib() -> float:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    base = rss_mib()
    dest = tmp / "big-dest"
    with open(dest, "wb") as f:
        f.truncate(size)
    src = _BigSource(size, 4 * MiB)
    rnd = random.Random(1)
    pv = PseudoVolume(src, dest, tmp / "big-state")
    after_open = rss_mib()
    block = os.urandom(4096)
    for i in range(20000):
        pv.write(rnd.randrange(size // 4096) * 4096, block)
        if i % 5000 == 0:
            pv.flush()
    for _ in range(50):
        pv.read(rnd.randrange(src.chunk_count) * 4 * MiB, 4096)
    pv.start_restore()
    time.sleep(3)
    pv.stop_restore()
    in_use = rss_mib()
    pv.close()
    del pv
    import gc

    gc.collect()
    pv = PseudoVolume(src, dest, tmp / "big-state")
    assert pv.stats()["overlay_bytes"] > 0
    pv.close()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"rss_before_mib": base, "rss_after_open_mib": after_open,
            "rss_in_use_mib": in_use, "peak_rss_mib": peak}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1G")
    ap.add_argument("--file", default="512M")
    ap.add_argument("--direct-io", choices=["on", "off", "both"], default="both")
    ap.add_argument("--chunk-size", default="4M")
    ap.add_argument("--memory", metavar="SIZE",
                    help="only measure the engine's memory on a sparse volume of SIZE (1T)")
    args = ap.parse_args()
    if args.memory:
        with tempfile.TemporaryDirectory(prefix="dmr-bench.", dir="/var/tmp") as td:
            print(json.dumps(memory_at(parse_size(args.memory), Path(td)), indent=1))
        return 0
    size, file_size = parse_size(args.size), parse_size(args.file)
    write_size = min(file_size, (size - file_size) // 3) // MiB * MiB
    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="dmr-bench.", dir="/var/tmp") as td:
        tmp = Path(td)
        image = tmp / "image"
        with open(image, "wb") as f:
            f.truncate(size)
        command.run(["mkfs.ext4", "-q", "-F", str(image)])
        dev = loop_attach(image)
        try:
            with mounted(dev) as mnt:
                dd(["if=/dev/urandom", f"of={mnt}/data.bin", "bs=1M",
                    f"count={file_size // MiB}", "conv=fsync"])
        finally:
            loop_detach(dev)
        data = image.read_bytes()
        source = MemorySource(data, parse_size(args.chunk_size))
        dest = tmp / "dest"
        with open(dest, "wb") as f:
            f.truncate(size)
        t0 = time.monotonic()
        with PseudoVolume(source, dest, tmp / "restore-state") as pv:
            pv.start_restore()
            pv.wait_restored()
        results["engine_restore_MBps"] = size / (time.monotonic() - t0) / 1e6
        del data

        # raw: ext4 on loop on DEST directly
        dev = loop_attach(dest)
        try:
            results["raw"] = measure(dev, file_size, dest, write_size)
        finally:
            loop_detach(dev)

        modes = ["on", "off"] if args.direct_io == "both" else [args.direct_io]
        for mode in modes:
            state = tmp / f"state-{mode}"
            # the restored map of the full restore, so reads hit the restored tier
            state.mkdir()
            (state / "restored.map").write_bytes((tmp / "restore-state" /
                                                  "restored.map").read_bytes())
            with PseudoVolume(source, dest, state) as pv:
                srv = FuseServer(pv, tmp / f"fuse-{mode}", direct_io=(mode == "on"))
                srv.start()
                try:
                    dev = loop_attach(srv.path)
                    try:
                        results[f"fuse_direct_io_{mode}"] = measure(dev, file_size, dest,
                                                                    write_size)
                    finally:
                        loop_detach(dev)
                finally:
                    srv.stop()
                results[f"fuse_direct_io_{mode}"]["overlay_bytes"] = pv.stats()["overlay_bytes"]
        results["demand_latency"] = demand_latency(tmp)
        results["fsync_latency_while_restoring"] = fsync_latency(tmp)

    def fmt(d: dict) -> str:
        parts = []
        for k, v in d.items():
            is_rate = k.startswith(("seq", "reread"))
            parts.append(f"{k}={format_size(v)}/s" if is_rate else f"{k}={v:.1f}")
        return ", ".join(parts)

    print(json.dumps(results, indent=1))
    for k, v in results.items():
        if isinstance(v, dict):
            print(f"{k:22s} {fmt(v)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
