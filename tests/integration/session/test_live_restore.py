"""End to end, on this host (portable FUSE + loop backend): back up a real ext4/xfs volume,
wipe DEST, live-restore it while the sample application writes (fsync'd commits) and reads
data not yet restored, let the automatic cutover happen, and check DEST alone: every file of
the backup, the seed table, every acknowledged write. Also: SIGKILL of the session process
mid-restore and resume, manual cutover, abort (and resume after it)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import psutil
import pytest

from dmrecover.engine.bitmap import Bitmap  # noqa: E402
from dmrecover.system.mounts import mount_at  # noqa: E402
from tests.apps.livekit import Sandbox
from tests.integration.sandboxes import torn_down

pytestmark = [pytest.mark.root, pytest.mark.slow]

# Seconds the background restorer sleeps per chunk: the restore lasts several seconds, so
# the application really runs (and reads unrestored data) while it goes on.
SLOW = {"DMRECOVER_TEST_RESTORE_DELAY": "0.06"}


@pytest.fixture
def box(tmp_path: Path):
    with torn_down(Sandbox(tmp_path)) as sb:
        yield sb


def _image(request, name: str) -> Path:
    return request.getfixturevalue(f"{name}_image")


def _read_unrestored_files(box: Sandbox, count: int = 6) -> None:
    """Ask the application for checksums of backed-up files (data the restore has likely not
    reached yet: the restorer goes in order, these are spread over the volume)."""
    names = sorted(box.checksums)
    picks = names[-count:] + names[:2]
    for rel in picks:
        r = box.query({"op": "sha256", "path": rel})
        assert r == {"ok": True, "sha256": box.checksums[rel]}, rel


@pytest.mark.parametrize("fstype", ["ext4", "xfs"])
def test_live_restore_auto_cutover(box: Sandbox, fs_tools, request, fstype: str) -> None:
    box.prepare(fs_tools, _image(request, fstype))
    t0 = time.monotonic()
    r = box.live_restore("e2e", env=SLOW)
    assert r.returncode == 0, r.stderr
    assert "session e2e" in r.stdout and "dmrecover status e2e" in r.stdout
    box.wait_app()
    first_answer = time.monotonic() - t0
    before = box.status("e2e")
    assert before["state"] == "restoring"
    assert before["percent"] < 60, "the restore should still be running"
    # The pseudo-volume is mounted: a loop over the FUSE file in the state dir.
    m = mount_at(str(box.mnt))
    assert m is not None and m.source.startswith("/dev/loop")
    assert m.fstype == fstype
    # ... which it reads and writes with direct I/O (requests in flight at once, not one).
    dio = Path(f"/sys/block/{os.path.basename(m.source)}/loop/dio").read_text().strip()
    assert dio == "1", "the pseudo-volume's loop uses direct I/O"
    _read_unrestored_files(box)
    rows_start = box.query({"op": "count"})["rows"]
    time.sleep(1.0)
    mid = box.status("e2e")
    assert mid["demand_fetches"] > 0, "reads of unrestored data are fetched on demand"
    assert mid["overlay_bytes"] > 0, "the application's writes go to the overlay"
    assert box.query({"op": "count"})["rows"] > rows_start, "the application writes"
    pid_before = box.query({"op": "ping"})["pid"]

    done = box.wait_state("e2e", ("done", "failed"))
    assert done["state"] == "done", done.get("error")
    st = box.status("e2e")
    assert st["state"] == "done" and st["percent"] == 100.0
    assert st["timings"]["cutover_downtime"] < 10
    # The application runs again, now on DEST itself (a loop over the DEST file).
    ping = box.wait_app()
    assert ping["pid"] != pid_before
    m = mount_at(str(box.mnt))
    backing = Path(f"/sys/block/{os.path.basename(m.source)}/loop/backing_file").read_text()
    assert backing.strip() == str(box.dest)
    n0 = box.query({"op": "count"})["rows"]
    time.sleep(0.3)
    assert box.query({"op": "count"})["rows"] > n0, "the application writes on DEST"
    # The overlay is gone once merged; nothing of the stack is left.
    sdir = box.state_root / "e2e"
    assert not (sdir / "overlay.img").exists()
    assert mount_at(str(sdir / "fuse")) is None
    # DEST's loop is set to autoclear: it goes away with its mount, nothing else to undo.
    autoclear = Path(f"/sys/block/{os.path.basename(m.source)}/loop/autoclear").read_text()
    assert autoclear.strip() == "1"
    box.stop_app()
    from dmrecover.system.mounts import umount

    umount(str(box.mnt))
    rows, acks = box.verify_dest(fs_tools)
    assert acks > 20 and rows >= acks
    print(f"{fstype}: first answer after {first_answer:.2f} s, {acks} acknowledged writes, "
          f"downtime {st['timings']['cutover_downtime']:.2f} s")


@pytest.mark.parametrize("fstype", ["ext4", "xfs"])
def test_sigkill_mid_restore_then_resume(box: Sandbox, fs_tools, request, fstype: str) -> None:
    box.prepare(fs_tools, _image(request, fstype))
    r = box.live_restore("crash", env=SLOW)
    assert r.returncode == 0, r.stderr
    box.wait_app()
    time.sleep(1.5)
    acks_before = box.query({"op": "ping"})["commits"]
    assert acks_before > 0
    # Kill once the restored map has been persisted at least once: what a crash keeps.
    synced = box.wait_synced_chunks("crash")
    pid = box.session("crash")["pid"]
    os.kill(pid, signal.SIGKILL)
    psutil.Process(pid).wait(10) if psutil.pid_exists(pid) else None
    time.sleep(0.5)
    st = box.status("crash")
    assert st["state"] == "restoring" and not st["alive"]
    assert "resume" in (st["note"] or "")
    assert st["percent"] < 100
    r = box.cli("resume", "crash", env=SLOW)
    assert r.returncode == 0, r.stderr
    ping = box.wait_app()
    assert ping["commits"] == 0 or ping["pid"]  # a fresh application process
    resumed = box.status("crash")
    assert resumed["alive"] and resumed["state"] in ("restoring", "cutting-over", "done")
    # The restore continues where it was (the persisted map), it does not start over: at
    # least every chunk the map named when the process was killed is still restored.
    assert resumed["restored_bytes"] >= synced * (256 << 10)
    _read_unrestored_files(box)
    done = box.wait_state("crash", ("done", "failed"))
    assert done["state"] == "done", done.get("error")
    box.wait_app()
    box.stop_app()
    from dmrecover.system.mounts import umount

    umount(str(box.mnt))
    rows, acks = box.verify_dest(fs_tools)
    assert acks >= acks_before


def test_manual_cutover(box: Sandbox, fs_tools, request) -> None:
    box.prepare(fs_tools, _image(request, "ext4"))
    box.dest.unlink()  # a DEST file that does not exist yet is created
    overlay_dir = box.tmp / "ovl"
    r = box.live_restore("man", "--cutover", "manual", "--overlay", str(overlay_dir))
    assert r.returncode == 0, r.stderr
    assert box.dest.stat().st_size == box.size
    box.wait_app()
    ready = box.wait_state("man", ("ready", "failed"))
    assert ready["state"] == "ready"
    # --overlay puts the overlay there instead of the state dir; the restored map stays in
    # the state dir (it must not share fate with the overlay's space).
    assert (overlay_dir / "overlay.img").exists() and not (overlay_dir / "restored.map").exists()
    assert (box.state_root / "man" / "restored.map").exists()
    assert not (box.state_root / "man" / "overlay.img").exists()
    time.sleep(0.6)
    assert box.status("man")["state"] == "ready"
    # Still on the pseudo-volume: the loop is over the FUSE file.
    m = mount_at(str(box.mnt))
    backing = Path(f"/sys/block/{os.path.basename(m.source)}/loop/backing_file").read_text()
    assert backing.strip().startswith(str(box.state_root / "man" / "fuse"))
    r = box.cli("cutover", "man")
    assert r.returncode == 0, r.stderr
    assert "done" in r.stdout and "downtime" in r.stdout
    assert box.status("man")["state"] == "done"
    box.wait_app()
    box.stop_app()
    from dmrecover.system.mounts import umount

    umount(str(box.mnt))
    box.verify_dest(fs_tools)


def test_abort_keeps_overlay_then_resume(box: Sandbox, fs_tools, request) -> None:
    from dmrecover.repository.repo import Repository

    box.prepare(fs_tools, _image(request, "ext4"))
    r = box.live_restore("ab", env=SLOW)
    assert r.returncode == 0, r.stderr
    box.wait_app()
    time.sleep(1.0)
    r = box.cli("abort", "ab")
    assert r.returncode == 0, r.stderr
    sdir = box.state_root / "ab"
    assert str(sdir) in r.stdout and "overlay" in r.stdout
    assert box.session("ab")["state"] == "aborted"
    box.assert_app_gone()  # the application is stopped
    assert mount_at(str(box.mnt)) is None and mount_at(str(sdir / "fuse")) is None
    assert not box.loops_under()
    assert (sdir / "overlay.img").exists() and os.stat(sdir / "overlay.img").st_blocks > 0
    # Nothing on DEST is marked restored that is not: every chunk in the persisted map holds
    # exactly the backup's bytes.
    repo = Repository.open(box.repo)
    manifest = repo.manifest(box.backup_id)
    bm = Bitmap.load(sdir / "restored.map")
    marked = [i for i in range(len(manifest.chunks)) if bm.test(i)]
    assert 0 < len(marked) < len(manifest.chunks)
    # (DEST is marked incomplete: its first 4 KiB are kept in dest-head, zeros on DEST.)
    head = (sdir / "dest-head").read_bytes()
    with open(box.dest, "rb") as f:
        assert f.read(len(head)) == bytes(len(head)), "DEST is marked"
        for i in marked:
            f.seek(i * manifest.chunk_size)
            got = f.read(manifest.chunk_length(i))
            if i == 0:
                got = head + got[len(head):]
            assert got == repo.read_chunk(manifest, i), i
    # Resume after abort brings the application back with its writes and finishes.
    r = box.cli("resume", "ab")
    assert r.returncode == 0, r.stderr
    box.wait_app()
    done = box.wait_state("ab", ("done", "failed"))
    assert done["state"] == "done", done.get("error")
    box.wait_app()
    box.stop_app()
    from dmrecover.system.mounts import umount

    umount(str(box.mnt))
    box.verify_dest(fs_tools)
