"""End to end with `--backend dm` on a real kernel: a real application (SQLite, fsync'd
commits) runs on the dm snapshot pseudo-volume while the restore goes on, then the cutover in
restart mode (stop, snapshot-merge into DEST, mount DEST, start) and in online mode (table
swapped in place under the running application). DEST alone is then checked: every backed-up
file, the seed table, every acknowledged write. Nothing of the stack is left behind."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from dmrecover.backends.dm import dmsetup as dm
from dmrecover.system import loops
from dmrecover.system.mounts import mount_at
from tests.apps.livekit import Sandbox
from tests.kernel import conftest
from tests.kernel.kernelutil import (
    KilledSessionWrite,
    Waiters,
    dm_state,
    io_errors_since,
    kernel_log,
    repository_outage,
    ride_out_outage,
    source_path_failed,
    teardown_sandbox,
    verify_dest_alone,
)

SLOW = {"DMRECOVER_TEST_RESTORE_DELAY": "0.25"}

# The sandbox fixture lives in conftest.py; test_lvm.py and test_dm_origin.py import it, and
# dm_state, from here.
box = conftest.box


def _read_unrestored_files(box: Sandbox, count: int = 6) -> None:
    names = sorted(box.checksums)
    for rel in names[-count:] + names[:2]:
        r = box.query({"op": "sha256", "path": rel}, timeout=60)
        assert r == {"ok": True, "sha256": box.checksums[rel]}, rel


def _on_pseudo(box: Sandbox, session: str) -> None:
    m = mount_at(str(box.mnt))
    assert m is not None
    name = dm.dm_name(session, "pseudo")
    assert Path(m.source).resolve() == dm.mapper_path(name).resolve(), m.source
    inf = dm.info(name)
    assert inf is not None and inf.uuid == dm.dm_uuid(session, "pseudo")
    assert " snapshot " in f" {dm.table(name)} "
    assert dm.stable_path(session, "pseudo").resolve() == dm.mapper_path(name).resolve()


@pytest.mark.parametrize("fstype", ["ext4"])
def test_dm_restart_cutover(box: Sandbox, fs_tools, request, fstype: str) -> None:
    box.prepare(fs_tools, request.getfixturevalue(f"{fstype}_image"))
    r = box.live_restore("dmr", "--backend", "dm", env=SLOW)
    assert r.returncode == 0, r.stderr
    pid_before = box.wait_app(timeout=120)["pid"]
    st = box.status("dmr")
    assert st["state"] == "restoring" and st["percent"] < 80
    assert box.session("dmr")["backend"] == "dm"
    _on_pseudo(box, "dmr")
    _read_unrestored_files(box)
    time.sleep(1.0)
    # The application's writes are in the kernel's COW.
    cow = dm.snapshot_status(dm.dm_name("dmr", "pseudo"))
    assert cow.allocated > cow.metadata and not cow.invalid
    mid = box.status("dmr")
    assert mid["demand_fetches"] > 0

    done = box.wait_state("dmr", ("done", "failed"), timeout=600)
    assert done["state"] == "done", done.get("error")
    ping = box.wait_app(timeout=120)
    assert ping["pid"] != pid_before, "restart mode restarts the application"
    # Now on DEST itself (a loop over the DEST file); no dm device of ours is left.
    m = mount_at(str(box.mnt))
    backing = Path(f"/sys/block/{os.path.basename(m.source)}/loop/backing_file").read_text()
    assert backing.strip() == str(box.dest)
    assert not dm.list_owned("dmr")
    assert not (box.state_root / "dmr" / "cow.img").exists()
    n0 = box.query({"op": "count"})["rows"]
    time.sleep(0.5)
    assert box.query({"op": "count"})["rows"] > n0, "the application writes on DEST"
    _rows, acks = verify_dest_alone(box, fs_tools)
    print(f"dm restart: {acks} acknowledged writes, downtime "
          f"{done['timings']['cutover_downtime']:.2f} s")


def test_dm_online_cutover(box: Sandbox, fs_tools, request) -> None:
    box.prepare(fs_tools, request.getfixturevalue("ext4_image"))
    r = box.live_restore("dmo", "--backend", "dm", "--cutover", "online", env=SLOW)
    assert r.returncode == 0, r.stderr
    pid = box.wait_app(timeout=120)["pid"]
    _on_pseudo(box, "dmo")
    _read_unrestored_files(box)

    done = box.wait_state("dmo", ("done", "failed"), timeout=600)
    assert done["state"] == "done", done.get("error")
    # The same application process kept running on the same device, now linear on DEST.
    assert box.query({"op": "ping"})["pid"] == pid
    name = dm.dm_name("dmo", "pseudo")
    table = dm.table(name).split()
    assert table[2] == "linear", table
    m = mount_at(str(box.mnt))
    assert Path(m.source).resolve() == dm.mapper_path(name).resolve()
    # Its only dependency is DEST (a loop over the DEST file): origin, FUSE and COW are gone.
    deps = dm.dependencies(name)
    assert len(deps) == 1
    backing = Path(f"/sys/dev/block/{deps[0][0]}:{deps[0][1]}/loop/backing_file").read_text()
    assert backing.strip() == str(box.dest)
    sdir = box.state_root / "dmo"
    assert mount_at(str(sdir / "origin")) is None
    assert not (sdir / "cow.img").exists()
    assert done["timings"]["online_max_pause"] < 5
    n0 = box.query({"op": "count"})["rows"]
    time.sleep(0.5)
    assert box.query({"op": "count"})["rows"] > n0, "the application still writes"
    # cleanup leaves a finished session's device alone (the application runs on it).
    r = box.cli("cleanup", "--dry-run")
    assert name not in r.stdout, r.stdout
    _rows, acks = verify_dest_alone(box, fs_tools, name)
    print(f"dm online: {acks} acknowledged writes, longest pause "
          f"{done['timings']['online_max_pause'] * 1000:.0f} ms")


STEPS = ["dm-probe", "fuse", "origin-loop", "source", "cow", "cow-loop", "dm-pseudo", "mount",
         "app"]


def test_dm_setup_failure_at_each_step_leaves_nothing(box: Sandbox, fs_tools, request) -> None:
    """A failure injected at each set-up step: the session fails with the step named, and
    no dm device, loop, mount or process is left (the undo list ran)."""
    box.prepare(fs_tools, request.getfixturevalue("ext4_image"))
    before = dm_state()
    for i, step in enumerate(STEPS):
        name = f"f{i}"
        # --force: an earlier attempt may have restored the superblock onto DEST already.
        r = box.live_restore(name, "--backend", "dm", "--force",
                             env={"DMRECOVER_FAIL_AT": step})
        assert r.returncode != 0, step
        assert f"injected failure at step {step}" in r.stderr, (step, r.stderr)
        assert box.session(name)["state"] == "failed"
        assert mount_at(str(box.mnt)) is None, step
        assert not box.loops_under(), step
        assert not box.app_procs(), step
        assert dm_state() == before, step
        assert not dm.list_owned(name), step
        # A first set-up that failed leaves no COW file either.
        assert not (box.state_root / name / "cow.img").exists(), step


def test_killed_session_then_cleanup(box: Sandbox, fs_tools, request) -> None:
    """SIGKILL the session process (and its application): `dmrecover cleanup` removes its dm
    devices, loops and mounts, and `dmsetup ls` / `losetup -a` are as before the session."""
    import signal

    import psutil

    box.prepare(fs_tools, request.getfixturevalue("ext4_image"))
    before = dm_state()
    r = box.live_restore("k", "--backend", "dm", env=SLOW)
    assert r.returncode == 0, r.stderr
    box.wait_app(timeout=120)
    assert dm.list_owned("k")
    pid = box.session("k")["pid"]
    os.kill(pid, signal.SIGKILL)
    for p in box.app_procs():
        p.send_signal(signal.SIGKILL)
    psutil.wait_procs(box.app_procs(), timeout=20)
    time.sleep(0.5)
    assert dm.list_owned("k"), "the dead session's devices are still there"
    r = box.cli("cleanup", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert dm.dm_name("k", "pseudo") in r.stdout
    r = box.cli("cleanup")
    assert r.returncode == 0, r.stdout + r.stderr
    assert not dm.list_owned("k")
    assert mount_at(str(box.mnt)) is None
    assert dm_state() == before
    r = box.cli("cleanup")
    assert "nothing to clean up" in r.stdout


def _last_data_block(image: Path, block: int = 4096) -> int:
    """The offset of the image's last non-zero block (the restorer, going up, reaches it last)."""
    with open(image, "rb") as f:
        end = f.seek(0, os.SEEK_END)
        step = 1 << 20
        for start in range(max(end - step, 0), -step, -step):
            f.seek(max(start, 0))
            buf = f.read(step)
            for off in range(len(buf) - block, -1, -block):
                if buf[off:off + block].strip(b"\0"):
                    return max(start, 0) + off
    raise AssertionError(f"{image} holds no data")


def test_dm_session_killed_then_resumed(box: Sandbox, fs_tools, request) -> None:
    """SIGKILL the session process mid-restore, then write 512 bytes inside a 4 KiB chunk of
    backup data not restored yet: the snapshot must copy that chunk from the origin first.
    The origin's source waits (it does not fail: one failed copy invalidates the snapshot,
    and every write of the application in it is lost); `dmrecover resume` serves it again
    before it stops the application; the session completes with every acknowledged write
    on DEST, the one made while no session ran included."""
    import mmap
    import signal

    import psutil

    image = request.getfixturevalue("ext4_image")
    box.prepare(fs_tools, image)
    r = box.live_restore("kr", "--backend", "dm", env=SLOW)
    assert r.returncode == 0, r.stderr
    box.wait_app(timeout=120)
    pseudo = dm.dm_name("kr", "pseudo")
    off = _last_data_block(image) + 512
    with open(image, "rb") as f:
        f.seek(off)
        data = f.read(512)  # the same bytes: the filesystem above sees no change
    log_before = len(kernel_log())
    spid = box.session("kr")["pid"]
    proc = psutil.Process(spid)  # before the kill: a killed session is reaped at once
    os.kill(spid, signal.SIGKILL)
    psutil.wait_procs([proc], timeout=20)
    def write_partial_chunk() -> None:
        buf = mmap.mmap(-1, 4096)  # O_DIRECT wants an aligned buffer
        buf[:512] = data
        fd = os.open(dm.mapper_path(pseudo), os.O_WRONLY | os.O_DIRECT)
        try:
            assert os.pwrite(fd, memoryview(buf)[:512], off) == 512
            os.fsync(fd)
        finally:
            os.close(fd)

    writer = KilledSessionWrite(write_partial_chunk)
    writer.started()
    assert "Invalid" not in dm.status(pseudo), dm.status(pseudo)
    source_path_failed("kr")
    for p in box.app_procs():
        p.send_signal(signal.SIGKILL)  # may wait in D state for its queued I/O
    r = box.cli("resume", "kr")
    assert r.returncode == 0, r.stdout + r.stderr
    writer.finished()
    bad = io_errors_since(log_before, "nvalidat", "EXT4-fs error")
    assert not bad, bad
    box.wait_app(timeout=180)
    done = box.wait_state("kr", ("done", "failed"), timeout=600)
    assert done["state"] == "done", done.get("error")
    box.wait_app(timeout=120)
    # What is left is the online cutover's linear on DEST, if that was the cutover.
    assert {i.name for i in dm.list_owned("kr")} <= {pseudo}
    verify_dest_alone(box, fs_tools, pseudo if dm.info(pseudo) else None)
    with open(box.dest, "rb") as f:
        f.seek(off)
        assert f.read(512) == data


def test_sandbox_teardown_mid_restore_leaves_nothing(tmp_path: Path, fs_tools,
                                                     ext4_image: Path) -> None:
    """The `box` fixture's end after a test that failed mid-restore (session, application,
    FUSE origin, loops and dm devices all up) leaves nothing behind. It once left the origin's
    loop: looked up by its path after the FUSE mount under it was lazily unmounted, when the
    kernel names that file "/volume"."""
    sb = Sandbox(tmp_path / "sb")
    before = dm_state()
    sb.prepare(fs_tools, ext4_image)
    r = sb.live_restore("td", "--backend", "dm", env=SLOW)
    assert r.returncode == 0, r.stderr
    sb.wait_app(timeout=120)
    assert sb.status("td")["state"] == "restoring"
    fuse_dir = str(sb.state_root / "td" / "origin")
    assert any(path.startswith(fuse_dir + "/") for _dev, path in loops.loops_backed_under(sb.tmp))
    teardown_sandbox(sb, before)


def _origin_loop_dio(pseudo: str) -> bool:
    """Whether the snapshot's origin (its first dependency, a loop) reads with direct I/O."""
    origin = dm.table(pseudo).split()[3]  # "0 <len> snapshot <origin> <cow> P 8"
    name = os.path.basename(os.path.realpath(origin)) if not origin[0].isdigit() else \
        os.path.basename(os.path.realpath(f"/sys/dev/block/{origin}"))
    if name.startswith("dm-"):  # the origin device (dm/origin.py) -> source -> FUSE loop
        name = _fuse_loop_under(name)
    return Path(f"/sys/block/{name}/loop/dio").read_text().strip() == "1"


def _fuse_loop_under(name: str) -> str:
    """The loop over the FUSE origin file somewhere under block device `name` (the origin's
    FUSE segments name the waiting source, backends/dm/waitpath.py, over that loop)."""
    for n in os.listdir(f"/sys/block/{name}/slaves"):
        backing = Path(f"/sys/block/{n}/loop/backing_file")
        if backing.exists() and backing.read_text().strip().endswith("/origin/volume"):
            return n
        if n.startswith("dm-"):
            try:
                return _fuse_loop_under(n)
            except LookupError:
                continue
    raise LookupError(f"no loop over the FUSE origin under {name}")


def _read_direct(dev: str, offset: int, length: int) -> int:
    """An O_DIRECT read of the device (unrestored data: waits for the repository)."""
    import mmap

    buf = mmap.mmap(-1, length)  # page-aligned, as O_DIRECT wants
    fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
    try:
        return os.preadv(fd, [buf], offset)
    finally:
        os.close(fd)
        buf.close()


def test_repository_unreachable_30s_no_io_error(box: Sandbox, fs_tools, request) -> None:
    """The repository vanishes for 30 s mid-restore (an empty tmpfs mounted over it): the
    application's reads of unrestored data wait instead of failing, status shows the wait,
    the snapshot stays valid, and the session completes with every acknowledged write.

    With the origin loop on direct I/O (the default) many origin reads wait at once; a dozen
    more direct reads of the pseudo-volume wait too, so that many fetches retry when the
    repository comes back: one of them, told "chunk missing" by a repository that came back
    between its failed open and its check, once invalidated the snapshot here."""

    box.prepare(fs_tools, request.getfixturevalue("ext4_image"))
    r = box.live_restore("out", "--backend", "dm", env=SLOW)
    assert r.returncode == 0, r.stderr
    box.wait_app(timeout=120)
    pseudo = dm.dm_name("out", "pseudo")
    assert _origin_loop_dio(pseudo), "the origin loop reads with direct I/O by default"
    log_before = len(kernel_log())
    last = sorted(box.checksums)[-1]
    dev = f"/dev/mapper/{pseudo}"
    size = int(subprocess.run(["blockdev", "--getsize64", dev], capture_output=True,
                              text=True, check=True).stdout)
    # The last quarter of the volume: not restored yet at a 0.25 s per chunk pace.
    direct_offsets = [size * 3 // 4 + i * (size // 64) // 4096 * 4096 for i in range(12)]
    waiting = Waiters()
    with repository_outage(box) as since:
        time.sleep(1.0)
        waiting.start("file", box.query, {"op": "sha256", "path": last}, 180)
        for offset in direct_offsets:
            waiting.start(offset, _read_direct, dev, offset, 256 << 10)
        ride_out_outage(box, "out", since)
        assert not dm.snapshot_status(dm.dm_name("out", "pseudo")).invalid
    waiting.join(180)
    assert waiting.answers.pop("file") == {"ok": True, "sha256": box.checksums[last]}
    assert waiting.answers == {o: 256 << 10 for o in direct_offsets}
    done = box.wait_state("out", ("done", "failed"), timeout=600)
    assert done["state"] == "done", done.get("error")
    bad = [line for line in kernel_log()[log_before:]
           if "Invalidating snapshot" in line or "I/O error" in line]
    assert not bad, bad
    session_log = (box.state_root / "out" / "session.log").read_text()
    assert "is missing" not in session_log, session_log[-2000:]
    box.wait_app(timeout=120)
    verify_dest_alone(box, fs_tools)
    app_log = (box.state_root / "out" / "app.log").read_text()
    assert "I/O error" not in app_log and "disk I/O" not in app_log, app_log[-2000:]


def test_dm_manual_then_cutover_online_command(box: Sandbox, fs_tools, request) -> None:
    """`--cutover manual`, then `dmrecover cutover --online`: no application stop."""
    box.prepare(fs_tools, request.getfixturevalue("ext4_image"))
    r = box.live_restore("dmm", "--backend", "dm", "--cutover", "manual")
    assert r.returncode == 0, r.stderr
    pid = box.wait_app(timeout=120)["pid"]
    ready = box.wait_state("dmm", ("ready", "failed"), timeout=600)
    assert ready["state"] == "ready", ready.get("error")
    _on_pseudo(box, "dmm")
    r = box.cli("cutover", "--online", "dmm")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "done" in r.stdout
    assert box.query({"op": "ping"})["pid"] == pid
    name = dm.dm_name("dmm", "pseudo")
    assert dm.table(name).split()[2] == "linear"
    verify_dest_alone(box, fs_tools, name)


def test_portable_backend_xfs_on_this_kernel(box: Sandbox, fs_tools, request) -> None:
    """The portable backend on Debian 12's own kernel (6.1, whose loop the host's 6.18 is not):
    an XFS served through FUSE and a loop in direct I/O (XFS writes 512-byte log sectors),
    the application writing while the restore runs, then the restart cutover; DEST alone then
    holds every file and every acknowledged write."""
    box.prepare(fs_tools, request.getfixturevalue("xfs_image"))
    log_before = len(kernel_log())
    r = box.live_restore("px", "--backend", "fuse", env=SLOW)
    assert r.returncode == 0, r.stderr
    box.wait_app(timeout=120)
    m = mount_at(str(box.mnt))
    assert m is not None and m.source.startswith("/dev/loop") and m.fstype == "xfs"
    loop = os.path.basename(m.source)
    assert Path(f"/sys/block/{loop}/loop/dio").read_text().strip() == "1"
    assert Path(f"/sys/block/{loop}/loop/backing_file").read_text().strip().endswith("/volume")
    _read_unrestored_files(box)
    time.sleep(1.0)
    mid = box.status("px")
    assert mid["demand_fetches"] > 0 and mid["overlay_bytes"] > 0
    done = box.wait_state("px", ("done", "failed"), timeout=600)
    assert done["state"] == "done", done.get("error")
    box.wait_app(timeout=120)
    m = mount_at(str(box.mnt))
    backing = Path(f"/sys/block/{os.path.basename(m.source)}/loop/backing_file").read_text()
    assert backing.strip() == str(box.dest)
    verify_dest_alone(box, fs_tools)
    bad = ("I/O error", "Corruption", "Shutting down", "Failing async", "Internal error")
    errors = [line for line in kernel_log()[log_before:] if any(b in line for b in bad)]
    assert not errors, errors
