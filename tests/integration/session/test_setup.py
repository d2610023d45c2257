"""live-restore's validation (one-line errors, nothing changed), the set-up undo list (a
failure injected at each step leaves no mount, loop, FUSE mount or process), a crash during
the cutover's merge (resume re-runs it), an unmount refused while a stray process holds the
mount, and `dmrecover cleanup` after a killed session."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import psutil
import pytest

from dmrecover.session.record import lock_held
from dmrecover.system import command  # noqa: E402
from dmrecover.system.mounts import mount_at, umount  # noqa: E402
from tests.apps.livekit import ENV_KEYS, Sandbox
from tests.integration.sandboxes import torn_down

pytestmark = pytest.mark.root
MiB = 1 << 20


@pytest.fixture
def box(tmp_path: Path):
    with torn_down(Sandbox(tmp_path)) as sb:
        yield sb


@pytest.fixture
def small(box: Sandbox, fs_tools) -> Sandbox:
    """A 16 MiB ext4 volume with a few files, backed up in 64 KiB chunks."""
    img = box.tmp / "small.img"
    with open(img, "wb") as f:
        f.truncate(16 * MiB)
    fs_tools.mkfs(img, "ext4")
    with fs_tools.mounted(img) as m:
        fs_tools.fill_with_data(m, seed=5, budget=6 * MiB)
    box.prepare(fs_tools, img, chunk_size=64 << 10)
    return box


def _snapshot(box: Sandbox) -> dict:
    """What must not change when live-restore refuses."""
    dest = box.dest
    return {
        "dest": (dest.exists() and (os.stat(dest).st_size, os.stat(dest).st_mtime_ns)),
        "state": sorted(p.name for p in box.state_root.iterdir()),
        "mnt": sorted(os.listdir(box.mnt)) if box.mnt.is_dir() else None,
        "mounts": box.mounts_under(),
        "loops": box.loops_under(),
    }


def _refused(box: Sandbox, r: subprocess.CompletedProcess[str], before: dict, *words: str
             ) -> None:
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("dmrecover: error: ")
    for w in words:
        assert w in lines[0], lines[0]
    assert _snapshot(box) == before
    box.assert_app_gone()


def _resume_to_done(box: Sandbox, name: str) -> None:
    """`dmrecover resume name` is accepted and the session runs to done."""
    r = box.cli("resume", name)
    assert r.returncode == 0, r.stderr
    assert box.wait_state(name, ("done", "failed"))["state"] == "done"


def _stop_and_verify(box: Sandbox, fs_tools: ModuleType | None = None) -> None:
    """The application runs on DEST: stop it, unmount, and (given fs_tools) check DEST."""
    box.wait_app()
    box.stop_app()
    umount(str(box.mnt))
    if fs_tools is not None:
        box.verify_dest(fs_tools)


def test_validation_errors(small: Sandbox, loop_device) -> None:
    box = small
    before = _snapshot(box)
    app = box.app_args()
    base = ["live-restore", "--repo", str(box.repo), box.backup_id]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return box.cli(*args)

    _refused(box, run("live-restore", "--repo", str(box.tmp / "norepo"), "x", str(box.dest),
                      "--mount", str(box.mnt), *app), before, "norepo")
    _refused(box, run(*base[:3], "nosuchbackup", str(box.dest), "--mount", str(box.mnt), *app),
             before, "nosuchbackup")
    _refused(box, run(*base, str(box.dest), "--mount", str(box.tmp / "nomnt"), *app), before,
             "does not exist")
    (box.mnt / "file").write_text("x")
    before_full = _snapshot(box)
    _refused(box, run(*base, str(box.dest), "--mount", str(box.mnt), *app), before_full,
             "not empty")
    (box.mnt / "file").unlink()
    _refused(box, run(*base, str(box.dest), "--mount", str(box.mnt)), before, "--app-start")
    _refused(box, run(*base, str(box.dest), "--mount", str(box.mnt), *app, "--app-unit",
                      "x.service"), before, "--app-unit")
    _refused(box, run(*base, str(box.dest), "--mount", str(box.mnt), *app, "--backend", "dm"),
             before, "dm")
    _refused(box, run(*base, str(box.tmp / "nodir" / "dest.img"), "--mount", str(box.mnt),
                      *app), before, "nodir")
    # DEST too small (a block device cannot grow).
    tiny = box.tmp / "tiny.img"
    with open(tiny, "wb") as f:
        f.truncate(4 * MiB)
    dev = loop_device(tiny)
    before_dev = _snapshot(box)
    _refused(box, run(*base, dev, "--mount", str(box.mnt), *app), before_dev, "too small")
    # DEST held (attached to a loop) and DEST holding a filesystem.
    dev2 = loop_device(box.dest)
    before_held = _snapshot(box)
    _refused(box, run(*base, str(box.dest), "--mount", str(box.mnt), *app), before_held,
             "held by")
    command.run(["losetup", "-d", dev2])
    fsimg = box.tmp / "fs.img"
    with open(fsimg, "wb") as f:
        f.truncate(16 * MiB)
    command.run(["mkfs.ext4", "-q", "-F", str(fsimg)])
    before_fs = _snapshot(box)
    _refused(box, run(*base, str(fsimg), "--mount", str(box.mnt), *app), before_fs,
             "filesystem", "--force")
    # The mount point is already a mount point.
    command.run(["mount", "-t", "tmpfs", "tmpfs", str(box.mnt)])
    try:
        before_mp = _snapshot(box)
        _refused(box, run(*base, str(box.dest), "--mount", str(box.mnt), *app), before_mp,
                 "mount point")
    finally:
        command.run(["umount", str(box.mnt)])
    # A state dir holding an unfinished session.
    sdir = box.state_root / "busy"
    sdir.mkdir()
    (sdir / "session.json").write_text(json.dumps({"name": "busy", "state": "restoring"}))
    before_busy = _snapshot(box)
    _refused(box, run(*base, str(box.dest), "--mount", str(box.mnt), "--session", "busy", *app),
             before_busy, "busy", "resume")


@pytest.mark.parametrize("step", ["fuse", "loop", "mount", "app"])
def test_failure_at_each_setup_step_leaves_nothing(small: Sandbox, step: str) -> None:
    box = small
    r = box.live_restore("f", env={"DMRECOVER_FAIL_AT": step})
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and f"injected failure at step {step}" in lines[0], r.stderr
    sess = box.session("f")
    assert sess["state"] == "failed" and step in sess["error"]
    time.sleep(0.3)
    assert mount_at(str(box.mnt)) is None
    assert mount_at(str(box.state_root / "f" / "fuse")) is None
    assert not box.loops_under()
    box.assert_app_gone()
    assert not lock_held(str(box.state_root / "f"))  # no session process is left
    assert "undo" in (box.state_root / "f" / "session.log").read_text() or step == "fuse"
    # After the failure is gone, resume brings it up and finishes it.
    _resume_to_done(box, "f")
    _stop_and_verify(box)


def test_crash_during_merge_resume_reruns_it(small: Sandbox, fs_tools) -> None:
    box = small
    r = box.live_restore("m", env={"DMRECOVER_FAIL_AT": "cutover-merge"})
    assert r.returncode == 0, r.stderr
    s = box.wait_state("m", ("failed", "done"))
    assert s["state"] == "failed" and s["cutover_phase"] == "merge"
    assert mount_at(str(box.mnt)) is None and not box.loops_under()
    box.assert_app_gone()
    assert (box.state_root / "m" / "overlay.img").exists()
    _resume_to_done(box, "m")
    _stop_and_verify(box, fs_tools)


def test_cutover_refused_while_a_stray_process_holds_the_mount(small: Sandbox) -> None:
    box = small
    r = box.live_restore("busy", "--cutover", "manual")
    assert r.returncode == 0, r.stderr
    box.wait_state("busy", ("ready",))
    app_pid = box.wait_app()["pid"]
    holder = subprocess.Popen(["sleep", "60"], cwd=box.mnt)
    try:
        r = box.cli("cutover", "busy")
        assert r.returncode != 0
        assert f"{holder.pid} (sleep)" in r.stderr, r.stderr
        s = box.session("busy")
        assert s["state"] == "ready" and "held by" in s["error"]
        # Strangers are checked once the application has stopped (so that the application's
        # own processes are never taken for strangers): the refusal starts it again on the
        # pseudo-volume, where it answers (a new process).
        assert box.wait_app()["pid"] != app_pid
        assert box.session("busy")["state"] == "ready"
    finally:
        holder.kill()
        holder.wait()
    r = box.cli("cutover", "busy")
    assert r.returncode == 0, r.stderr
    _stop_and_verify(box)


def test_cleanup_after_killed_session(small: Sandbox) -> None:
    box = small
    loops_before = set(box.loops_under())
    r = box.live_restore("k", env={"DMRECOVER_TEST_RESTORE_DELAY": "0.05"})
    assert r.returncode == 0, r.stderr
    box.wait_app()
    pid = box.session("k")["pid"]
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.3)
    for p in box.app_procs():
        p.kill()
    psutil.wait_procs(box.app_procs(), timeout=10)
    r = box.cli("cleanup", "--dry-run")
    assert r.returncode == 0
    # The mount, the loop under it and the dead FUSE mount under that, each named.
    assert str(box.mnt) in r.stdout and "/dev/loop" in r.stdout
    assert str(box.state_root / "k") in r.stdout and "fuse" in r.stdout.lower()
    assert box.mounts_under()  # dry run touched nothing
    r = box.cli("cleanup")
    assert r.returncode == 0, r.stdout + r.stderr
    assert not box.mounts_under()
    assert set(box.loops_under()) == loops_before
    r = box.cli("cleanup", "--dry-run")
    assert str(box.tmp) not in r.stdout


def test_foreground_session_runs_to_done(small: Sandbox, fs_tools) -> None:
    box = small
    r = box.live_restore("fg", "--foreground")
    assert r.returncode == 0, r.stderr
    assert "session fg" in r.stdout  # printed once the application ran
    s = box.session("fg")
    assert s["state"] == "done" and s["pid"] is None
    _stop_and_verify(box, fs_tools)


def test_sigterm_suspends_and_resume_continues(small: Sandbox, fs_tools) -> None:
    box = small
    r = box.live_restore("t", env={"DMRECOVER_TEST_RESTORE_DELAY": "0.05"})
    assert r.returncode == 0, r.stderr
    box.wait_app()
    time.sleep(0.5)
    pid = box.session("t")["pid"]
    os.kill(pid, signal.SIGTERM)
    psutil.wait_procs([psutil.Process(pid)], timeout=30)
    s = box.session("t")
    assert s["state"] == "restoring" and s["pid"] is None
    assert mount_at(str(box.mnt)) is None and not box.loops_under()
    assert mount_at(str(box.state_root / "t" / "fuse")) is None
    box.assert_app_gone()
    _resume_to_done(box, "t")
    _stop_and_verify(box, fs_tools)


def test_block_device_destination(small: Sandbox, fs_tools, loop_device) -> None:
    box = small
    dev = loop_device(box.dest)  # DEST is a block device now (the zeroed file behind it)
    r = box.cli("live-restore", "--repo", str(box.repo), box.backup_id, dev, "--mount",
                str(box.mnt), "--session", "blk", *box.app_args())
    assert r.returncode == 0, r.stderr
    assert box.wait_state("blk", ("done", "failed"))["state"] == "done"
    m = mount_at(str(box.mnt))
    assert m is not None and m.source == dev  # DEST itself, no extra loop
    _stop_and_verify(box, fs_tools)


def test_application_that_fails_to_start(small: Sandbox) -> None:
    box = small
    r = box.cli("live-restore", "--repo", str(box.repo), box.backup_id, str(box.dest),
                "--mount", str(box.mnt), "--session", "bad", "--app-start",
                f"{sys.executable} -c 'import sys; sys.exit(7)'")
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "exited with code 7" in lines[0], r.stderr
    assert box.session("bad")["state"] == "failed"
    assert mount_at(str(box.mnt)) is None and not box.loops_under()
    assert mount_at(str(box.state_root / "bad" / "fuse")) is None
    # The same name is refused until the failed session is dealt with, and says how.
    r = box.cli("live-restore", "--repo", str(box.repo), box.backup_id, str(box.dest),
                "--mount", str(box.mnt), "--session", "bad", *box.app_args())
    assert r.returncode != 0 and "dmrecover resume bad" in r.stderr


def test_the_session_process_keeps_nothing_of_its_callers(small: Sandbox, fs_tools) -> None:
    """live-restore forks its session process: a descriptor its caller handed it (a pipe, as
    a shell's `3>` would) is not held by the session, so the caller's reader sees EOF once the
    command has returned; the session's stdin is /dev/null, its stdout and stderr session.log."""
    box = small
    env = {k: v for k, v in os.environ.items() if k not in ENV_KEYS}
    env.update(box.env)
    argv = [sys.executable, "-m", "dmrecover", "live-restore", "--repo", str(box.repo),
            box.backup_id, str(box.dest), "--mount", str(box.mnt), "--session", "fd",
            *box.app_args()]
    rd, wr = os.pipe()
    try:
        r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300,
                           cwd="/", pass_fds=(wr,))
        os.close(wr)
        wr = -1
        assert r.returncode == 0, r.stderr
        pid = box.session("fd")["pid"]
        pipe = f"pipe:[{os.fstat(rd).st_ino}]"
        held = {os.readlink(f"/proc/{pid}/fd/{n}") for n in os.listdir(f"/proc/{pid}/fd")}
        assert pipe not in held
        assert os.readlink(f"/proc/{pid}/fd/0") == os.devnull
        log = str(box.state_root / "fd" / "session.log")
        assert os.readlink(f"/proc/{pid}/fd/1") == log == os.readlink(f"/proc/{pid}/fd/2")
        ready, _, _ = select.select([rd], [], [], 30)
        assert ready and os.read(rd, 1) == b""  # EOF: nobody holds the write end
    finally:
        os.close(rd)
        if wr >= 0:
            os.close(wr)
    box.wait_state("fd", ("done",))
    _stop_and_verify(box, fs_tools)
