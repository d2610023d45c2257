"""`dmrecover demo`: a live recovery of a sample database volume, end to end, on this machine.

1. builds a sample volume (ext4 or xfs image, default 256 MiB) holding a SQLite database with
   real rows and some files, in a temporary directory under /var/tmp (or --workdir);
2. backs it up into a new repository;
3. makes a fresh, empty destination and live-restores the backup onto it while the sample
   application (dmrecover.demo.sampleapp) answers queries and writes, showing the live status;
4. lets the automatic cutover happen;
5. checks that every byte of the backup's files and every write the application saw
   acknowledged are on the destination, prints the timings, and cleans up.

Exit status 0 only if every check passes.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from dmrecover.errors import DmrecoverError
from dmrecover.system import command
from dmrecover.units import MiB, format_size

XFS_SMALL_ENV = {"TEST_DIR": "1", "TEST_DEV": "1", "QA_CHECK_FS": "1"}  # mkfs.xfs < 300 MB


class DemoFailed(Exception):
    """A check failed (the demo's exit status is 1)."""


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _say(msg: str) -> None:
    print(msg, flush=True)


class Demo:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.size = int(args.size)
        self.fstype = args.fstype
        base = args.workdir or tempfile.mkdtemp(prefix="dmrecover-demo.", dir="/var/tmp")
        self.work = Path(base).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        self.image = self.work / "volume.img"
        self.repo = self.work / "repo"
        self.dest = self.work / "dest.img"
        self.mnt = self.work / "mnt"
        self.appstate = self.work / "app"
        self.state_dir = self.work / "session"
        self.checksums: dict[str, str] = {}
        self.seed_rows = 0
        self.results: dict[str, float | int | str] = {}
        self.tty = sys.stdout.isatty()

    # ------------------------------------------------------------ helpers

    def _mount_tmp(self, image: Path, target: Path, ro: bool = False) -> None:
        from dmrecover.system.mounts import mount

        target.mkdir(parents=True, exist_ok=True)
        opts = ["loop"] + (["ro"] if ro else [])
        mount(str(image), str(target), self.fstype, opts)

    def _umount(self, target: Path) -> None:
        from dmrecover.system.mounts import umount

        umount(str(target))

    # ------------------------------------------------------------ steps

    def build_volume(self) -> None:
        from dmrecover.demo.sampleapp import seed

        _say(f"[1/5] building a {format_size(self.size)} {self.fstype} volume with a SQLite "
             f"database in {self.work}")
        with open(self.image, "wb") as f:
            f.truncate(self.size)
        if self.fstype == "xfs":
            command.run(["mkfs.xfs", "-q", "-f", "-L", "demo", str(self.image)],
                        env=XFS_SMALL_ENV)
        else:
            command.run(["mkfs.ext4", "-q", "-F", "-L", "demo", str(self.image)])
        build = self.work / "build"
        self._mount_tmp(self.image, build)
        try:
            rng = random.Random(1)
            rows = max(1000, self.size // (10 * 1024) // 2)  # ~5% of the volume in rows
            self.seed_rows = seed(str(build), rows=rows)
            (build / "docs").mkdir()
            (build / "blobs").mkdir()
            words = ["restore", "backup", "volume", "overlay", "chunk", "query", "commit"]
            for i in range(20):
                text = "\n".join(" ".join(rng.choices(words, k=10)) for _ in range(2000))
                (build / "docs" / f"doc{i:02d}.txt").write_text(text)
            budget = int(self.size * 0.35)
            i = 0
            while budget > 0:
                n = min(budget, rng.randint(1, 8) * MiB)
                (build / "blobs" / f"blob{i:03d}.bin").write_bytes(rng.randbytes(n))
                budget -= n
                i += 1
            for p in sorted(build.rglob("*")):
                rel = p.relative_to(build).as_posix()
                if p.is_file() and not rel.startswith(("app.db", "lost+found")):
                    self.checksums[rel] = _sha(p)
        finally:
            self._umount(build)
            build.rmdir()
        _say(f"      {self.seed_rows} database rows, {len(self.checksums)} files")

    def backup(self) -> str:
        from dmrecover.progress import NullRenderer
        from dmrecover.repository.backup import backup
        from dmrecover.repository.repo import Repository

        _say("[2/5] backing it up into a new repository")
        repo = Repository.init(self.repo)
        t = time.monotonic()
        manifest = backup(self.image, repo, name="demo", chunk_size=1 * MiB,
                          renderer=NullRenderer())
        _say(f"      backup {manifest.id}: {manifest.chunk_count} chunks of 1 MiB in "
             f"{time.monotonic() - t:.1f} s")
        self.image.unlink()  # the volume is lost; only the backup remains
        return manifest.id

    def live_restore(self, backup_id: str) -> None:
        from dmrecover.demo.sampleapp import query
        from dmrecover.session.session import Session, start_live_restore

        _say("[3/5] the volume is gone; live-restoring it onto a fresh, empty destination")
        with open(self.dest, "wb") as f:
            f.truncate(self.size)
        self.mnt.mkdir(exist_ok=True)
        self.appstate.mkdir(exist_ok=True)
        py = sys.executable
        ns = argparse.Namespace(
            repo=str(self.repo), backup=backup_id, dest=str(self.dest), mount=str(self.mnt),
            app_start=f"{py} -m dmrecover.demo.sampleapp serve --data {self.mnt} "
                      f"--state {self.appstate} --interval 0.01",
            app_stop=f"{py} -m dmrecover.demo.sampleapp stop --state {self.appstate}",
            app_unit=None, backend=self.args.backend, session="demo", cutover="auto",
            overlay=None, state_dir=str(self.state_dir), foreground=False,
            fetch_deadline=600.0, force=False)
        t0 = time.monotonic()
        start_live_restore(ns)
        t_started = time.monotonic() - t0
        while True:
            try:
                rows = query(str(self.appstate), {"op": "count"}, timeout=30)["rows"]
                break
            except OSError:
                if time.monotonic() - t0 > 60:
                    raise DemoFailed("the application did not answer within 60 s") from None
                time.sleep(0.01)
        t_first = time.monotonic() - t0
        self.results.update(live_restore_returned=t_started, first_query=t_first)
        _say(f"      the application answered its first query after {t_first:.2f} s "
             f"({rows} rows) while the restore runs")
        sess = Session.load(None, str(self.state_dir))
        self.watch(sess)

    def watch(self, sess) -> None:
        """Query the application and show the status until the session is done."""
        from dmrecover.demo.sampleapp import query
        from dmrecover.session.status import model, render_rich

        names = sorted(self.checksums)
        rng = random.Random(2)
        answered = failed = 0
        last_plain = 0.0
        live = None
        if self.tty:
            from rich.live import Live

            live = Live(render_rich(model(sess)), refresh_per_second=4)
            live.start()
        try:
            while True:
                sess.data = sess.load(None, sess.state_dir).data
                state = sess.state
                if state in ("done", "failed", "aborted"):
                    break
                try:
                    rel = rng.choice(names)
                    r = query(str(self.appstate), {"op": "sha256", "path": rel}, timeout=30)
                    if r.get("sha256") != self.checksums[rel]:
                        raise DemoFailed(f"the application read wrong data from {rel}")
                    answered += 1
                except OSError:
                    failed += 1  # during the cutover the application is briefly down
                m = model(sess)
                if live is not None:
                    live.update(render_rich(m))
                elif time.monotonic() - last_plain >= 1.0:
                    last_plain = time.monotonic()
                    pct = m["percent"] or 0.0
                    _say(f"      {m['state']:<13} {pct:5.1f}%  {format_size(m['rate'] or 0)}/s"
                         f"  on-demand fetches {m['demand_fetches'] or 0}  overlay "
                         f"{format_size(m['overlay_bytes'] or 0)}  app {m['app']}")
                time.sleep(0.1)
        finally:
            if live is not None:
                live.stop()
        if sess.state != "done":
            raise DemoFailed(f"the session ended {sess.state}: {sess.data.get('error')}")
        t = sess.data.get("timings") or {}
        self.results.update(
            reads_checked=answered,
            restore_time=(t.get("restored") or t.get("cutover_started", 0))
            - t.get("app_started", 0),
            cutover_downtime=t.get("cutover_downtime", 0.0),
            merged_bytes=t.get("merged_bytes", 0))
        st = sess.status() or {}
        stats = st.get("stats") or {}
        self.results.update(demand_fetches=stats.get("demand_fetches") or 0,
                            demand_latency_p99=stats.get("demand_latency_p99") or 0.0)
        _say(f"[4/5] restore complete; cut over to the destination in "
             f"{self.results['cutover_downtime']:.2f} s of application downtime")

    def verify(self) -> None:
        from dmrecover.demo.sampleapp import acknowledged, check_database, query
        from dmrecover.session.session import Session

        _say("[5/5] checking the destination")
        # The application now runs on DEST; it must answer and keep writing.
        deadline = time.monotonic() + 30
        while True:
            try:
                before = query(str(self.appstate), {"op": "count"})["rows"]
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise DemoFailed("the application does not answer after the cutover") \
                        from None
                time.sleep(0.05)
        time.sleep(0.3)
        if query(str(self.appstate), {"op": "count"})["rows"] <= before:
            raise DemoFailed("the application does not write after the cutover")
        sess = Session.load(None, str(self.state_dir))
        app = sess.application()
        app.stop()
        if app.processes():
            raise DemoFailed("the application did not stop")
        self._umount(self.mnt)
        acks = acknowledged(str(self.appstate))
        check = self.work / "check"
        self._mount_tmp(self.dest, check, ro=True)
        try:
            bad = [rel for rel, digest in self.checksums.items()
                   if not (check / rel).is_file() or _sha(check / rel) != digest]
            rows, problems = check_database(str(check / "app.db"), acks)
        finally:
            self._umount(check)
            check.rmdir()
        if bad:
            raise DemoFailed(f"{len(bad)} file(s) differ on the destination, e.g. {bad[0]}")
        if problems:
            raise DemoFailed(f"database check: {problems[0]} ({len(problems)} problems)")
        seeded = self.seed_rows
        if rows < seeded + len(acks):
            raise DemoFailed(f"the database has {rows} rows, expected at least "
                             f"{seeded + len(acks)}")
        self.results.update(files_checked=len(self.checksums), acknowledged_writes=len(acks),
                            rows=rows)
        _say(f"      all {len(self.checksums)} files identical, {seeded} seed rows and all "
             f"{len(acks)} acknowledged writes present")

    def summary(self) -> None:
        r = self.results
        lines = [
            ("volume", f"{format_size(self.size)} {self.fstype}"),
            ("time to first query answered", f"{r['first_query']:.2f} s"),
            ("live-restore command returned after", f"{r['live_restore_returned']:.2f} s"),
            ("restore time (app running meanwhile)", f"{r['restore_time']:.2f} s"),
            ("cutover downtime", f"{r['cutover_downtime']:.2f} s"),
            ("overlay merged into the destination", format_size(r["merged_bytes"])),
            ("on-demand fetches (p99 latency)",
             f"{r['demand_fetches']} ({r['demand_latency_p99'] * 1000:.1f} ms)"),
            ("reads checked during the restore", str(r["reads_checked"])),
            ("acknowledged writes verified", str(r["acknowledged_writes"])),
            ("files verified byte for byte", str(r["files_checked"])),
        ]
        _say("")
        _say("demo passed")
        w = max(len(k) for k, _ in lines)
        for k, v in lines:
            _say(f"  {k:<{w}}  {v}")

    def cleanup(self) -> None:
        """Take down whatever is left (the app, mounts, loops under the work dir)."""
        from dmrecover.session.session import Session
        from dmrecover.system.mounts import mounts

        try:
            sess = Session.load(None, str(self.state_dir))
            if sess.alive():
                from dmrecover.session.session import abort_session

                try:
                    abort_session("demo", state_dir=str(self.state_dir))
                except DmrecoverError:
                    pass
            sess.application().stop(timeout=10)
        except DmrecoverError:
            pass
        root = str(self.work) + "/"
        for m in reversed(mounts()):
            if m.target.startswith(root):
                command.run(["umount", "-l", m.target], check=False)
        for dev in Path("/sys/block").glob("loop*"):
            try:
                b = (dev / "loop" / "backing_file").read_text().strip()
            except OSError:
                continue
            if b.startswith(root):
                command.run(["losetup", "-d", f"/dev/{dev.name}"], check=False)
        if not self.args.keep:
            shutil.rmtree(self.work, ignore_errors=True)
        else:
            _say(f"kept {self.work}")


def run_demo(args: argparse.Namespace) -> int:
    """The demo; 0 only if every check passed."""
    from dmrecover.session.session import choose_backend

    choose_backend(args.backend)  # one-line error before anything is built
    if args.size < 64 * MiB:
        from dmrecover.errors import UsageError

        raise UsageError("--size must be at least 64M")
    demo = Demo(args)
    t = time.monotonic()
    try:
        demo.build_volume()
        backup_id = demo.backup()
        demo.live_restore(backup_id)
        demo.verify()
        demo.summary()
        _say(f"  {'total demo time':<37} {time.monotonic() - t:.1f} s")
        return 0
    except DemoFailed as err:
        print(f"dmrecover demo: FAILED: {err}", file=sys.stderr)
        return 1
    finally:
        demo.cleanup()
