#!/usr/bin/env python3
"""The dm backend against DEST directly and against the portable backend, in one guest (root,
a kernel with device-mapper: run it in the VM). Emulated CPUs make absolute figures meaningless:
read the ratios.

    python bench/bench_dm.py [--size 256M] [--file 96M] [--json FILE]
    python bench/bench_dm.py --cold [--size 128M] [--file 16M]   cold reads only

--cold: nothing restored and no restorer, every chunk fetched on demand; a sequential read of
data.bin through dm (origin loop buffered, then with O_DIRECT) and through the fuse backend,
with the request counts and average sizes seen by the origin loop and by FUSE (the engine).

One ext4 image holding a random file is the backup (in memory); DEST is fully restored through
the engine first, so reads hit the restored tier in every configuration. Then, on the same
filesystem (bench_engine.measure: O_DIRECT sequential read, 4 KiB random reads, O_DIRECT and
buffered sequential writes, re-read of written data):

- dest:   ext4 on loop on DEST;
- dm:     ext4 on the dm snapshot (origin: loop -r on the read-only FUSE file; COW: loop on a
          sparse file), i.e. the dm backend's DmStack;
- fuse:   ext4 on loop on the read-write FUSE file (the portable backend).

Online cutover pause: an application loop (4 KiB write + fdatasync, timestamps of every
completion) runs on the dm pseudo-volume while `DmStack.online_cutover()` swaps the tables; the
longest gap between two completions during the swaps is reported against the longest gap
during the same time before it (goal: at most 200 ms of guest time).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

here = Path(__file__).resolve().parent
sys.path.insert(0, str(here.parent))
sys.path.insert(0, str(here))

from bench_engine import measure  # noqa: E402

from dmrecover.backends.base import BackendContext  # noqa: E402
from dmrecover.backends.dm import DmBackend  # noqa: E402
from dmrecover.backends.dm import dmsetup as dm  # noqa: E402
from dmrecover.backends.fuse import FuseBackend  # noqa: E402
from dmrecover.engine.fetcher import MemorySource  # noqa: E402
from dmrecover.engine.pseudovolume import PseudoVolume  # noqa: E402
from dmrecover.system import command  # noqa: E402
from dmrecover.system.loops import attach as loop_attach  # noqa: E402
from dmrecover.system.loops import detach as loop_detach  # noqa: E402
from dmrecover.system.mounts import mount, umount  # noqa: E402
from dmrecover.units import format_size, parse_size  # noqa: E402

MiB = 1 << 20


def make_image(path: Path, size: int, file_size: int) -> bytes:
    with open(path, "wb") as f:
        f.truncate(size)
    command.run(["mkfs.ext4", "-q", "-F", str(path)])
    dev = loop_attach(path)
    mnt = Path(tempfile.mkdtemp(prefix="dmr-bench-img."))
    try:
        command.run(["mount", dev, str(mnt)])
        try:
            with open(mnt / "data.bin", "wb") as f:
                left = file_size
                while left:
                    n = min(left, 8 * MiB)
                    f.write(os.urandom(n))
                    left -= n
                os.fsync(f.fileno())
        finally:
            command.run(["umount", str(mnt)])
    finally:
        loop_detach(dev)
        mnt.rmdir()
    return path.read_bytes()


class Writer(threading.Thread):
    """4 KiB write + fdatasync in a loop; records the completion times."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.times: list[float] = []
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                i = 0
                block = os.urandom(4096)
                while not self.stop.is_set():
                    os.pwrite(fd, block, (i % 1024) * 4096)
                    os.fdatasync(fd)
                    self.times.append(time.monotonic())
                    i += 1
            finally:
                os.close(fd)
        except BaseException as err:
            self.error = err

    def longest_gap(self, start: float, end: float) -> float:
        ts = [t for t in self.times if start <= t <= end]
        if len(ts) < 2:
            return end - start
        return max(b - a for a, b in zip(ts, ts[1:], strict=False))


class CountingVolume:
    """Wraps a PseudoVolume's read to count the requests reaching the engine (FUSE reads)."""

    def __init__(self, pv: PseudoVolume) -> None:
        self.pv = pv
        self.sizes: list[int] = []
        self._read = pv.read
        pv.read = self.read  # type: ignore[method-assign]  # the FUSE server calls pv.read

    def read(self, offset: int, length: int) -> bytes:
        self.sizes.append(length)
        return self._read(offset, length)


def block_reads(dev: str) -> tuple[int, int]:
    """(read requests completed, sectors read) of a block device, from sysfs."""
    name = os.path.basename(os.path.realpath(dev))
    f = (Path("/sys/block") / name / "stat").read_text().split()
    return int(f[0]), int(f[2])


def cold_read(kind: str, data: bytes, tmp: Path, size: int, file_size: int,
              *, direct_io: bool = False) -> dict:
    """Cold sequential read of data.bin (nothing restored, no restorer: every chunk fetched
    on demand) through the pseudo-volume of `kind` (dm or fuse); MB/s and request sizes at the
    loop device and at FUSE."""
    src = MemorySource(data, 1 * MiB)
    sdir = tmp / f"cold-{kind}-{int(direct_io)}"
    sdir.mkdir()
    dest = sdir / "dest.img"
    with open(dest, "wb") as f:
        f.truncate(size)
    mnt = sdir / "mnt"
    mnt.mkdir()
    pv = PseudoVolume(src, dest, sdir / "engine", read_only=(kind == "dm"))
    counter = CountingVolume(pv)
    ctx = BackendContext(session=f"cold{kind}", state_dir=str(sdir), engine_dir=str(sdir),
                         mountpoint=str(mnt), fstype="ext4", dest=str(dest), size=size,
                         mount_options=("ro",) if kind == "dm" else ())
    stack = (DmBackend() if kind == "dm" else FuseBackend()).present(pv, ctx)
    if kind == "dm":
        stack.origin_direct_io = direct_io
    stack.build()
    try:
        loop = stack.origin_loop if kind == "dm" else stack.loop
        assert loop
        command.run(["sync"])
        command.run(["sh", "-c", "echo 3 > /proc/sys/vm/drop_caches"])
        counter.sizes.clear()
        before = block_reads(loop)
        fetched0 = len(src.reads)
        t0 = time.monotonic()
        fd = os.open(mnt / "data.bin", os.O_RDONLY)
        try:
            while os.read(fd, 1 * MiB):
                pass
        finally:
            os.close(fd)
        dt = time.monotonic() - t0
        after = block_reads(loop)
        reqs = after[0] - before[0]
        n = len(counter.sizes)
        return {"mb_s": file_size / dt / MiB, "seconds": dt,
                "loop_requests": reqs,
                "loop_avg_kib": (after[1] - before[1]) * 512 / max(reqs, 1) / 1024,
                "fuse_requests": n,
                "fuse_avg_kib": sum(counter.sizes) / max(n, 1) / 1024,
                "fuse_max_kib": max(counter.sizes, default=0) / 1024,
                "chunks_fetched": len(src.reads) - fetched0,
                "loop_dio": (Path("/sys/block") / os.path.basename(loop) / "loop" / "dio")
                .read_text().strip()}
    finally:
        stack.undo.unwind()
        if kind == "dm" and dm.info(stack.pseudo_name) is not None:
            dm.remove(stack.pseudo_name)
        pv.close()


def cold_main(args: argparse.Namespace) -> int:
    """--cold: the cold sequential read through dm (buffered and O_DIRECT origin loop) and
    through the fuse backend, same guest, same image."""
    size, file_size = parse_size(args.size), parse_size(args.file)
    dm.probe()
    results: dict = {"size": size, "file": file_size}
    with tempfile.TemporaryDirectory(prefix="dmr-bench-cold.", dir="/var/tmp") as td:
        tmp = Path(td)
        data = make_image(tmp / "src.img", size, file_size)
        results["dm_buffered_loop"] = cold_read("dm", data, tmp, size, file_size)
        results["dm_direct_io_loop"] = cold_read("dm", data, tmp, size, file_size,
                                                 direct_io=True)
        results["fuse"] = cold_read("fuse", data, tmp, size, file_size)
    print(f"cold sequential read of a {format_size(file_size)} file, nothing restored")
    print(f"{'path':18} {'MB/s':>7} {'loop reqs':>9} {'loop KiB':>8} {'FUSE reqs':>9} "
          f"{'FUSE KiB':>8} {'fetched':>7} {'dio':>3}")
    for k in ("dm_buffered_loop", "dm_direct_io_loop", "fuse"):
        r = results[k]
        print(f"{k:18} {r['mb_s']:7.2f} {r['loop_requests']:9d} {r['loop_avg_kib']:8.1f} "
              f"{r['fuse_requests']:9d} {r['fuse_avg_kib']:8.1f} {r['chunks_fetched']:7d} "
              f"{r['loop_dio']:>3}")
    fuse = results["fuse"]["mb_s"]
    for k in ("dm_buffered_loop", "dm_direct_io_loop"):
        print(f"{k}/fuse: {results[k]['mb_s'] / fuse:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="256M")
    ap.add_argument("--file", default="96M")
    ap.add_argument("--write", default="32M")
    ap.add_argument("--cold", action="store_true",
                    help="only the cold read: dm (buffered / O_DIRECT origin loop) vs fuse")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.cold:
        return cold_main(args)
    size, file_size, write_size = (parse_size(args.size), parse_size(args.file),
                                   parse_size(args.write))
    dm.probe()
    results: dict = {"size": size, "file": file_size}
    with tempfile.TemporaryDirectory(prefix="dmr-bench-dm.", dir="/var/tmp") as td:
        tmp = Path(td)
        data = make_image(tmp / "src.img", size, file_size)
        src = MemorySource(data, 1 * MiB)
        dest = tmp / "dest.img"
        with open(dest, "wb") as f:
            f.truncate(size)

        # dm: a read-only engine as origin, restored fully first.
        sdir = tmp / "dmrecover" / "bench"
        sdir.mkdir(parents=True)
        pv = PseudoVolume(src, dest, sdir, read_only=True)
        pv.start_restore()
        pv.wait_restored()
        pv.stop_restore()
        pv.flush()
        mnt = tmp / "mnt"
        mnt.mkdir()
        stack = DmBackend().present(pv, BackendContext(
            session="bench", state_dir=str(sdir), engine_dir=str(sdir), mountpoint=str(mnt),
            fstype="ext4", dest=str(dest), size=size))
        stack.build()
        try:
            umount(str(mnt))
            stack.undo.pop("mount")
            results["dm"] = measure(stack.device, file_size, dest, write_size)
            mount(stack.device, str(mnt), "ext4")
            stack.undo.push("mount", lambda: umount(str(mnt)))
            # Online cutover pause, with an fdatasync loop running.
            w = Writer(mnt / "pause.bin")
            w.start()
            time.sleep(3.0)
            t_swap = time.monotonic()
            max_pause = stack.online_cutover(str(dest))
            t_end = time.monotonic()
            time.sleep(1.0)
            w.stop.set()
            w.join(30)
            if w.error:
                raise w.error
            results["online"] = {
                "gap_before_ms": 1000 * w.longest_gap(t_swap - 3.0, t_swap),
                "gap_during_cutover_ms": 1000 * w.longest_gap(t_swap, t_end + 0.5),
                "dm_suspended_ms": 1000 * max_pause,
                "cutover_total_s": t_end - t_swap,
                "writes": len(w.times),
            }
            os.unlink(mnt / "pause.bin")
        finally:
            stack.undo.unwind()
            if dm.info(stack.pseudo_name) is not None:
                dm.remove(stack.pseudo_name)
            pv.close()
        # fuse: the portable backend over a read-write engine on the same (now merged) DEST.
        fdir = tmp / "dmrecover" / "fuse"
        fdir.mkdir(parents=True)
        pvf = PseudoVolume(src, dest, fdir)
        pvf.start_restore()
        pvf.wait_restored()
        pvf.stop_restore()
        fstack = FuseBackend().present(pvf, BackendContext(
            session="fuse", state_dir=str(fdir), engine_dir=str(fdir), mountpoint=str(mnt),
            fstype="ext4", dest=str(dest), size=size))
        fstack.build()
        try:
            umount(str(mnt))
            fstack.undo.pop("mount")
            assert fstack.loop
            results["fuse"] = measure(fstack.loop, file_size, dest, write_size)
        finally:
            fstack.undo.unwind()
            pvf.close()
        # dest directly.
        dev = loop_attach(dest)
        try:
            results["dest"] = measure(dev, file_size, dest, write_size)
        finally:
            loop_detach(dev)

    keys = ["seq_read", "rand_read_4k_iops", "seq_write", "seq_write_buffered", "reread_overlay"]
    print(f"volume {format_size(size)}, file {format_size(file_size)} (ratios to DEST directly)")
    print(f"{'measure':22} {'dest':>12} {'dm':>12} {'fuse':>12} {'dm/dest':>8} {'fuse/dest':>9}"
          f" {'dm/fuse':>8}")
    for k in keys:
        d, m_, f = results["dest"][k], results["dm"][k], results["fuse"][k]
        unit = (lambda v: f"{v:,.0f}/s") if "iops" in k else (lambda v: f"{v / MiB:.1f} MB/s")
        print(f"{k:22} {unit(d):>12} {unit(m_):>12} {unit(f):>12} {m_ / d:8.2f} {f / d:9.2f}"
              f" {m_ / f:8.2f}")
    o = results["online"]
    print(f"online cutover: longest I/O gap {o['gap_during_cutover_ms']:.0f} ms (before it "
          f"{o['gap_before_ms']:.0f} ms; dm suspended {o['dm_suspended_ms']:.0f} ms; "
          f"whole cutover {o['cutover_total_s']:.1f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
