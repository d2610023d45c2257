#!/usr/bin/env python3
"""The dm backends (dm-snapshot, dm-clone) and the fuse backend against DEST read directly, with
fio, in one guest (root, a kernel with device-mapper and the clone target: run it in the VM,
vagrant/run-bench.sh). Emulated CPUs make absolute figures meaningless: read the ratios, all
from the same run.

    python bench/bench_dm.py [--size 256M] [--file 96M] [--runtime 5] [--json FILE]
    python bench/bench_dm.py --cold [--size 128M] [--file 16M]   cold reads only

One ext4 image holding a random file data.bin is the backup (in memory, a MemorySource). BASE,
a copy of the image on its own loop, stands for DEST read directly. Each backend presents the
restored volume (restored in full first, so reads hit restored data):

- dm-snapshot: DmStack (snapshot over the read-only FUSE origin, COW on a loop file);
- dm-clone:    CloneStack (clone of a fresh DEST from the read-only FUSE origin, hydrated
               in full: reads come from DEST in the kernel, writes go to DEST);
- fuse:        the portable backend (ext4 on loop on the read-write FUSE file).

fio jobs (bench_fio.JOBS, time-based, O_DIRECT, the page cache dropped before each): 1 MiB
sequential read, 4 KiB random read (depth 16), 4 KiB random write (depth 16), on data.bin, each
run on BASE and on the pseudo-volume back to back (the same load of the shared host); the ratio
pseudo/BASE is the figure. Goals: reads >= 0.9x and random writes >= 0.8x on both dm backends.

Online cutover pause (dm backends): an application loop (4 KiB write + fdatasync, timestamps
of every completion) runs on the pseudo-volume while `online_cutover()` swaps the table; the
longest gap between two completions from the swap's start to 0.5 s after it (goal: 200 ms of
guest time), beside the longest gap in the 3 s before it; then, for each table swap
(dm-snapshot: to snapshot-merge, suspended first, then to linear; dm-clone: to linear), the
gap spanning it, the swap's own pause (ioctl.swap) and its parts, and the longest gap between
the swaps (during the merge). dm-clone: the time from the restore's
end to the application on plain DEST = the hydration still running when the engine finished
(the clone built before the restore started, hydrating alongside) + the whole online cutover.

Calibration (unless --no-kernel): the same fio jobs through a bare dm linear and a bare
persistent dm-snapshot (4 KiB chunks, COW on a loop file) over a copy of the image, no dmrecover:
under emulated CPUs every dm layer costs what real hardware does not show, and these columns say
how much of a dm backend's ratio is the kernel target's own.

--cold: nothing restored and no restorer, every chunk fetched on demand; a sequential read of
data.bin through dm (origin loop buffered, then with O_DIRECT) and through the fuse backend,
with the request counts and average sizes seen by the origin loop and by FUSE (the engine).
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

from bench_fio import fio  # noqa: E402

from dmrecover.backends.base import BackendContext  # noqa: E402
from dmrecover.backends.dm import DmBackend  # noqa: E402
from dmrecover.backends.dm import dmsetup as dm  # noqa: E402
from dmrecover.backends.dm.merge import CHUNK_SECTORS  # noqa: E402
from dmrecover.backends.dm_clone import DmCloneBackend  # noqa: E402
from dmrecover.backends.dm_clone import target as clone_target  # noqa: E402
from dmrecover.backends.dm_clone.stack import wait_hydrated  # noqa: E402
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


JOBS = ("seqread_1m", "randread_4k", "randwrite_4k")  # writes last: reads see restored data
GOALS = {"seqread_1m": 0.9, "randread_4k": 0.9, "randwrite_4k": 0.8}
BACKENDS = ("dm-snapshot", "dm-clone", "fuse")
# Calibration: the bare kernel targets (no dmrecover) over a copy of the image, same fio jobs.
KERNEL = ("kernel-linear", "kernel-snapshot")


def drop_caches() -> None:
    command.run(["sh", "-c", "sync; echo 3 > /proc/sys/vm/drop_caches"])


def fio_pair(base_mnt: Path, mnt: Path, file_size: int, runtime: float) -> dict:
    """Every job on BASE then on the pseudo-volume; IOPS of both and the ratio."""
    out = {}
    for job in JOBS:
        drop_caches()
        b = fio(base_mnt / "data.bin", job, file_size, runtime)
        drop_caches()
        p = fio(mnt / "data.bin", job, file_size, runtime)
        out[job] = {"base_iops": b["iops"], "pseudo_iops": p["iops"],
                    "ratio": p["iops"] / b["iops"], "goal": GOALS[job],
                    "base_p99_us": b["p99_us"], "pseudo_p99_us": p["p99_us"]}
        print(f"  {job:13} base {b['iops']:8.0f} IOPS  pseudo {p['iops']:8.0f} IOPS  "
              f"ratio {out[job]['ratio']:.2f}x", flush=True)
    return out


def gap_spanning(times: list[float], start: float, end: float) -> float:
    """The longest gap between two consecutive completions that spans part of [start, end]."""
    return max((b - a for a, b in zip(times, times[1:], strict=False)
                if b >= start and a <= end), default=end - start)


def cutover_pause(mnt: Path, cutover, stack) -> dict:
    """The longest gap of an fdatasync loop on the mounted pseudo-volume while `cutover()`
    (an online cutover) runs, against the longest gap in the 3 s before it; and for each
    table swap (stack.swaps: ioctl.Swap) the gap spanning it beside the swap's own pause and
    its parts, and the longest gap between the swaps (dm-snapshot: during the merge)."""
    w = Writer(mnt / "pause.bin")
    w.start()
    time.sleep(3.0)
    t_swap = time.monotonic()
    suspended = cutover()
    t_end = time.monotonic()
    time.sleep(1.0)
    w.stop.set()
    w.join(30)
    if w.error:
        raise w.error
    os.unlink(mnt / "pause.bin")
    swaps = [dict(s.as_dict(), gap_ms=1000 * gap_spanning(w.times, s.start, s.end))
             for s in stack.swaps]
    out = {"gap_before_ms": 1000 * w.longest_gap(t_swap - 3.0, t_swap),
           "gap_during_cutover_ms": 1000 * w.longest_gap(t_swap, t_end + 0.5),
           "dm_suspended_ms": 1000 * suspended, "cutover_total_s": t_end - t_swap,
           "writes": len(w.times), "swaps": swaps}
    if len(stack.swaps) > 1:
        a, b = stack.swaps[0].end, stack.swaps[-1].start
        between = [t for t in w.times if a <= t <= b]
        out["gap_between_swaps_ms"] = 1000 * max(
            (y - x for x, y in zip(between, between[1:], strict=False)), default=0.0)
    return out


def run_snapshot(tmp: Path, src: MemorySource, size: int, file_size: int, base_mnt: Path,
                 runtime: float) -> dict:
    sdir = tmp / "dmrecover" / "snap"
    sdir.mkdir(parents=True)
    dest = tmp / "dest-snap.img"
    with open(dest, "wb") as f:
        f.truncate(size)
    mnt = tmp / "mnt-snap"
    mnt.mkdir()
    pv = PseudoVolume(src, dest, sdir, read_only=True)
    pv.start_restore()
    pv.wait_restored()
    pv.stop_restore()
    pv.flush()
    stack = DmBackend().present(pv, BackendContext(
        session="bsnap", state_dir=str(sdir), engine_dir=str(sdir), mountpoint=str(mnt),
        fstype="ext4", dest=str(dest), size=size))
    stack.build()
    try:
        out = {"fio": fio_pair(base_mnt, mnt, file_size, runtime)}
        out["online"] = cutover_pause(mnt, lambda: stack.online_cutover(str(dest)), stack)
    finally:
        stack.undo.unwind()
        if dm.info(stack.pseudo_name) is not None:
            dm.remove(stack.pseudo_name)
        pv.close()
        dest.unlink()
    return out


def run_clone(tmp: Path, src: MemorySource, size: int, file_size: int, base_mnt: Path,
              runtime: float) -> dict:
    """The clone is up and hydrating while the engine restores (as in a session): the time
    from the restore's end to the application on plain DEST is what hydration still needs
    then, plus the online cutover (timed below with the pause)."""
    sdir = tmp / "dmrecover" / "clone"
    sdir.mkdir(parents=True)
    dest = tmp / "dest-clone.img"
    with open(dest, "wb") as f:
        f.truncate(size)
    mnt = tmp / "mnt-clone"
    mnt.mkdir()
    backend = DmCloneBackend()
    ctx = BackendContext(session="bclone", state_dir=str(sdir), engine_dir=str(sdir),
                         mountpoint=str(mnt), fstype="ext4", dest=str(dest), size=size)
    pv = PseudoVolume(src, backend.engine_dest(ctx), sdir / "state", read_only=True)
    pv.start_restore()
    stack = backend.present(pv, ctx)
    stack.build()
    try:
        pv.wait_restored()
        t_restored = time.monotonic()
        pv.stop_restore()
        pv.flush()
        wait_hydrated(stack.clone_name, timeout=3600)
        hydrate_after = time.monotonic() - t_restored
        st = clone_target.status(stack.clone_name)
        assert st.complete, st
        out = {"fio": fio_pair(base_mnt, mnt, file_size, runtime)}
        out["online"] = cutover_pause(mnt, lambda: stack.online_cutover(str(dest)), stack)
        out["hydration_after_restore_s"] = hydrate_after
        out["restore_to_plain_dest_s"] = hydrate_after + out["online"]["cutover_total_s"]
        backend.finish_online_cutover(ctx)
        if "clone-meta" in stack.undo.names():
            stack.undo.pop("clone-meta")  # consumed by the cutover, not an undo any more
    finally:
        stack.undo.unwind()
        if dm.info(stack.clone_name) is not None:
            dm.remove(stack.clone_name)
        pv.close()
        dest.unlink()
    return out


def run_fuse(tmp: Path, src: MemorySource, size: int, file_size: int, base_mnt: Path,
             runtime: float) -> dict:
    fdir = tmp / "dmrecover" / "fuse"
    fdir.mkdir(parents=True)
    dest = tmp / "dest-fuse.img"
    with open(dest, "wb") as f:
        f.truncate(size)
    mnt = tmp / "mnt-fuse"
    mnt.mkdir()
    pv = PseudoVolume(src, dest, fdir)
    pv.start_restore()
    pv.wait_restored()
    pv.stop_restore()
    stack = FuseBackend().present(pv, BackendContext(
        session="bfuse", state_dir=str(fdir), engine_dir=str(fdir), mountpoint=str(mnt),
        fstype="ext4", dest=str(dest), size=size))
    stack.build()
    try:
        return {"fio": fio_pair(base_mnt, mnt, file_size, runtime)}
    finally:
        stack.undo.unwind()
        pv.close()
        dest.unlink()


def run_kernel(kind: str, tmp: Path, size: int, file_size: int, base_mnt: Path,
               runtime: float) -> dict:
    """The kernel's own cost under this CPU, no dmrecover: fio through a bare dm device over a
    copy of the image ("linear": one linear target; "snapshot": a persistent snapshot with the
    backend's 4 KiB chunks and a COW loop file, its origin the copy's loop), against BASE.
    Under emulation every dm layer costs CPU time that real hardware does not show: these rows
    say how much of a backend's ratio is the kernel target's, not dmrecover's."""
    img = tmp / f"kernel-{kind}.img"
    command.run(["cp", "--sparse=always", str(tmp / "src.img"), str(img)])
    mnt = tmp / f"mnt-kernel-{kind}"
    mnt.mkdir()
    cow = tmp / f"kernel-{kind}.cow"
    loops = [loop_attach(img)]
    name = dm.dm_name("bench", f"k{kind}")
    if kind == "linear":
        table = dm.linear_table(loops[0], size)
    else:
        with open(cow, "wb") as f:
            f.truncate(size // 2)
        loops.append(loop_attach(cow))
        table = dm.snapshot_table(loops[0], loops[1], size, CHUNK_SECTORS)
    try:
        dev = dm.create(name, table, dm.dm_uuid("bench", f"k{kind}"))
        try:
            mount(str(dev), str(mnt), "ext4")
            try:
                return {"fio": fio_pair(base_mnt, mnt, file_size, runtime)}
            finally:
                umount(str(mnt))
        finally:
            dm.remove(name)
    finally:
        for loop in reversed(loops):
            loop_detach(loop)
        img.unlink()
        cow.unlink(missing_ok=True)


def print_table(results: dict) -> None:
    print(f"\nvolume {format_size(results['size'])}, file {format_size(results['file'])}, "
          f"fio {results['runtime']:g} s a job; ratio = pseudo-volume / DEST read directly")
    cols = BACKENDS + tuple(k for k in KERNEL if k in results)
    print(f"{'measure':34} " + " ".join(f"{b:>15}" for b in cols) + f" {'goal (dm)':>10}")
    names = {"seqread_1m": "sequential read 1 MiB (ratio)",
             "randread_4k": "random read 4 KiB IOPS (ratio)",
             "randwrite_4k": "random write 4 KiB IOPS (ratio)"}
    for job in JOBS:
        cells = [f"{results[b]['fio'][job]['ratio']:.2f}x" if b in results else "-"
                 for b in cols]
        print(f"{names[job]:34} " + " ".join(f"{c:>15}" for c in cells)
              + f" {'>= ' + str(GOALS[job]) + 'x':>10}")
    cells = [f"{results[b]['online']['gap_during_cutover_ms']:.0f} ms"
             if "online" in results.get(b, {}) else "-" for b in BACKENDS]
    print(f"{'online cutover longest I/O pause':34} " + " ".join(f"{c:>15}" for c in cells)
          + f" {'<= 200 ms':>10}")
    cells = [f"{results[b]['online']['gap_before_ms']:.0f} ms"
             if "online" in results.get(b, {}) else "-" for b in BACKENDS]
    print(f"{'  (longest gap before it)':34} " + " ".join(f"{c:>15}" for c in cells))
    online = [results.get(b, {}).get("online", {}) for b in BACKENDS]
    for i in range(max((len(o.get("swaps", ())) for o in online), default=0)):
        rows = {"gap spanning it (app)": "gap_ms", "ioctl pause": "pause_ms",
                "  suspend ioctl": "suspend_ms", "  load (in pause)": "load_ms",
                "  resume ioctl": "resume_ms"}
        for label, key in rows.items():
            cells = []
            for o in online:
                sw = o.get("swaps", [])
                if i >= len(sw) or (key == "load_ms" and not sw[i]["suspend_ms"]):
                    cells.append("-")
                else:
                    cells.append(f"{sw[i][key]:.0f} ms")
            print(f"{f'swap {i + 1}: {label}':34} " + " ".join(f"{c:>15}" for c in cells))
    cells = [f"{o['gap_between_swaps_ms']:.0f} ms" if "gap_between_swaps_ms" in o else "-"
             for o in online]
    print(f"{'longest gap between swaps (merge)':34} " + " ".join(f"{c:>15}" for c in cells))
    c = results.get("dm-clone", {})
    if "restore_to_plain_dest_s" in c:
        print(f"{'restore complete -> app on DEST':34} {'-':>15} "
              f"{c['restore_to_plain_dest_s']:14.2f}s {'-':>15}   (hydration "
              f"{c['hydration_after_restore_s']:.2f} s + cutover "
              f"{c['online']['cutover_total_s']:.2f} s)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="256M")
    ap.add_argument("--file", default="96M")
    ap.add_argument("--runtime", type=float, default=5.0, help="seconds per fio job")
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--no-kernel", action="store_true",
                    help="skip the calibration rows (bare dm linear and snapshot, no dmrecover)")
    ap.add_argument("--cold", action="store_true",
                    help="only the cold read: dm (buffered / O_DIRECT origin loop) vs fuse")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.cold:
        return cold_main(args)
    size, file_size = parse_size(args.size), parse_size(args.file)
    wanted = args.backends.split(",")
    if "dm-clone" in wanted:
        dm.probe(("snapshot", "clone"))
    elif "dm-snapshot" in wanted:
        dm.probe()
    results: dict = {"size": size, "file": file_size, "runtime": args.runtime}
    runs = {"dm-snapshot": run_snapshot, "dm-clone": run_clone, "fuse": run_fuse}
    with tempfile.TemporaryDirectory(prefix="dmr-bench-dm.", dir="/var/tmp") as td:
        tmp = Path(td)
        data = make_image(tmp / "src.img", size, file_size)
        src = MemorySource(data, 1 * MiB)
        base_dev = loop_attach(tmp / "src.img")  # BASE: the image itself, DEST read directly
        base_mnt = tmp / "mnt-base"
        base_mnt.mkdir()
        mount(base_dev, str(base_mnt), "ext4")
        try:
            for name in wanted:
                print(f"{name}:", flush=True)
                results[name] = runs[name](tmp, src, size, file_size, base_mnt, args.runtime)
            if not args.no_kernel and any(w.startswith("dm-") for w in wanted):
                for kind in KERNEL:
                    print(f"{kind} (no dmrecover):", flush=True)
                    try:
                        results[kind] = run_kernel(kind.split("-", 1)[1], tmp, size,
                                                   file_size, base_mnt, args.runtime)
                    except Exception as err:  # a calibration row never costs the table
                        print(f"  {kind} failed: {err}", flush=True)
        finally:
            umount(str(base_mnt))
            loop_detach(base_dev)
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
