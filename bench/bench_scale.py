#!/usr/bin/env python3
"""Live restore at scale: RTO and memory by volume size, and the background restore under an
application load, against the offline restore of the same backup (root).

    .venv/bin/python bench/bench_scale.py [--sizes 1G,8G,64G,1T] [--live-size 8G,32G]
                                          [--live-data 2G] [--live-repeat N]
                                          [--busy-reads 1,none] [--json FILE]

Each size: a sparse ext4 image with data scattered through it (min(size/8, 1 GiB) of random
4 MiB pieces at random offsets of one sparse file), backed up with 4 MiB chunks (the backup
skips holes). Then, in a child process (its peak RSS is the session's): the engine, the FUSE
file, a loop device (direct I/O) and the ext4 mount over a sparse DEST of the full size, and
the first application write made durable (write + fsync of a new file): the RTO is the time
from the start of the child's setup to that fsync's return. The background restore then runs
for at most --restore-limit seconds; VmHWM is read at the end.

DEST is a sparse file on the host's filesystem, not preallocated: `dmrecover live-restore`
fallocates a file DEST in full, which a 1 TiB DEST cannot have on this host's 252 GiB disk.

--live-size: the same stack with an application load (fio, its own process: 4 KiB O_DIRECT
random reads of the data file and 4 KiB writes with an fsync every 32 into another, without
pause) while the background restore runs: samples every 0.5 s of the restore rate, the
application's IOPS and its read latency, to completion; the offline restore of the same
backup (dmrecover's restore, the page cache dropped first like before the live restore) is
timed in the same run for the ratio, and the repository's
chunk read time (RepositorySource.read_chunk, page cache dropped) for the on-demand latency's
goal. Then two tables say where an on-demand read's time went: the engine's stages
(Fetcher.demand_breakdown: lock, waiting for a fetch of the chunk in flight, the source's
read, its CPU time, the DEST write in the reader) and the chunk reads' stages, on-demand and
background apart (TimedSource: the storage read, decrypt/decompress/verify, the thread's CPU
time, its wait for a CPU from /proc/thread-self/schedstat, and the rest: blocked on the disk
or a lock, the GIL included). BENCH_RESTORE_WORKERS sets the restorer's pool (experiments).

--live-repeat N: the live restore runs N times over the same backup (page cache dropped
before each, the offline restore timed once): one run has only a few dozen on-demand fetches,
so its p99 is its worst sample or next to it; the summary also gives the p99 of every run's
samples pooled. --busy-reads: the engine's background reads in flight at most while on-demand
reads are busy (PseudoVolume busy_reads; "none": no limit; a "-rt" suffix: on-demand fetches
at nice -10, not SCHED_RR, PseudoVolume demand_rt=False; ":N": the gate's hold, N ms;
"before": "none-rt", the engine before both), a comma
list cycled through the repeats, so that settings compared run interleaved, minutes apart,
over one backup.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import drop_cache  # noqa: E402

from dmrecover.system import command  # noqa: E402
from dmrecover.units import format_size, parse_size  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
CS = 4 * MiB
PIECE = 4 * MiB


def build(tmp: Path, size: int, data: int) -> Path:
    """A sparse ext4 image of `size` with `data` bytes of random pieces in data.bin."""
    from dmrecover.system.loops import attach, detach

    img = tmp / f"src-{size}.img"
    with open(img, "wb") as f:
        f.truncate(size)
    command.run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=1,lazy_journal_init=1",
                 str(img)], timeout=1800)
    dev = attach(str(img))
    mnt = Path(tempfile.mkdtemp(prefix="dmr-scale-mnt."))
    try:
        command.run(["mount", "-o", "noinit_itable", dev, str(mnt)])
        try:
            span = int(size * 0.8) // PIECE
            rnd = random.Random(size)
            with open(mnt / "data.bin", "wb") as f:
                f.truncate(span * PIECE)
                for k in sorted(rnd.sample(range(span), max(1, data // PIECE))):
                    f.seek(k * PIECE)
                    f.write(rnd.randbytes(PIECE))
                f.flush()
                os.fsync(f.fileno())
        finally:
            command.run(["umount", str(mnt)], timeout=600)
    finally:
        detach(dev)
        mnt.rmdir()
    return img


def _schedstat() -> tuple[float, float]:
    """(seconds on a CPU, seconds runnable but waiting for one) of the calling thread."""
    with open("/proc/thread-self/schedstat") as f:
        run, wait, _ = f.read().split()
    return int(run) / 1e9, int(wait) / 1e9


class TimedSource:
    """A ChunkSource wrapping another, timing each read_chunk stage by stage per kind of
    thread (the restorer's or another: an on-demand read): the storage read (get), the rest
    (decrypt, decompress, verify), and of the whole the thread's CPU time and its wait for a
    CPU (run queue; the rest of the wall time is blocked: disk, locks)."""

    def __init__(self, source: Any) -> None:
        from dmrecover.engine.restorer import THREAD_NAME

        self._source = source
        self._restorer = THREAD_NAME
        self.size, self.chunk_size = source.size, source.chunk_size
        self.chunk_count = source.chunk_count
        self.samples: dict[str, list[dict[str, float]]] = {"demand": [], "background": []}
        self._local = threading.local()
        storage = source.repo.storage
        get = storage.get

        def timed_get(key: str, max_size: int | None = None) -> bytes:
            t = time.perf_counter()
            try:
                return get(key, max_size)
            finally:
                self._local.get = time.perf_counter() - t

        storage.get = timed_get  # instance attribute: this process's repository only

    def is_zero(self, index: int) -> bool:
        return self._source.is_zero(index)

    def read_chunk(self, index: int) -> bytes:
        self._local.get = 0.0
        run0, wait0 = _schedstat()
        t = time.perf_counter()
        data = self._source.read_chunk(index)
        wall = time.perf_counter() - t
        run1, wait1 = _schedstat()
        kind = ("background" if threading.current_thread().name == self._restorer
                else "demand")
        self.samples[kind].append({"wall": wall, "get": self._local.get,
                                   "decode": wall - self._local.get, "cpu": run1 - run0,
                                   "runq": wait1 - wait0,
                                   "blocked": wall - (run1 - run0) - (wait1 - wait0)})
        return data

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for kind, rows in self.samples.items():
            entry: dict[str, Any] = {"count": len(rows)}
            for name in ("wall", "get", "decode", "cpu", "runq", "blocked"):
                vals = sorted(r[name] for r in rows)
                if vals:
                    entry[name] = {"mean": sum(vals) / len(vals),
                                   "p50": vals[len(vals) // 2],
                                   "p99": vals[min(len(vals) - 1, int(0.99 * len(vals)))]}
            out[kind] = entry
        return out


def child(args: argparse.Namespace) -> int:
    """One live restore in this process; prints a JSON line."""
    t0 = time.monotonic()
    from dmrecover.backends.fuse.server import FuseServer
    from dmrecover.backends.fuse.stack import FuseStack
    from dmrecover.engine.pseudovolume import PseudoVolume
    from dmrecover.repository.repo import Repository
    from dmrecover.repository.source import RepositorySource
    from dmrecover.system.loops import attach, detach

    tmp = Path(args.tmp)
    repo = Repository.open(args.repo)
    manifest = repo.manifest(args.backup)
    source = TimedSource(RepositorySource(repo, manifest))
    dest = tmp / "dest.img"
    with open(dest, "wb") as f:
        f.truncate(source.size)
    spec, _, hold = args.busy_reads.partition(":")
    if spec == "before":
        spec = "none-rt"
    busy = spec.removesuffix("+rt").removesuffix("-rt")
    pv = PseudoVolume(source, dest, tmp / "state",
                      busy_reads=None if busy == "none" else int(busy),
                      demand_rt=not spec.endswith("-rt"))
    if hold:
        pv.fetcher.gate.hold = float(hold) / 1000
    srv = FuseServer(pv, tmp / "fuse")
    srv.start()
    loop = attach(str(srv.path), direct_io=FuseStack.loop_direct_io)  # as the stack does
    mnt = tmp / "mnt"
    mnt.mkdir(exist_ok=True)
    out: dict[str, Any] = {}
    try:
        command.run(["mount", "-o", "noinit_itable", loop, str(mnt)], timeout=600)
        try:
            workers = os.environ.get("BENCH_RESTORE_WORKERS")  # experiments: pool size
            pv.start_restore(int(workers) if workers else None)
            fd = os.open(mnt / "first-write", os.O_WRONLY | os.O_CREAT, 0o600)
            os.write(fd, b"x" * 4096)
            os.fsync(fd)
            os.close(fd)
            out["rto"] = time.monotonic() - t0
            restore_started = time.monotonic()
            if args.load:
                out["load"] = app_load(pv, mnt, restore_started, args.restore_limit)
            done = pv.wait_restored(args.restore_limit - (time.monotonic() - restore_started))
            out["restored"] = done
            out["restore_seconds"] = time.monotonic() - restore_started
            r = pv.restorer
            if done and r is not None and r.completed_at is not None and r.started:
                # the restorer's own times: the load's loop above sees the end only at its
                # next 0.5 s sample, which quantised a 5 s restore's ratio by 10%
                out["restore_seconds"] = r.completed_at - r.started
            st = pv.stats()
            out["stats"] = {k: v for k, v in st.items()
                            if isinstance(v, (int, float, type(None)))}
            out["restorer_error"] = st.get("restorer_error")
            out["demand_breakdown"] = pv.fetcher.demand_breakdown()
            out["chunk_read_breakdown"] = source.summary()
        finally:
            pv.stop_restore()
            command.run(["umount", str(mnt)], timeout=600)
    finally:
        detach(loop)
        stop_server(srv)
        pv.close()
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                out["peak_rss"] = int(line.split()[1]) * 1024
    out["ru_maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(out))
    return 0


def stop_server(srv: Any, timeout: float = 30.0) -> None:
    """srv.stop(), retried while the detached loop still shows in sysfs (its release is
    asynchronous while something, udev's probe say, holds it open)."""
    from dmrecover.errors import StackError

    deadline = time.monotonic() + timeout
    while True:
        try:
            srv.stop()
            return
        except StackError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def app_load(pv: Any, mnt: Path, t0: float, limit: float) -> dict[str, Any]:
    """fio as the application (its own process, like a real one): 4 KiB O_DIRECT random reads
    of data.bin and 4 KiB random writes with an fsync every 32 into app.bin, until the restore
    completes; restore rate sampled every 0.5 s here, fio's IOPS and latency logged per 0.5 s."""
    logs = mnt.parent / "fio"
    logs.mkdir(exist_ok=True)
    argv = ["fio", "--output-format=json", "--time_based", f"--runtime={int(limit)}",
            "--log_avg_msec=500", f"--write_iops_log={logs}/app", f"--write_lat_log={logs}/app",
            "--norandommap", "--randrepeat=0",
            "--name=reader", f"--filename={mnt / 'data.bin'}", "--rw=randread", "--bs=4k",
            "--direct=1", "--ioengine=psync",
            "--name=writer", f"--filename={mnt / 'app.bin'}", "--size=64M", "--rw=randwrite",
            "--bs=4k", "--ioengine=psync", "--fsync=32"]
    fio = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    series = []
    last = pv.stats()["restored_bytes"]
    last_t = time.monotonic()
    while not pv.restored_all() and time.monotonic() - t0 < limit and fio.poll() is None:
        time.sleep(0.5)
        now = time.monotonic()
        rb = pv.stats()["restored_bytes"]
        series.append({"t": now - t0, "restore_rate": (rb - last) / (now - last_t)})
        last, last_t = rb, now
    fio.send_signal(2)
    out, err = fio.communicate(timeout=120)
    jobs = json.loads(out[out.index("{"):])["jobs"]
    rd = jobs[0]["read"]
    pct = rd["clat_ns"].get("percentile", {})
    return {"restore": series,
            "app_iops": _fio_log(logs / "app_iops.1.log", 1.0) + [],
            "app_write_iops": _fio_log(logs / "app_iops.2.log", 1.0),
            "app_read_lat": _fio_log(logs / "app_clat.1.log", 1e-9),
            "app_read_p50": pct.get("50.000000", 0) / 1e9,
            "app_read_p99": pct.get("99.000000", 0) / 1e9,
            "app_read_iops": rd["iops"], "app_write_total_iops": jobs[1]["write"]["iops"]}


def _fio_log(path: Path, scale: float) -> list[tuple[float, float]]:
    """(seconds, value) pairs of a fio log (time in ms)."""
    out = []
    try:
        for line in path.read_text().splitlines():
            f = line.split(",")
            out.append((int(f[0]) / 1000, int(f[1]) * scale))
    except FileNotFoundError:
        pass
    return out


def run_child(tmp: Path, repo: Path, backup_id: str, limit: float, load: bool,
              busy_reads: str = "none") -> dict:
    work = tmp / "child"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    argv = [sys.executable, __file__, "--child", "--tmp", str(work), "--repo", str(repo),
            "--backup", backup_id, "--restore-limit", str(limit),
            "--busy-reads", busy_reads] + (["--load"] if load else [])
    r = subprocess.run(argv, capture_output=True, text=True, timeout=limit + 1800)
    if r.returncode != 0:
        raise SystemExit(f"child failed: {r.stderr.strip()[-2000:]}")
    shutil.rmtree(work, ignore_errors=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def drop_page_cache() -> None:
    """Write back and drop the whole page cache (clean pages only are dropped)."""
    command.run(["sync"])
    Path("/proc/sys/vm/drop_caches").write_text("1\n")


def chunk_read_time(repo: Any, manifest: Any, src: Path, count: int = 40) -> float:
    """Median seconds of one chunk read (repository's files' page cache dropped)."""
    from dmrecover.repository.source import RepositorySource

    rs = RepositorySource(repo, manifest)
    idx = [i for i, d in enumerate(manifest.chunks) if d is not None]
    random.Random(3).shuffle(idx)
    drop_page_cache()
    times = []
    for i in idx[:count]:
        t = time.perf_counter()
        rs.read_chunk(i)
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


def print_breakdown(r: dict[str, Any]) -> None:
    """The on-demand fetches' stages and the chunk reads' stages, as Markdown tables (ms)."""
    print("| on-demand fetch | count | total p50/p99 | lock | wait (shared fetch) | read | "
          "read CPU | write DEST |\n|---|---|---|---|---|---|---|---|")
    for kind, e in r["demand_breakdown"].items():
        if kind in ("slowest", "totals") or not e["count"]:
            continue
        cells = " | ".join(f"{e[n]['p50'] * 1e3:.1f}/{e[n]['p99'] * 1e3:.1f}"
                           for n in ("total", "lock", "wait", "read", "read_cpu", "write"))
        print(f"| {kind} | {e['count']} | {cells} |")
    print("| chunk read (p50/p99) | count | wall | storage get | decode+verify | CPU | "
          "run queue | blocked |\n|---|---|---|---|---|---|---|---|")
    for kind, e in r["chunk_read_breakdown"].items():
        if not e["count"]:
            continue
        cells = " | ".join(f"{e[n]['p50'] * 1e3:.1f}/{e[n]['p99'] * 1e3:.1f}"
                           for n in ("wall", "get", "decode", "cpu", "runq", "blocked"))
        print(f"| {kind} | {e['count']} | {cells} |")
    print(flush=True)


def print_repeats(runs: list[dict[str, Any]]) -> None:
    """Per busy_reads setting: every run's p99 / chunk read and background / offline ratio,
    and the p99 of all its runs' on-demand fetches pooled (Markdown)."""
    print("| busy_reads | runs | on-demand fetches | p99 / chunk read, each run | pooled p99 "
          "| background / offline, each run |\n|---|---|---|---|---|---|")
    for busy in dict.fromkeys(r["busy_reads"] for r in runs):
        mine = [r for r in runs if r["busy_reads"] == busy]
        chunk = mine[0]["chunk_read_seconds"]
        pooled = sorted(t for r in mine for t in r["demand_breakdown"]["totals"])
        p99 = pooled[min(len(pooled) - 1, int(0.99 * len(pooled)))] if pooled else 0.0
        each = ", ".join(f"{(r['stats'].get('demand_latency_p99') or 0) / chunk:.1f}x"
                         for r in mine)
        bg = ", ".join(f"{r['ratio'] or 0:.2f}x" for r in mine)
        print(f"| {busy} | {len(mine)} | {len(pooled)} | {each} | {p99 * 1e3:.1f} ms "
              f"({p99 / chunk:.1f}x) | {bg} |")
    print(flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1G,8G,64G,1T")
    ap.add_argument("--live-size", default="8G,32G")
    ap.add_argument("--live-data", default="2G")
    ap.add_argument("--live-repeat", type=int, default=1)
    ap.add_argument("--busy-reads", default="none")
    ap.add_argument("--restore-limit", type=float, default=600.0)
    ap.add_argument("--json")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--load", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tmp", help=argparse.SUPPRESS)
    ap.add_argument("--repo", help=argparse.SUPPRESS)
    ap.add_argument("--backup", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args)
    if os.geteuid() != 0:
        raise SystemExit("bench_scale.py needs root (loop devices, mounts, FUSE)")
    from dmrecover.repository.backup import backup
    from dmrecover.repository.repo import Repository
    from dmrecover.repository.restore import restore

    tmp = Path(tempfile.mkdtemp(prefix="dmr-scale.", dir="/var/tmp"))
    results: dict[str, Any] = {"scale": [], "live": []}
    try:
        repo_path = tmp / "repo"
        repo = Repository.init(repo_path)
        plan = [(parse_size(s), False) for s in args.sizes.split(",") if s]
        plan += [(parse_size(s), True) for s in args.live_size.split(",") if s]
        for size, load in plan:
            data = min(parse_size(args.live_data), size // 4) if load else min(size // 8, GiB)
            img = build(tmp, size, data)
            t = time.monotonic()
            m = backup(img, repo, chunk_size=CS)
            backup_s = time.monotonic() - t
            if load:
                # The live restore reads the repository from its disk (chunk_read_time drops
                # the page cache before it): so does the offline restore it is compared to,
                # not from the cache the backup just filled.
                drop_cache(img)
                drop_page_cache()
                off = tmp / "offline.img"
                t = time.monotonic()
                restore(repo, m, off)
                offline_s = time.monotonic() - t
                off.unlink()
                chunk_s = chunk_read_time(repo, m, img)
                img.unlink()
                settings = args.busy_reads.split(",")
                for k in range(args.live_repeat):
                    busy = settings[k % len(settings)]
                    drop_page_cache()  # the previous run's chunks: read from the disk again
                    r = run_child(tmp, repo_path, m.id, args.restore_limit, True, busy)
                    r.update(size=size, data=data, offline_seconds=offline_s,
                             chunk_read_seconds=chunk_s, busy_reads=busy, repeat=k,
                             ratio=offline_s / r["restore_seconds"] if r["restored"] else None)
                    results["live"].append(r)
                    p99 = r["stats"].get("demand_latency_p99") or 0
                    print(f"live {format_size(size)} ({format_size(data)} data), busy_reads "
                          f"{busy}, run {k + 1}: background restore {r['restore_seconds']:.1f} "
                          f"s vs offline {offline_s:.1f} s ({r['ratio'] or 0:.2f}x), "
                          f"{r['stats'].get('demand_fetches')} on-demand fetches, p99 "
                          f"{p99 * 1e3:.1f} ms vs chunk read {chunk_s * 1e3:.1f} ms "
                          f"({p99 / chunk_s:.1f}x), peak RSS {format_size(r['peak_rss'])}",
                          flush=True)
                    print_breakdown(r)
                if args.live_repeat > 1:
                    print_repeats([r for r in results["live"] if r["size"] == size])
            else:
                img.unlink()
                r = run_child(tmp, repo_path, m.id, args.restore_limit, False)
                r.update(size=size, data=data, backup_seconds=backup_s)
                results["scale"].append(r)
                print(f"{format_size(size):>9}: RTO {r['rto']:.2f} s, peak RSS "
                      f"{format_size(r['peak_rss'])}, backup {backup_s:.1f} s, restore "
                      f"{'done' if r['restored'] else 'not done'} in "
                      f"{r['restore_seconds']:.0f} s {r.get('restorer_error') or ''}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
