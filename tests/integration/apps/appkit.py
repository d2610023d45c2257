"""Shared by the application tests: a live-restore sandbox for any application (start and stop
commands given as strings), the application's cgroup removed at the end, and the checks every
scenario makes (the pseudo-volume mounted, a cold read, DEST mounted after the cutover)."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

from dmrecover import testhooks
from dmrecover.system.mounts import mount_at
from tests.apps import daemon_toy, databases
from tests.apps.livekit import Sandbox

# Seconds the background restorer sleeps per chunk: the application runs during the restore.
SLOW = {"DMRECOVER_TEST_RESTORE_DELAY": "0.06"}


def held_restore(box: Sandbox, env: dict[str, str]) -> tuple[Path, dict[str, str]]:
    """A hold file and env plus the hook that holds the background restore while the file
    exists (testhooks.restore_hold): the database runs on the pseudo-volume, restore not
    done, until the test removes the file, however fast or slow the machine. A slowed restore
    alone raced it: CI saw a MariaDB start (much of InnoDB fetched on demand) outlast the
    restore of the whole volume, the state already "ready"."""
    hold = box.tmp / "restore-hold"
    hold.touch()
    return hold, {**env, testhooks.RESTORE_HOLD_ENV: str(hold)}


class AppSandbox(Sandbox):
    """A Sandbox whose application is given by --app-start/--app-stop strings."""

    def live_restore_app(self, session: str, start: str, stop: str | None, *extra: str,
                         env: dict[str, str] | None = None):
        args = ["--app-start", start] + (["--app-stop", stop] if stop else [])
        return self.cli("live-restore", "--repo", str(self.repo), self.backup_id,
                        str(self.dest), "--mount", str(self.mnt), "--session", session,
                        *args, *extra, env=env)

    def raw_status(self, name: str) -> dict:
        """status.json as the session process wrote it (app tracking, cutover retry)."""
        return json.loads((self.state_root / name / "status.json").read_text())

    def wait_for(self, name: str, check, timeout: float = 120, what: str = "condition"
                 ) -> dict:
        """Poll session.json until check(record) is true."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = self.session(name)
            if check(s):
                return s
            time.sleep(0.1)
        log = (self.state_root / name / "session.log").read_text()[-3000:]
        raise AssertionError(f"session {name}: no {what} within {timeout}s: "
                             f"{self.session(name)}\n{log}")

    def on_pseudo_volume(self) -> bool:
        """True when the mount point holds the pseudo-volume (a loop over the FUSE file in
        the state dir), False when it holds DEST."""
        m = mount_at(str(self.mnt))
        assert m is not None and m.source.startswith("/dev/loop"), m
        backing = Path(f"/sys/block/{os.path.basename(m.source)}/loop/backing_file")
        return backing.read_text().strip() != str(self.dest)

    def cold_read(self, count: int = 4) -> None:
        """Read backed-up files the restore has likely not reached (the last ones) through
        the mount: fetched on demand, and right."""
        from tests.apps.livekit import sha256_file

        names = sorted(self.checksums)
        for rel in names[-count:]:
            assert sha256_file(self.mnt / rel) == self.checksums[rel], rel


# ---------------------------------------------------------------- database volumes

def build_db_volume(scratch: Path, kind: str, size: int, populate) -> tuple[Path, object]:
    """An ext4 image (sparse, `size` bytes) holding a new database cluster of `kind`
    ("postgres" or "mariadb"), populated by populate(db) with the server running, then
    stopped cleanly. The database's socket, pid file and log go to scratch/run (outside the
    volume). Returns (image, db); db.datadir is on the image, as mounted at scratch/src."""
    import subprocess

    from tests.helpers import images

    img = scratch / "src.img"
    with open(img, "wb") as f:
        f.truncate(size)
    images.mkfs(img, "ext4", label="dmrdb")
    src = scratch / "src"
    src.mkdir()
    with images.mounted(img) as m:
        os.chmod(m, 0o755)
        rundir = str(scratch / "run")
        if kind == "postgres":
            db = databases.Postgres.create(str(m), rundir=rundir)
            db.start()
            try:
                populate(db)
            finally:
                db.stop()
        else:
            db = databases.MariaDB.create(str(m), rundir=rundir)
            proc = subprocess.Popen(db.start_argv(), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                db.wait_ready(90)
                populate(db)
            finally:
                databases._run(db.stop_argv(), what="mariadb shutdown", timeout=120)
                proc.wait(120)
    return img, db


def backup_with_cli(box: AppSandbox, image: Path, chunk_size: str = "1M") -> str:
    """A new repository (as the other live-restore tests make it), then `dmrecover backup`
    of image into it; the backup's id."""
    from dmrecover.repository.repo import Repository

    Repository.init(box.repo)
    r = box.cli("backup", str(image), "--repo", str(box.repo), "--name", "db",
                "--chunk-size", chunk_size, "--progress", "plain")
    assert r.returncode == 0, r.stderr
    r = box.cli("list", "--repo", str(box.repo), "--json")
    assert r.returncode == 0, r.stderr
    backups = json.loads(r.stdout)
    items = backups if isinstance(backups, list) else backups.get("backups", [])
    return items[-1]["id"]


def toy_commands(box: AppSandbox, *, ignore_term: bool = False) -> tuple[str, str, Path]:
    """The daemon toy's start and stop commands writing on box.mnt, and its pid file."""
    pidfile = box.appstate / "toy.pid"
    start = daemon_toy.command_string(daemon_toy.start_argv(
        str(box.mnt), str(pidfile), interval=0.05, ignore_term=ignore_term))
    stop = daemon_toy.command_string(daemon_toy.stop_argv(str(pidfile), timeout=30))
    return start, stop, pidfile


def gone(pid: int, timeout: float = 10) -> bool:
    """True once pid has exited (a zombie waiting for PID 1 to reap it counts as gone)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def wait_daemon(pidfile: Path, not_pid: int | None = None, timeout: float = 30) -> int:
    """The pid of the running daemon named in pidfile (other than not_pid)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid = daemon_toy.read_pid(str(pidfile))
        if pid and pid != not_pid and psutil.pid_exists(pid):
            return pid
        time.sleep(0.05)
    raise AssertionError(f"no daemon in {pidfile}")


@contextmanager
def scratch_tree(prefix: str) -> Iterator[Path]:
    """A scratch directory outside pytest's tmp_path (see databases.make_traversable),
    removed with all it holds afterwards."""
    d = Path(databases.scratch_dir(prefix))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def pgbench_while_recording(box: AppSandbox, pg: databases.Postgres,
                            seconds: int) -> tuple[databases.RecordingClient, float]:
    """pgbench for `seconds` while a recording client inserts (record file in box.tmp): the
    benchmark ran and the client committed at least 50 rows. Returns the client, still
    running, and pgbench's tps."""
    client = pg.recording_client(str(box.tmp / "pg-committed.txt")).start()
    tps: list[float] = []
    bench = threading.Thread(target=lambda: tps.append(pg.pgbench(seconds, clients=2)))
    bench.start()
    client.wait_committed(50, timeout=60)
    bench.join(timeout=120)
    assert tps and tps[0] > 0
    return client, tps[0]
