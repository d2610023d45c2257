"""PostgreSQL 15 as Debian runs it (the systemd unit `postgresql@15-main`, cluster 15/main
with its data in /var/lib/postgresql/15/main), live-restored with `--backend dm --app-unit`:
the unit runs on the dm pseudo-volume while the restore goes on, the restart cutover stops and
starts the unit, and every insert psql acknowledged is on DEST afterwards."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from dmrecover.backends.dm import dmsetup as dm
from dmrecover.system.mounts import mount_at, umount
from tests.apps.livekit import Sandbox
from tests.kernel.kernelutil import sh

UNIT = "postgresql@15-main"
DATA = Path("/var/lib/postgresql/15/main")
# The restore must outlast a few dozen inserts (each psql call takes ~1 s under emulation).
SLOW = {"DMRECOVER_TEST_RESTORE_DELAY": "1.0"}
MiB = 1 << 20


def psql(sql: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """psql over the cluster's default socket as postgres; exit 0 means committed."""
    return subprocess.run(["runuser", "-u", "postgres", "--", "psql", "-X", "-At", "-v",
                           "ON_ERROR_STOP=1", "-c", sql], capture_output=True, text=True,
                          check=check, timeout=120)


def wait_pg(timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while subprocess.run(["pg_isready", "-q"], check=False).returncode != 0:
        assert time.monotonic() < deadline, "PostgreSQL did not come up"
        time.sleep(0.5)


@pytest.fixture
def cluster(tmp_path: Path):
    if not shutil.which("pg_ctlcluster") or not Path("/lib/systemd/system/postgresql@.service"
                                                      ).exists():
        pytest.fail("the box has no postgresql-15 (vagrant/build-box.sh installs it)")
    if not (DATA / "PG_VERSION").exists() and not mount_at(str(DATA)):
        sh("pg_createcluster", "15", "main")
    sh("systemctl", "stop", UNIT)
    # The session mounts on an empty directory only: the box's cluster files step aside.
    orig = DATA.with_name("main.orig")
    shutil.rmtree(orig, ignore_errors=True)
    DATA.rename(orig)
    DATA.mkdir(mode=0o700)
    shutil.copystat(orig, DATA)
    os.chown(DATA, orig.stat().st_uid, orig.stat().st_gid)
    try:
        yield orig
    finally:
        subprocess.run(["systemctl", "stop", UNIT], check=False)
        while mount_at(str(DATA)) is not None:
            umount(str(DATA))
        shutil.rmtree(DATA, ignore_errors=True)
        orig.rename(DATA)


def test_postgres_unit_on_dm_restart_cutover(tmp_path: Path, cluster, owned_cleanup) -> None:
    from dmrecover.repository.backup import backup
    from dmrecover.repository.repo import Repository

    box = Sandbox(tmp_path)
    img = tmp_path / "pg.img"
    with open(img, "wb") as f:
        f.truncate(256 * MiB)
    sh("mkfs.ext4", "-q", "-F", str(img))
    # The cluster's data directory moves onto the image (mounted where the unit expects it).
    staging = tmp_path / "copy"
    staging.mkdir()
    sh("mount", "-o", "loop", str(img), str(staging))
    try:
        sh("cp", "-a", f"{cluster}/.", str(staging))
    finally:
        sh("umount", str(staging))
    sh("mount", "-o", "loop", str(img), str(DATA))
    try:
        sh("chown", "postgres:postgres", str(DATA))
        sh("chmod", "0700", str(DATA))
        sh("systemctl", "start", UNIT)
        wait_pg()
        psql("CREATE TABLE seed (id int PRIMARY KEY, payload text)")
        psql("INSERT INTO seed SELECT g, repeat('s', 500) FROM generate_series(1, 20000) g")
        psql("CREATE TABLE acked (id int PRIMARY KEY)")
        sh("systemctl", "stop", UNIT)
    finally:
        sh("umount", str(DATA))
    repo = Repository.init(box.repo)
    manifest = backup(img, repo, name="pg", chunk_size=256 << 10)
    img.unlink()
    with open(box.dest, "wb") as f:
        f.truncate(manifest.size)

    session = owned_cleanup
    r = box.cli("live-restore", "--repo", str(box.repo), manifest.id, str(box.dest),
                "--mount", str(DATA), "--session", session, "--app-unit", UNIT,
                "--backend", "dm", env=SLOW)
    assert r.returncode == 0, r.stdout + r.stderr
    wait_pg()
    m = mount_at(str(DATA))
    assert m is not None
    assert Path(m.source).resolve() == dm.mapper_path(dm.dm_name(session, "pseudo")).resolve()
    assert box.status(session)["state"] == "restoring"
    # Reads of unrestored data and acknowledged writes while the restore goes on.
    assert psql("SELECT count(*) FROM seed").stdout.strip() == "20000"
    acked = []
    i = 0
    deadline = time.monotonic() + 900
    while True:
        if i % 5 == 0:  # `dmrecover status` costs seconds in the VM: not every insert
            state = box.status(session)["state"]
            if state in ("done", "failed"):
                break
        assert time.monotonic() < deadline, "the session did not finish"
        i += 1
        if psql(f"INSERT INTO acked VALUES ({i})", check=False).returncode == 0:
            acked.append(i)
    done = box.status(session)
    assert done["state"] == "done", done.get("error")
    wait_pg()
    # The unit now runs on DEST (a loop over the DEST file), the dm devices are gone.
    m = mount_at(str(DATA))
    backing = Path(f"/sys/block/{os.path.basename(m.source)}/loop/backing_file").read_text()
    assert backing.strip() == str(box.dest)
    assert not dm.list_owned(session)
    ids = {int(x) for x in psql("SELECT id FROM acked").stdout.split()}
    assert len(acked) > 5 and set(acked) <= ids, sorted(set(acked) - ids)[:10]
    assert psql("SELECT count(*) FROM seed").stdout.strip() == "20000"
    print(f"postgres unit on dm: {len(acked)} acknowledged inserts, downtime "
          f"{done['timings'].get('cutover_downtime', 0):.2f} s")
