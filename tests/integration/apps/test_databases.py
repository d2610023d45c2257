"""PostgreSQL 15 and MariaDB through live-restore on this host's portable backend, started and
stopped the way their packages do it (pg_ctl, which daemonizes the postmaster; mariadbd-safe
in the foreground and mariadb-admin shutdown).

Each: a source ext4 volume with a populated cluster, backed up with `dmrecover backup`; DEST
wiped; live-restore with a slowed restore so the database runs during it; load (pgbench, and a
client that records each committed insert outside the volume) during the restore; a cold read
of table data not restored yet; the cutover (automatic for PostgreSQL; `dmrecover cutover`
for MariaDB, whose load and cold read must not race the end of the restore: a cutover stops
the server, and a query in flight loses its connection); then on DEST: the integrity check
(pg_amcheck --heapallindexed, mariadb-check) clean and every recorded insert present."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from dmrecover.system import command
from tests.apps import databases
from tests.apps.databases import MariaDB, Postgres
from tests.integration.apps.appkit import (
    AppSandbox,
    backup_with_cli,
    build_db_volume,
    held_restore,
    pgbench_while_recording,
    scratch_tree,
)
from tests.integration.sandboxes import torn_down

pytestmark = [pytest.mark.root, pytest.mark.slow]

MiB = 1 << 20
# 1 MiB chunks, 0.2 s each for the background restorer (zero chunks cost nothing): about
# 5 MiB/s, so the ~100 MiB of a small cluster restores in ~20 s while the database runs.
DELAY = {"DMRECOVER_TEST_RESTORE_DELAY": "0.2"}
PG_SCALE = 3  # pgbench_accounts: 300 000 rows, ~40 MiB
MY_ROWS = 150_000


@pytest.fixture
def scratch() -> Iterator[Path]:
    with scratch_tree("dmr-appdb-") as d:
        yield d


@pytest.fixture
def box(scratch: Path) -> Iterator[AppSandbox]:
    with torn_down(AppSandbox(scratch / "box")) as sb:
        yield sb


def _live(box: AppSandbox, image: Path, db, *extra: str, env: dict[str, str] = DELAY) -> None:
    box.backup_id = backup_with_cli(box, image)
    image.unlink()
    with open(box.dest, "wb") as f:
        f.truncate(256 * MiB)
    r = box.live_restore_app("db", db.start_command(), db.stop_command(), *extra, env=env)
    assert r.returncode == 0, r.stderr + r.stdout


def _restoring(box: AppSandbox) -> dict:
    st = box.status("db")
    assert st["state"] == "restoring", st
    assert box.on_pseudo_volume()
    return st


def _after_cutover(box: AppSandbox, client: databases.RecordingClient) -> dict:
    done = box.wait_state("db", ("done", "failed"), timeout=240)
    assert done["state"] == "done", done.get("error")
    assert not box.on_pseudo_volume()
    assert done["warnings"] == [], done["warnings"]  # stopped by its own stop command
    n = client.committed
    client.wait_committed(n + 50, timeout=60)  # the client goes on, on DEST
    client.stop()
    return done


def test_postgres_live_restore(box: AppSandbox, scratch: Path) -> None:
    image, src = build_db_volume(scratch, "postgres", 256 * MiB,
                                 lambda db: db.pgbench_init(scale=PG_SCALE))
    pg = Postgres(str(box.mnt / "pgdata"), src.rundir, port=src.port)
    hold, env = held_restore(box, DELAY)
    _live(box, image, pg, env=env)
    pg.wait_ready(60)
    _restoring(box)
    # cold read: the whole accounts table, most of it not restored yet
    assert pg.psql("SELECT count(*) FROM pgbench_accounts").strip() == str(PG_SCALE * 100000)
    assert box.status("db")["demand_fetches"] > 0
    client, tps = pgbench_while_recording(box, pg, 8)
    _restoring(box)
    hold.unlink()  # the restore goes on, then the automatic cutover, under the client's load
    done = _after_cutover(box, client)
    pg.amcheck()  # --heapallindexed --rootdescend on every database: clean or it raises
    assert databases.missing(client.record_file, pg.recorded_ids()) == []
    assert client.committed > 100
    stop_log = done["app_handle"]["stop_log"]
    assert any("the stop command exited 0" in line for line in stop_log), stop_log
    print(f"postgres: tps during restore {tps:.0f}, {client.committed} recorded inserts, "
          f"downtime {done['timings']['cutover_downtime']:.2f}s")
    command.run(pg.stop_argv(), timeout=120)


def _my_populate(db: MariaDB) -> None:
    db.sql("CREATE DATABASE seeddb")
    db.sql("CREATE TABLE t (id INT PRIMARY KEY, p VARCHAR(255) NOT NULL) ENGINE=InnoDB; "
           f"INSERT INTO t SELECT seq, REPEAT(MD5(seq), 6) FROM seq_1_to_{MY_ROWS}", "seeddb")


def test_mariadb_live_restore(box: AppSandbox, scratch: Path) -> None:
    image, src = build_db_volume(scratch, "mariadb", 256 * MiB, _my_populate)
    my = MariaDB(str(box.mnt / "mysql"), src.rundir, options=src.options)
    # Manual cutover: restored or not, the server stays on the pseudo-volume until
    # `dmrecover cutover` (an automatic one would stop it under a query in flight).
    hold, env = held_restore(box, DELAY)
    _live(box, image, my, "--cutover", "manual", env=env)
    my.wait_ready(90)
    _restoring(box)
    client = my.recording_client(str(box.tmp / "my-committed.txt")).start()
    slap = command.run(["mariadb-slap", "--no-defaults", f"--socket={my.socket}", "-u", "root",
                        "--concurrency=2", "--iterations=1", "--number-of-queries=400",
                        "--auto-generate-sql", "--auto-generate-sql-load-type=mixed"],
                       check=False, timeout=300)
    assert slap.returncode == 0, (slap.stderr, box.status("db")["state"], my.log_tail())
    _restoring(box)
    # cold read: the whole seed table, much of it not restored yet
    try:
        out = my.sql("SELECT COUNT(*), SUM(LENGTH(p)) FROM t", "seeddb").split()
    except databases.DatabaseError as err:
        raise AssertionError(f"{err}\n{box.status('db')}\n{my.log_tail()}") from err
    assert out == [str(MY_ROWS), str(MY_ROWS * 192)]
    assert box.status("db")["demand_fetches"] > 0
    client.wait_committed(50, timeout=60)
    _restoring(box)
    hold.unlink()
    box.wait_state("db", ("ready",), timeout=240)
    assert box.on_pseudo_volume()  # restored, yet nothing moves without the command
    r = box.cli("cutover", "db")
    assert r.returncode == 0, r.stderr + r.stdout
    done = _after_cutover(box, client)
    my.check()
    assert databases.missing(client.record_file, my.recorded_ids()) == []
    assert my.sql("SELECT COUNT(*) FROM t", "seeddb").strip() == str(MY_ROWS)
    print(f"mariadb: {client.committed} recorded inserts, "
          f"downtime {done['timings']['cutover_downtime']:.2f}s")
    command.run(my.stop_argv(), timeout=120)
