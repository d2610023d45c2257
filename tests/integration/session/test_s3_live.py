"""Live restore from an encrypted repository on a real S3 server (Ceph's RADOS Gateway, started
by the tests on 127.0.0.1), through the whole session: the CLI, the session process, the
sample application writing and reading unrestored data, the automatic cutover, DEST checked
alone. Also: SIGKILL of the session process and `resume` with no password anywhere (the
session's key cache), and radosgw stopped for 30 s while the application reads unrestored
data (the reads wait, nothing fails, everything recovers)."""

from __future__ import annotations

import os
import signal
import stat
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from dmrecover.system import command
from dmrecover.system.mounts import mount_at, umount
from tests.apps.livekit import Sandbox, table_digest, tree_checksums
from tests.helpers.ceph import CephCluster, ceph_available, running
from tests.helpers.required import needs
from tests.integration.sandboxes import torn_down

pytestmark = [pytest.mark.root, pytest.mark.slow,
              needs(ceph_available(), "Ceph packages")]

FAST_KDF = {"kdf": "scrypt", "n": 1 << 10, "r": 8, "p": 1}
PASSWORD = "live restore over s3"
# The restore-delay hook: the background restore lasts several seconds (one delay at a time,
# whatever the pool), so the application runs and reads unrestored data meanwhile.
SLOW = {"DMRECOVER_TEST_RESTORE_DELAY": "0.05"}
CHUNK = 256 << 10


def file_chunks(path: Path, chunk_size: int) -> set[int]:
    """The volume's chunks that hold the file's data (its extents, from filefrag)."""
    out = command.run(["filefrag", "-e", "-b4096", str(path)]).stdout
    chunks: set[int] = set()
    for line in out.splitlines():
        parts = line.replace("..", " ").replace(":", " ").split()
        if len(parts) >= 5 and parts[0].isdigit():
            start, end = int(parts[3]), int(parts[4])
            chunks.update(range(start * 4096 // chunk_size, end * 4096 // chunk_size + 1))
    return chunks


def far_files(box: Sandbox, count: int) -> list[str]:
    """Files whose data lies farthest from the start of the volume and from the database
    (where the application's first reads move the restorer): the last to be restored."""
    db = box.chunks_of["app.db"]
    db_end = max(db) if db else 0

    def distance(rel: str) -> int:
        lo = min(box.chunks_of[rel])
        return lo - db_end if lo > db_end else lo
    cands = [r for r in box.checksums if box.chunks_of.get(r)]
    return sorted(cands, key=distance)[-count:]


@pytest.fixture(scope="module")
def ceph(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CephCluster]:
    with running(tmp_path_factory.mktemp("ceph")) as cluster:
        yield cluster


@pytest.fixture
def box(tmp_path: Path, ceph: CephCluster, monkeypatch) -> Iterator[Sandbox]:
    for k in ("DMRECOVER_PASSWORD", "DMRECOVER_PASSWORD_FILE"):
        monkeypatch.delenv(k, raising=False)
    with torn_down(Sandbox(tmp_path)) as sb:
        try:
            yield sb
        finally:  # the gateway back up before the sandbox is torn down
            if ceph._pid("client.rgw.test") is None:
                ceph.start_rgw()


def prepare_s3(box: Sandbox, fs_tools, image: Path) -> Path:
    """Back the image up into a new encrypted repository on RGW; box.repo becomes its URL.
    Returns the password file (root's, 0600)."""
    from dmrecover.repository.backup import backup
    from dmrecover.repository.repo import Repository

    src = fs_tools.copy_sparse(image, box.tmp / "src.img")
    with fs_tools.mounted(src, options="ro") as m:
        box.checksums = tree_checksums(m)
        box.seed_digest = table_digest(m / "app.db")
        box.chunks_of = {rel: file_chunks(m / rel, CHUNK) for rel in box.checksums}
        box.chunks_of["app.db"] = file_chunks(m / "app.db", CHUNK)
    url = f"s3://dmrecover-live/{uuid.uuid4().hex[:12]}"
    repo = Repository.init(url, password=PASSWORD, kdf=FAST_KDF)
    assert repo.encryption == "aes-256-gcm"
    manifest = backup(src, repo, name="vol", chunk_size=CHUNK)
    box.backup_id, box.fstype, box.size = manifest.id, manifest.fstype, manifest.size
    box.repo = url  # type: ignore[assignment]  # live_restore passes str(box.repo)
    src.unlink()
    with open(box.dest, "wb") as f:
        f.truncate(manifest.size)
    pw = box.tmp / "password"
    pw.write_text(PASSWORD + "\n")
    pw.chmod(0o600)
    return pw


def read_files(box: Sandbox, names: list[str]) -> None:
    for rel in names:
        r = box.query({"op": "sha256", "path": rel}, timeout=120)
        assert r == {"ok": True, "sha256": box.checksums[rel]}, rel


def finish_and_verify(box: Sandbox, name: str, fs_tools) -> tuple[int, int]:
    done = box.wait_state(name, ("done", "failed"), timeout=180)
    assert done["state"] == "done", done.get("error")
    box.wait_app()
    box.stop_app()
    umount(str(box.mnt))
    return box.verify_dest(fs_tools)


def test_encrypted_s3_live_restore_sigkill_resume_without_password(box: Sandbox, fs_tools,
                                                                  ext4_image: Path) -> None:
    pw = prepare_s3(box, fs_tools, ext4_image)
    # Without the password nothing starts: one line, non-zero.
    r = box.live_restore("s3", env=SLOW)
    assert r.returncode != 0 and "password" in r.stderr and "Traceback" not in r.stderr
    assert not (box.state_root / "s3" / "session.json").exists()

    r = box.live_restore("s3", "--password-file", str(pw), env=SLOW)
    assert r.returncode == 0, r.stderr
    box.wait_app()
    sdir = box.state_root / "s3"
    # The session keeps the unsealed master key for its unattended resume: root's, 0600.
    st = os.lstat(sdir / "repo.key")
    assert stat.S_ISREG(st.st_mode) and st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o600
    assert PASSWORD not in (sdir / "repo.key").read_text()
    assert PASSWORD not in (sdir / "session.json").read_text()
    assert box.session("s3")["repo"] == box.repo
    names = sorted(box.checksums)
    read_files(box, names[-3:])  # data far ahead of the restorer: fetched on demand from RGW
    mid = box.status("s3")
    assert mid["state"] == "restoring" and mid["percent"] < 90
    assert mid["demand_fetches"] > 0
    time.sleep(1.0)
    acks_before = box.query({"op": "ping"})["commits"]
    assert acks_before > 0
    # Kill once the restored map has been persisted at least once: what a crash keeps (the
    # in-memory count of the dead process's last status is more: chunks since the last sync
    # are fetched again, by design).
    synced = box.wait_synced_chunks("s3")

    pid = box.session("s3")["pid"]
    os.kill(pid, signal.SIGKILL)
    if psutil.pid_exists(pid):
        psutil.Process(pid).wait(10)
    crashed = box.status("s3")
    assert crashed["state"] == "restoring" and not crashed["alive"]
    box.stop_app()  # the application went down with its volume (as at a reboot)

    # Resume with no password anywhere: not in the environment, the file is gone.
    pw.unlink()
    r = box.cli("resume", "s3", env=SLOW)
    assert r.returncode == 0, r.stderr
    box.wait_app()
    resumed = box.status("s3")
    assert resumed["alive"]
    # It goes on from the persisted map: every chunk it named is still restored.
    assert resumed["restored_bytes"] >= synced * box.session("s3")["chunk_size"]
    read_files(box, names[:2] + names[len(names) // 2:len(names) // 2 + 2])
    rows, acks = finish_and_verify(box, "s3", fs_tools)
    assert acks >= acks_before and rows >= acks
    # Done: the repository's key is not kept any longer than the session needs it.
    assert not (sdir / "repo.key").exists()


def test_rgw_outage_mid_live_restore_reads_wait_then_recover(box: Sandbox, fs_tools,
                                                             ext4_image: Path,
                                                             ceph: CephCluster) -> None:
    pw = prepare_s3(box, fs_tools, ext4_image)
    r = box.live_restore("out", "--password-file", str(pw), env=SLOW)
    assert r.returncode == 0, r.stderr
    box.wait_app()
    ceph.stop_rgw()
    stopped = time.monotonic()
    start = box.status("out")
    assert start["percent"] < 50
    far = far_files(box, 2)
    results: dict[str, object] = {}

    def reader() -> None:
        t0 = time.monotonic()
        try:
            read_files(box, far)  # far ahead of the restorer: not restored yet
            results["ok"] = time.monotonic() - t0
        except BaseException as err:  # noqa: BLE001 - reported by the test thread
            results["error"] = err

    t = threading.Thread(target=reader)
    t.start()
    waiting = None
    while time.monotonic() - stopped < 30:
        s = box.status("out")
        if s["waiting_for_repository_since"]:
            waiting = s
        time.sleep(0.5)
    assert waiting is not None, "status never showed the session waiting for the repository"
    assert waiting["state"] == "restoring" and waiting["alive"]
    assert not results, f"a read of unrestored data returned during the outage: {results} " \
        f"({far}: chunks {[sorted(box.chunks_of[r]) for r in far]}, database " \
        f"{sorted(box.chunks_of['app.db'])}, {start['percent']:.0f}% restored)"
    shown = box.cli("status", "out")
    assert shown.returncode == 0, shown.stderr
    assert "UNREACHABLE" in shown.stdout or "waiting for repository" in shown.stdout, \
        shown.stdout
    # The filesystem is still mounted read-write (no I/O error reached it).
    m = mount_at(str(box.mnt))
    assert m is not None and "rw" in m.options.split(","), m
    ceph.start_rgw()
    t.join(120)
    assert "error" not in results, results.get("error")
    assert results["ok"] >= 25, "the read did not wait for the repository"
    # The wait ends in status once every fetcher's next retry (backoff up to 5 s) succeeds
    # and status.json is rewritten (every 0.5 s): not at the instant the read returns.
    deadline = time.monotonic() + 30
    while True:
        after = box.status("out")
        if after["waiting_for_repository_since"] is None or after["state"] != "restoring":
            break
        assert time.monotonic() < deadline, f"status still waits for the repository: {after}"
        time.sleep(0.5)
    m = mount_at(str(box.mnt))
    assert m is not None and "rw" in m.options.split(",")
    finish_and_verify(box, "out", fs_tools)
    assert time.monotonic() - stopped < 90
