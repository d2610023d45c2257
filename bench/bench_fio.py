#!/usr/bin/env python3
"""4 KiB random I/O through the portable pseudo-volume against DEST direct, with fio (root).

    .venv/bin/python bench/bench_fio.py [--size 1G] [--file 256M] [--runtime 8]
                                        [--stages] [--loop-buffered] [--json FILE]

One run, two volumes side by side: an ext4 image holding a random file `data.bin` is copied to
BASE (loop-mounted directly: the baseline) and used as the backup of a PseudoVolume whose DEST
is restored in full first (restored data: reads hit the restored tier), presented the way the
portable backend does (FUSE file -> loop with direct I/O -> ext4; --loop-buffered: a buffered
loop, as the stack attached it before). Every fio job then runs on BASE and on the
pseudo-volume alternately, so both see the same load of this shared machine; the figure kept is
the ratio pseudo/BASE. The page cache of both backing files is dropped before each job.

Jobs (fio, time-based): 4 KiB random read O_DIRECT (libaio, depth 16), 4 KiB random write
O_DIRECT (depth 16), 4 KiB buffered random write with an fsync every 32 writes, 1 MiB sequential
read O_DIRECT. --stages also times each FUSE request in the server (handler time, engine time)
and reports the split (see docs/architecture.md, Performance).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import drop_cache  # noqa: E402

from dmrecover.backends.fuse.server import FuseServer  # noqa: E402
from dmrecover.backends.fuse.stack import FuseStack  # noqa: E402
from dmrecover.engine.fetcher import MemorySource  # noqa: E402
from dmrecover.engine.pseudovolume import PseudoVolume  # noqa: E402
from dmrecover.system import command  # noqa: E402
from dmrecover.system.loops import attach as loop_attach  # noqa: E402
from dmrecover.system.loops import detach as loop_detach  # noqa: E402
from dmrecover.units import format_size, parse_size  # noqa: E402

MiB = 1 << 20

JOBS: dict[str, list[str]] = {
    "randread_4k": ["--rw=randread", "--bs=4k", "--direct=1", "--ioengine=libaio",
                    "--iodepth=16"],
    "randwrite_4k": ["--rw=randwrite", "--bs=4k", "--direct=1", "--ioengine=libaio",
                     "--iodepth=16"],
    "write_fsync_4k": ["--rw=randwrite", "--bs=4k", "--direct=0", "--ioengine=psync",
                       "--fsync=32"],
    "write_fsync_4k_x4": ["--rw=randwrite", "--bs=4k", "--direct=0", "--ioengine=psync",
                          "--fsync=32", "--numjobs=4", "--group_reporting"],
    "randread_4k_qd1": ["--rw=randread", "--bs=4k", "--direct=1", "--ioengine=psync"],
    "seqread_1m": ["--rw=read", "--bs=1M", "--direct=1", "--ioengine=libaio", "--iodepth=4"],
}
GOALS = {"randread_4k": 0.5, "randwrite_4k": 0.3, "write_fsync_4k": 0.5, "write_fsync_4k_x4": 0.5,
         "seqread_1m": 0.9}


def build_image(path: Path, size: int, file_size: int) -> None:
    """An ext4 image of `size` bytes holding data.bin: `file_size` random bytes."""
    with open(path, "wb") as f:
        f.truncate(size)
    command.run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0",
                 str(path)], timeout=600)
    dev = loop_attach(str(path))
    try:
        with mounted(dev) as mnt:
            command.run(["dd", "if=/dev/urandom", f"of={mnt / 'data.bin'}", "bs=1M",
                         f"count={file_size // MiB}", "conv=fsync"], timeout=600)
    finally:
        loop_detach(dev)


@contextmanager
def mounted(dev: str) -> Any:
    mnt = Path(tempfile.mkdtemp(prefix="dmr-fio-mnt."))
    command.run(["mount", "-t", "ext4", dev, str(mnt)])
    try:
        yield mnt
    finally:
        command.run(["umount", str(mnt)], timeout=300)
        mnt.rmdir()


def fio(path: Path, job: str, file_size: int, runtime: float) -> dict[str, float]:
    """Run one fio job on `path`; IOPS, bandwidth and completion latency percentiles."""
    r = command.run(["fio", "--name=" + job, f"--filename={path}", f"--size={file_size}",
                     "--time_based", f"--runtime={runtime}", "--ramp_time=1",
                     "--randrepeat=0", "--norandommap", "--output-format=json",
                     *JOBS[job]], timeout=runtime * 10 + 120)
    j = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]
    side = j["read"] if j["read"]["io_bytes"] else j["write"]
    pct = side["clat_ns"].get("percentile", {})
    return {"iops": side["iops"], "bw": side["bw_bytes"],
            "p50_us": pct.get("50.000000", 0) / 1e3, "p99_us": pct.get("99.000000", 0) / 1e3}


class StageTimer:
    """Times every engine call the FUSE server makes (wraps the PseudoVolume's methods): the
    engine's share of a request; the rest is the kernel's FUSE and loop and the server."""

    def __init__(self, pv: PseudoVolume) -> None:
        self.samples: dict[str, list[float]] = {"read": [], "write": [], "flush": []}
        self._lock = threading.Lock()
        for name in self.samples:
            setattr(pv, name, self._wrap(name, getattr(pv, name)))

    def _wrap(self, name: str, fn: Any) -> Any:
        def timed(*a: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*a)
            finally:
                dt = time.perf_counter() - t0
                with self._lock:
                    self.samples[name].append(dt)
        return timed

    def reset(self) -> None:
        with self._lock:
            for v in self.samples.values():
                v.clear()

    def summary(self) -> dict[str, dict[str, float]]:
        out = {}
        with self._lock:
            for name, v in self.samples.items():
                if v:
                    s = sorted(v)
                    out[name] = {"count": len(s), "mean_us": statistics.fmean(s) * 1e6,
                                 "p50_us": s[len(s) // 2] * 1e6,
                                 "p99_us": s[int(len(s) * 0.99)] * 1e6}
        return out


class _ZeroReads:
    """The volume, but reads answer zeros at once (the FUSE and server cost of a read alone);
    writes still reach the volume: ext4 journals atime updates even during a read job."""

    def __init__(self, pv: PseudoVolume) -> None:
        self._pv = pv

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pv, name)

    def read(self, offset: int, length: int) -> bytes:
        return bytes(length)


def breakdown(srv: FuseServer, pv: PseudoVolume, dest: Path, base: Path, base_mnt: Path,
              pv_mnt: Path, file_size: int, runtime: float) -> dict[str, float]:
    """Mean latency of a queue-depth-1 4 KiB O_DIRECT read of cached data, stage by stage:
    DEST direct; through FUSE with a volume that returns zeros at once (kernel loop + FUSE +
    the server's read, unpack and reply); the server with the engine. The volume is swapped
    on the running server."""
    null = _ZeroReads(pv)

    # Warm: both backing files read once, so every stage below is CPU and protocol, not disk.
    for f in (base, dest):
        command.run(["dd", f"if={f}", "of=/dev/null", "bs=4M"], timeout=600)
    out = {}
    out["dest_direct"] = fio(base_mnt / "data.bin", "randread_4k_qd1", file_size, runtime)
    for name, volume in (("fuse_null", null), ("fuse_server", pv)):
        srv.volume = volume
        out[name] = fio(pv_mnt / "data.bin", "randread_4k_qd1", file_size, runtime)
    srv.volume = pv
    for name, r in out.items():
        print(f"  qd1 4 KiB read {name:20} {1e6 / r['iops']:8.1f} us/request "
              f"(p99 {r['p99_us']:.0f} us)", flush=True)
    return {k: 1e6 / v["iops"] for k, v in out.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1G")
    ap.add_argument("--file", default="256M")
    ap.add_argument("--runtime", type=float, default=8.0)
    ap.add_argument("--jobs", default=",".join(JOBS))
    ap.add_argument("--stages", action="store_true")
    ap.add_argument("--loop-buffered", action="store_true",
                    help="attach the pseudo-volume's loop without direct I/O (the portable "
                    "stack's loop before it used --direct-io=on)")
    ap.add_argument("--breakdown", action="store_true",
                    help="also split a queue-depth-1 4 KiB read into its stages")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("bench_fio.py needs root (loop devices, mounts, FUSE)")
    size, file_size = parse_size(args.size), parse_size(args.file)
    tmp = Path(tempfile.mkdtemp(prefix="dmr-fio.", dir="/var/tmp"))
    # The pseudo-volume's loop as the portable stack attaches it, unless told.
    loop_dio = FuseStack.loop_direct_io and not args.loop_buffered
    results: dict[str, Any] = {"size": size, "file": file_size, "runtime": args.runtime,
                               "loop_direct_io": loop_dio, "jobs": {}}
    try:
        image = tmp / "image.img"
        build_image(image, size, file_size)
        base = tmp / "base.img"
        shutil.copyfile(image, base)
        data = image.read_bytes()
        image.unlink()
        dest = tmp / "dest.img"
        with open(dest, "wb") as f:
            f.truncate(size)
        source = MemorySource(data, 4 * MiB)
        with ExitStack() as stack:
            pv = stack.enter_context(PseudoVolume(source, dest, tmp / "state"))
            pv.start_restore()
            assert pv.wait_restored(600), "restore did not complete"
            del data
            timer = StageTimer(pv) if args.stages else None
            srv = FuseServer(pv, tmp / "fuse")
            srv.start()
            stack.callback(srv.stop)
            pv_loop = loop_attach(str(srv.path), direct_io=loop_dio)
            stack.callback(loop_detach, pv_loop)
            base_loop = loop_attach(str(base))
            stack.callback(loop_detach, base_loop)
            pv_mnt = stack.enter_context(mounted(pv_loop))
            base_mnt = stack.enter_context(mounted(base_loop))
            for job in args.jobs.split(","):
                drop_cache(base)
                b = fio(base_mnt / "data.bin", job, file_size, args.runtime)
                drop_cache(dest)
                if timer:
                    timer.reset()
                p = fio(pv_mnt / "data.bin", job, file_size, args.runtime)
                entry = {"base": b, "pseudo": p, "ratio": p["iops"] / b["iops"],
                         "goal": GOALS.get(job)}
                if timer:
                    entry["stages"] = timer.summary()
                results["jobs"][job] = entry
                print(f"{job:16} base {b['iops']:9.0f} IOPS  pseudo {p['iops']:9.0f} IOPS  "
                      f"ratio {entry['ratio']:.2f}x (goal {GOALS.get(job)}x)  "
                      f"p99 {b['p99_us']:.0f}/{p['p99_us']:.0f} us", flush=True)
                if timer:
                    for name, s in entry["stages"].items():
                        print(f"    engine {name:5} n={s['count']:7d} mean {s['mean_us']:7.1f} "
                              f"p50 {s['p50_us']:7.1f} p99 {s['p99_us']:8.1f} us", flush=True)
            if args.breakdown:
                results["breakdown"] = breakdown(srv, pv, dest, base, base_mnt, pv_mnt,
                                                 file_size, args.runtime)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nsize {format_size(size)}, file {format_size(file_size)}, "
          f"{args.runtime:g} s per job")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
