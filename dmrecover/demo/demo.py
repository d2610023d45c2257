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

import random
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from dmrecover.backends import registry
from dmrecover.demo.sampleapp import acknowledged, check_database, query, seed
from dmrecover.demo.volume import build_sample_volume, file_digest, mounted_image
from dmrecover.errors import DmrecoverError, StackError, UsageError
from dmrecover.progress import NullRenderer
from dmrecover.repository.backup import backup
from dmrecover.repository.repo import Repository
from dmrecover.session.app import AppSpec
from dmrecover.session.control import abort_session, load_session
from dmrecover.session.record import SessionRecord, State
from dmrecover.session.start import LiveRestoreRequest, start_live_restore
from dmrecover.session.status import model
from dmrecover.system import loops
from dmrecover.system.mounts import mounts, umount
from dmrecover.units import MiB, format_size

MIN_SIZE = 64 * MiB  # the sample data and xfs need room
SESSION = "demo"
FINAL_STATES = (State.DONE, State.FAILED, State.ABORTED)


@dataclass(frozen=True)
class DemoOptions:
    """What `dmrecover demo` was asked for."""

    size: int = 256 * MiB
    fstype: str = "ext4"
    backend: str = registry.AUTO
    workdir: str | None = None  # default: a new directory under /var/tmp
    keep: bool = False  # keep the work directory


class StatusView(Protocol):
    """A live display of session status models (the CLI's, on a TTY)."""

    def __enter__(self) -> StatusView: ...
    def __exit__(self, *exc: object) -> None: ...
    def update(self, models: Sequence[dict]) -> None: ...


class DemoFailed(Exception):
    """A check failed (the demo's exit status is 1)."""


def _say(msg: str) -> None:
    print(msg, flush=True)


def _line(m: dict) -> str:
    """One progress line, every second where there is no live display."""
    return (f"      {m['state']:<13} {m['percent'] or 0.0:5.1f}%  "
            f"{format_size(m['rate'] or 0)}/s  on-demand fetches {m['demand_fetches'] or 0}  "
            f"overlay {format_size(m['overlay_bytes'] or 0)}  app {m['app']}")


class Demo:
    """The demo's steps, in order; `cleanup` takes down whatever is left. This class runs the
    sample application; a subclass overrides the application's hooks (`_fill`, `app_spec`,
    `first_answer`, `probe`, `check_app_after_cutover`, `verify_data`)."""

    app_title = "a SQLite database"
    min_size = MIN_SIZE
    first_answer_timeout = 60.0  # seconds from live-restore to the application's first answer

    def __init__(self, options: DemoOptions, view: StatusView | None = None) -> None:
        self.options = options
        self.view = view
        self.size = options.size
        self.fstype = options.fstype
        base = options.workdir or tempfile.mkdtemp(prefix="dmrecover-demo.", dir="/var/tmp")
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

    # ------------------------------------------------------------ steps

    def _fill(self, mnt: Path) -> None:
        """The sample data: a SQLite database, text documents, random blobs (~40%)."""
        rng = random.Random(1)
        rows = max(1000, self.size // (10 * 1024) // 2)  # ~5% of the volume in rows
        self.seed_rows = seed(str(mnt), rows=rows)
        (mnt / "docs").mkdir()
        (mnt / "blobs").mkdir()
        words = ["restore", "backup", "volume", "overlay", "chunk", "query", "commit"]
        for i in range(20):
            text = "\n".join(" ".join(rng.choices(words, k=10)) for _ in range(2000))
            (mnt / "docs" / f"doc{i:02d}.txt").write_text(text)
        budget = int(self.size * 0.35)
        i = 0
        while budget > 0:
            n = min(budget, rng.randint(1, 8) * MiB)
            (mnt / "blobs" / f"blob{i:03d}.bin").write_bytes(rng.randbytes(n))
            budget -= n
            i += 1
        for p in sorted(mnt.rglob("*")):
            rel = p.relative_to(mnt).as_posix()
            if p.is_file() and not rel.startswith(("app.db", "lost+found")):
                self.checksums[rel] = file_digest(p)

    def build_volume(self) -> None:
        _say(f"[1/5] building a {format_size(self.size)} {self.fstype} volume with "
             f"{self.app_title} in {self.work}")
        build_sample_volume(self.image, self.size, self._fill, fstype=self.fstype,
                            label="demo")
        _say(f"      {self.seed_rows} database rows, {len(self.checksums)} files")

    # ------------------------------------------------------------ the application's hooks

    def app_spec(self) -> AppSpec:
        """How the session starts and stops the application."""
        self.appstate.mkdir(exist_ok=True)
        py = sys.executable
        return AppSpec(
            start=f"{py} -m dmrecover.demo.sampleapp serve --data {self.mnt} "
                  f"--state {self.appstate} --interval 0.01",
            stop=f"{py} -m dmrecover.demo.sampleapp stop --state {self.appstate}")

    def first_answer(self) -> str:
        """Ask the application its first question; what it answered (OSError while it is not
        up yet)."""
        rows = query(str(self.appstate), {"op": "count"}, timeout=30)["rows"]
        return f"{rows} rows"

    def probe(self, rng: random.Random) -> None:
        """One check through the application while the session runs (OSError when it is down
        for the cutover; DemoFailed on a wrong answer)."""
        rel = rng.choice(sorted(self.checksums))
        r = query(str(self.appstate), {"op": "sha256", "path": rel}, timeout=30)
        if r.get("sha256") != self.checksums[rel]:
            raise DemoFailed(f"the application read wrong data from {rel}")

    def check_app_after_cutover(self) -> None:
        """The application runs on DEST now: it must answer and keep writing."""
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

    def verify_data(self, check: Path) -> None:
        """With DEST mounted read-only at `check` (the application stopped): its database
        holds every acknowledged write."""
        acks = acknowledged(str(self.appstate))
        rows, problems = check_database(str(check / "app.db"), acks)
        if problems:
            raise DemoFailed(f"database check: {problems[0]} ({len(problems)} problems)")
        seeded = self.seed_rows
        if rows < seeded + len(acks):
            raise DemoFailed(f"the database has {rows} rows, expected at least "
                             f"{seeded + len(acks)}")
        self.results.update(acknowledged_writes=len(acks), rows=rows)
        _say(f"      {seeded} seed rows and all {len(acks)} acknowledged writes present")

    def extra_summary(self) -> list[tuple[str, str]]:
        return [("reads checked during the restore", str(self.results["reads_checked"])),
                ("acknowledged writes verified", str(self.results["acknowledged_writes"]))]

    # ------------------------------------------------------------ the live restore

    def backup(self) -> str:
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
        _say("[3/5] the volume is gone; live-restoring it onto a fresh, empty destination")
        with open(self.dest, "wb") as f:
            f.truncate(self.size)
        self.mnt.mkdir(exist_ok=True)
        app = self.app_spec()
        req = LiveRestoreRequest(repo=str(self.repo), backup=backup_id, dest=str(self.dest),
                                 mountpoint=str(self.mnt), app=app, session=SESSION,
                                 state_dir=str(self.state_dir), backend=self.options.backend)
        t0 = time.monotonic()
        record = start_live_restore(req)
        t_started = time.monotonic() - t0
        while True:
            try:
                answer = self.first_answer()
                break
            except OSError:
                if time.monotonic() - t0 > self.first_answer_timeout:
                    raise DemoFailed(f"the application did not answer within "
                                     f"{self.first_answer_timeout:g} s") from None
                time.sleep(0.01)
        t_first = time.monotonic() - t0
        self.results.update(live_restore_returned=t_started, first_query=t_first)
        _say(f"      the application answered its first query after {t_first:.2f} s "
             f"({answer}) while the restore runs")
        self.watch(record)

    def _check_reads(self, record: SessionRecord) -> SessionRecord:
        """Read files through the application until the session ends; count the answers."""
        rng = random.Random(2)
        answered = failed = 0
        last_line = 0.0
        while (record := record.reload()).state not in FINAL_STATES:
            try:
                self.probe(rng)
                answered += 1
            except OSError:
                failed += 1  # during the cutover the application is briefly down
            m = model(record)
            if self.view is not None:
                self.view.update([m])
            elif time.monotonic() - last_line >= 1.0:
                last_line = time.monotonic()
                _say(_line(m))
            time.sleep(0.1)
        self.results["reads_checked"] = answered
        return record

    def watch(self, record: SessionRecord) -> None:
        """Query the application and show the status until the session is done."""
        if self.view is not None:
            with self.view:
                record = self._check_reads(record)
        else:
            record = self._check_reads(record)
        if record.state != State.DONE:
            raise DemoFailed(f"the session ended {record.state}: {record.error}")
        t = record.timings
        self.results.update(
            restore_time=(t.get("restored") or t.get("cutover_started", 0))
            - t.get("app_started", 0),
            cutover_downtime=t.get("cutover_downtime", 0.0),
            merged_bytes=t.get("merged_bytes", 0))
        stats = (record.status() or {}).get("stats") or {}
        self.results.update(demand_fetches=stats.get("demand_fetches") or 0,
                            demand_latency_p99=stats.get("demand_latency_p99") or 0.0)
        _say(f"[4/5] restore complete; cut over to the destination in "
             f"{self.results['cutover_downtime']:.2f} s of application downtime")

    def verify(self) -> None:
        _say("[5/5] checking the destination")
        self.check_app_after_cutover()
        app = load_session(None, str(self.state_dir)).application()
        app.stop()
        if app.processes():
            raise DemoFailed("the application did not stop")
        app.release()  # its (now empty) cgroup
        umount(str(self.mnt))
        with mounted_image(self.dest, self.fstype, read_only=True) as check:
            bad = [rel for rel, digest in self.checksums.items()
                   if not (check / rel).is_file() or file_digest(check / rel) != digest]
            if bad:
                raise DemoFailed(f"{len(bad)} file(s) differ on the destination, e.g. "
                                 f"{bad[0]}")
            _say(f"      all {len(self.checksums)} files identical")
            self.verify_data(check)
        self.results.update(files_checked=len(self.checksums))

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
            *self.extra_summary(),
            ("files verified byte for byte", str(r["files_checked"])),
        ]
        _say("")
        _say("demo passed")
        w = max(len(k) for k, _ in lines)
        for k, v in lines:
            _say(f"  {k:<{w}}  {v}")

    def cleanup(self) -> None:
        """Take down whatever is left (the session, the app, mounts and loops under the work
        dir), then remove the work dir unless asked to keep it."""
        try:
            record = load_session(None, str(self.state_dir))
            if record.alive():
                try:
                    abort_session(SESSION, state_dir=str(self.state_dir))
                except DmrecoverError:
                    pass
            app = record.application()
            app.stop(timeout=10)
            app.release()
        except DmrecoverError:
            pass
        root = str(self.work) + "/"
        for m in reversed(mounts()):
            if m.target.startswith(root):
                try:
                    umount(m.target, lazy=True)
                except StackError:
                    pass
        for dev, _backing in loops.loops_backed_under(self.work):
            try:
                loops.detach(dev)
            except StackError:
                pass
        if not self.options.keep:
            shutil.rmtree(self.work, ignore_errors=True)
        else:
            _say(f"kept {self.work}")


def run_demo(options: DemoOptions, view: StatusView | None = None,
             demo_class: type[Demo] = Demo) -> int:
    """The demo; 0 only if every check passed. `view`: a live status display (else one plain
    line a second). `demo_class`: the application (Demo: the sample app; pgdemo.PostgresDemo)."""
    registry.choose(options.backend)  # one-line error before anything is built
    if options.size < demo_class.min_size:
        raise UsageError(f"--size must be at least {format_size(demo_class.min_size)}")
    demo = demo_class(options, view)
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
