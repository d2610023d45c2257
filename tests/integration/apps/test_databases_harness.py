"""The database harness on its own (no dmrecover): PostgreSQL 15 and MariaDB on a plain
temporary directory, started with the harness's own start/stop commands inside an AppCgroup.

Proves what the data agent relies on: every process of the database is inside the cgroup
(pg_ctl daemonizes the postmaster into its own session; mariadbd-safe forks mariadbd), the
cgroup empties when the stop command returns, the recording client's committed inserts all
survive a stop/start, and the integrity checks are clean."""

from __future__ import annotations

import os
import shlex
import shutil
import time
import uuid
from collections.abc import Callable, Iterator

import pytest

from dmrecover.system import cgroups, command
from dmrecover.system.cgroups import AppCgroup
from tests.apps import databases
from tests.apps.databases import MariaDB, Postgres, RecordingClient

pytestmark = [pytest.mark.root, pytest.mark.slow]


@pytest.fixture
def cg() -> Iterator[AppCgroup]:
    group = AppCgroup.create(f"test-db-{uuid.uuid4().hex[:8]}", kinds=("cgroup2",))
    try:
        yield group
    finally:
        group.kill(timeout=15)
        group.remove()


@pytest.fixture
def volume() -> Iterator[str]:
    """A plain directory standing in for the volume (not under tmp_path: see
    databases.make_traversable)."""
    d = databases.scratch_dir("dmr-vol-")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _children(pid: int) -> set[int]:
    out = set()
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    st = cgroups.parse_stat(f.read())
            except (FileNotFoundError, ProcessLookupError):
                continue
            if st[1] == pid and st[0] != "Z":
                out.add(int(d))
    return out


def _restart_under_load(db: Postgres | MariaDB, cg: AppCgroup, client: databases.RecordingClient,
                        timings: dict[str, float]) -> None:
    """Stop with the stop command (reaping meanwhile), check the cgroup is empty, start
    again inside it, and see the client commit again."""
    before = client.committed
    t0 = time.monotonic()
    with cg.reaping():
        command.run(db.stop_argv(), timeout=90)
    assert cg.wait_empty(30), f"still running after stop: {cg.pids()}"
    timings["restart_stop"] = time.monotonic() - t0
    t0 = time.monotonic()
    proc = cg.start(db.start_argv())
    db.wait_ready(60)
    timings["restart_start"] = time.monotonic() - t0
    client.wait_committed(before + 50, timeout=30)
    assert proc.pid in cg.pids() or proc.poll() == 0


def _check_and_stop(db: Postgres | MariaDB, cg: AppCgroup, client: RecordingClient,
                    record: str, timings: dict[str, float], check_name: str,
                    check: Callable[[], object], label: str) -> None:
    """Stop the recording client: every committed row is present, the database's own check
    passes, and its stop command empties the cgroup; print the figures after label."""
    committed = client.stop()
    assert committed >= 150
    assert databases.missing(record, db.recorded_ids()) == []

    t0 = time.monotonic()
    check()
    timings[check_name] = time.monotonic() - t0
    with cg.reaping():
        command.run(db.stop_argv(), timeout=90)
    assert cg.wait_empty(30)
    print(f"{label} committed={committed} errors={client.errors} "
          + " ".join(f"{k}={v:.2f}s" for k, v in timings.items()))


def test_postgres_in_a_cgroup(cg: AppCgroup, volume: str, tmp_path) -> None:
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    pg = Postgres.create(volume)
    timings["initdb"] = time.monotonic() - t0
    record = str(tmp_path / "pg-committed.txt")  # outside the volume
    try:
        t0 = time.monotonic()
        proc = cg.start(pg.start_argv())
        assert proc.wait(timeout=90) == 0  # pg_ctl -w returns once the server accepts
        timings["start"] = time.monotonic() - t0
        postmaster = pg.postmaster_pid()
        assert postmaster is not None and postmaster != proc.pid
        assert os.getsid(postmaster) == postmaster  # daemonized: a process group would miss it
        members = set(cg.pids())
        assert postmaster in members
        assert _children(postmaster) <= members  # checkpointer, walwriter, ... all inside
        assert len(members) >= 4

        t0 = time.monotonic()
        pg.pgbench_init(scale=1)
        tps = pg.pgbench(3, clients=2)
        timings["pgbench"] = time.monotonic() - t0
        assert tps > 0

        client = pg.recording_client(record).start()
        client.wait_committed(100)
        _restart_under_load(pg, cg, client, timings)
        assert pg.postmaster_pid() in cg.pids()
        _check_and_stop(pg, cg, client, record, timings, "amcheck", pg.amcheck,
                        f"postgres: tps={tps:.0f}")
    finally:
        cg.kill(timeout=15)
        shutil.rmtree(pg.rundir, ignore_errors=True)


def test_mariadb_in_a_cgroup(cg: AppCgroup, volume: str, tmp_path) -> None:
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    my = MariaDB.create(volume)
    timings["install"] = time.monotonic() - t0
    record = str(tmp_path / "my-committed.txt")
    try:
        t0 = time.monotonic()
        proc = cg.start(my.start_argv())  # a foreground start command
        my.wait_ready(60)
        timings["start"] = time.monotonic() - t0
        assert proc.poll() is None
        server = my.server_pid()
        assert server is not None and server in _children(proc.pid)
        assert {proc.pid, server} <= set(cg.pids())

        client = my.recording_client(record).start()
        client.wait_committed(100)
        _restart_under_load(my, cg, client, timings)
        # the first mariadbd-safe was our child: reaped, not a zombie for a stop script
        assert proc.returncode == 0 or cg.exit_codes.get(proc.pid) == 0
        assert my.server_pid() in cg.pids()
        _check_and_stop(my, cg, client, record, timings, "check", my.check, "mariadb:")
    finally:
        cg.kill(timeout=15)
        shutil.rmtree(my.rundir, ignore_errors=True)


def test_commands_round_trip_through_shlex(tmp_path) -> None:
    pg = Postgres(str(tmp_path / "pgdata"), "/tmp/run", port=25432)
    assert shlex.split(pg.start_command()) == pg.start_argv()
    assert "-k /tmp/run -p 25432 -c listen_addresses=''" in pg.start_argv()
    my = MariaDB(str(tmp_path / "mysql"), "/tmp/run")
    assert shlex.split(my.stop_command()) == my.stop_argv()
