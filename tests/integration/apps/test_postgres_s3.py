"""PostgreSQL 15 through live-restore from an encrypted repository on a real S3 server (Ceph's
RADOS Gateway, started here on 127.0.0.1), on this host's portable backend.

As tests/integration/apps/test_databases.py does it from a local repository: a source ext4
volume with a populated cluster, backed up with `dmrecover backup` into `s3://...` (format 2,
AES-256-GCM, password from a root-only file); DEST wiped; live-restore with a slowed background
restore so the database runs on the pseudo-volume while its blocks come from RGW; pgbench and a
client that records each committed insert outside the volume during the restore; a cold read
of table data not restored yet (fetched on demand from RGW); the automatic cutover; then on
DEST alone: pg_amcheck --heapallindexed clean and every recorded insert present."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from dmrecover.system import command
from tests.apps import databases
from tests.apps.databases import Postgres
from tests.helpers import ceph as ceph_helper
from tests.helpers.ceph import CephCluster, ceph_available
from tests.helpers.required import needs
from tests.integration.apps.appkit import (
    AppSandbox,
    build_db_volume,
    held_restore,
    pgbench_while_recording,
    scratch_tree,
)
from tests.integration.sandboxes import torn_down

pytestmark = [pytest.mark.root, pytest.mark.slow,
              needs(ceph_available(), "Ceph packages"),
              needs(databases.available()["postgres"], "PostgreSQL 15")]

MiB = 1 << 20
PASSWORD = "postgres over rgw"
PG_SCALE = 3  # pgbench_accounts: 300 000 rows, ~40 MiB
# 1 MiB chunks, 0.15 s each for the background restorer (zero chunks cost nothing): the
# ~100 MiB of the cluster take ~15 s or more, so the database runs on the pseudo-volume
# through the load while its other blocks come from RGW.
DELAY = {"DMRECOVER_TEST_RESTORE_DELAY": "0.15"}


@pytest.fixture(scope="module")
def ceph() -> Iterator[CephCluster]:
    # The cluster's files in a scratch dir too: no database lives there, but pytest's
    # tmp_path may be chmodded 0700 by another run (see databases.make_traversable).
    # The CLI and the session processes inherit the cluster's environment.
    with scratch_tree("dmr-ceph-") as root, ceph_helper.running(root) as cluster:
        yield cluster


@pytest.fixture
def scratch() -> Iterator[Path]:
    with scratch_tree("dmr-pgs3-") as d:
        yield d


@pytest.fixture
def box(scratch: Path, ceph: CephCluster, monkeypatch) -> Iterator[AppSandbox]:
    for k in ("DMRECOVER_PASSWORD", "DMRECOVER_PASSWORD_FILE"):
        monkeypatch.delenv(k, raising=False)
    with torn_down(AppSandbox(scratch / "box")) as sb:
        yield sb


def backup_to_s3(box: AppSandbox, image: Path) -> Path:
    """`repo init` an encrypted repository on RGW and `dmrecover backup` the image into it,
    both through the CLI; box.repo becomes the URL, box.backup_id the backup. Returns the
    password file (root's, 0600)."""
    pw = box.tmp / "password"
    pw.write_text(PASSWORD + "\n")
    pw.chmod(0o600)
    url = f"s3://dmrecover-pg/{uuid.uuid4().hex[:12]}"
    r = box.cli("repo", "init", url, "--password-file", str(pw))
    assert r.returncode == 0 and "encryption: aes-256-gcm" in r.stdout, r.stderr
    r = box.cli("backup", str(image), "--repo", url, "--password-file", str(pw), "--name", "db",
                "--chunk-size", "1M", "--progress", "none")
    assert r.returncode == 0, r.stderr
    r = box.cli("list", "--repo", url, "--password-file", str(pw), "--json")
    assert r.returncode == 0, r.stderr
    items = json.loads(r.stdout)
    assert [i["encryption"] for i in items] == ["aes-256-gcm"]
    box.repo = url  # type: ignore[assignment]  # live_restore_app passes str(box.repo)
    box.backup_id = items[-1]["id"]
    return pw


def test_postgres_live_restore_from_encrypted_rgw(box: AppSandbox, scratch: Path) -> None:
    image, src = build_db_volume(scratch, "postgres", 256 * MiB,
                                 lambda db: db.pgbench_init(scale=PG_SCALE))
    pw = backup_to_s3(box, image)
    image.unlink()
    with open(box.dest, "wb") as f:
        f.truncate(256 * MiB)
    pg = Postgres(str(box.mnt / "pgdata"), src.rundir, port=src.port)
    hold, env = held_restore(box, DELAY)
    r = box.live_restore_app("db", pg.start_command(), pg.stop_command(),
                             "--password-file", str(pw), env=env)
    assert r.returncode == 0, r.stderr + r.stdout
    try:
        pg.wait_ready(60)
        st = box.status("db")
        assert st["state"] == "restoring", st
        assert box.on_pseudo_volume()
        # cold read: the whole accounts table, most of it not restored yet (from RGW)
        assert pg.psql("SELECT count(*) FROM pgbench_accounts").strip() == \
            str(PG_SCALE * 100000)
        assert box.status("db")["demand_fetches"] > 0
        client, tps = pgbench_while_recording(box, pg, 6)
        during = box.status("db")
        assert during["state"] == "restoring", during
        hold.unlink()  # the restore goes on, then the automatic cutover, under the load

        done = box.wait_state("db", ("done", "failed"), timeout=240)
        assert done["state"] == "done", done.get("error")
        assert not box.on_pseudo_volume()
        assert done["warnings"] == [], done["warnings"]
        n = client.committed
        client.wait_committed(n + 50, timeout=60)  # the client goes on, on DEST
        client.stop()
        pg.amcheck()  # --heapallindexed --rootdescend on every database: clean or it raises
        assert databases.missing(client.record_file, pg.recorded_ids()) == []
        assert client.committed > 100
        # The session's cached repository key is gone once done.
        assert not (box.state_root / "db" / "repo.key").exists()
        print(f"postgres from RGW: tps during restore {tps:.0f}, {client.committed} "
              f"recorded inserts, downtime {done['timings']['cutover_downtime']:.2f}s")
    finally:
        command.run(pg.stop_argv(), check=False, timeout=120)
