"""Hardening of the session side (issue 9), on this host's portable backend: claims held for
the whole session, private files, DEST marked while incomplete, no wedged session."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.apps.livekit import ENV_KEYS, Sandbox

pytestmark = [pytest.mark.root, pytest.mark.slow]

SLOW = {"DMRECOVER_TEST_RESTORE_DELAY": "0.06"}


@pytest.fixture
def box(tmp_path: Path):
    sb = Sandbox(tmp_path)
    try:
        yield sb
    finally:
        sb.teardown()


def _popen_live_restore(box: Sandbox, session: str, mnt: Path, appstate: Path
                        ) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k not in ENV_KEYS}
    env.update(box.env)
    env.update(SLOW)
    py = sys.executable
    args = ["live-restore", "--repo", str(box.repo), box.backup_id, str(box.dest),
            "--mount", str(mnt), "--session", session, "--app-start",
            f"{py} -m dmrecover.demo.sampleapp serve --data {mnt} --state {appstate}",
            "--app-stop", f"{py} -m dmrecover.demo.sampleapp stop --state {appstate}"]
    return subprocess.Popen([py, "-m", "dmrecover", *args], env=env, cwd="/", text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _abort_all(box: Sandbox) -> None:
    for d in box.state_root.glob("*"):
        if (d / "session.json").exists():
            box.cli("abort", d.name)


def test_two_live_restores_on_one_dest_at_once_exactly_one_is_accepted(
        box: Sandbox, fs_tools, ext4_image, tmp_path: Path) -> None:
    box.prepare(fs_tools, ext4_image)
    mnt2, app2 = tmp_path / "mnt2", tmp_path / "appstate2"
    mnt2.mkdir()
    app2.mkdir()
    try:
        procs = [_popen_live_restore(box, "one", box.mnt, box.appstate),
                 _popen_live_restore(box, "two", mnt2, app2)]
        results = [p.communicate(timeout=300) for p in procs]
        codes = [p.returncode for p in procs]
        assert sorted(codes)[0] == 0 and codes.count(0) == 1, (codes, results)
        loser = results[codes.index(0) ^ 1][1]
        assert "in use by session" in loser and "Traceback" not in loser, loser
    finally:
        _abort_all(box)


def test_two_live_restores_on_one_mount_point_at_once_exactly_one_is_accepted(
        box: Sandbox, fs_tools, ext4_image, tmp_path: Path) -> None:
    box.prepare(fs_tools, ext4_image)
    app2 = tmp_path / "appstate2"
    app2.mkdir()
    other_dest = tmp_path / "dest2.img"
    try:
        p1 = _popen_live_restore(box, "one", box.mnt, box.appstate)
        box.dest, keep = other_dest, box.dest
        p2 = _popen_live_restore(box, "two", box.mnt, app2)
        box.dest = keep
        results = [p.communicate(timeout=300) for p in (p1, p2)]
        codes = [p1.returncode, p2.returncode]
        assert codes.count(0) == 1, (codes, results)
        loser = results[codes.index(0) ^ 1][1]
        assert ("in use by session" in loser or "already a mount point" in loser), loser
        assert "Traceback" not in loser
        # The loser changed nothing: its DEST was not left behind.
        if codes[1] != 0:
            assert not other_dest.exists()
    finally:
        _abort_all(box)


def _mode(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


def test_everything_the_session_creates_is_private(box: Sandbox, fs_tools, ext4_image,
                                                   tmp_path: Path) -> None:
    box.prepare(fs_tools, ext4_image)
    box.dest.unlink()  # dmrecover creates DEST
    ovl = tmp_path / "ovl"
    try:
        r = box.live_restore("priv", "--overlay", str(ovl), env=SLOW)
        assert r.returncode == 0, r.stderr
        box.wait_app()
        sdir = box.state_root / "priv"
        deadline = time.monotonic() + 30
        while not (sdir / "status.json").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _mode(box.dest) == 0o600
        assert _mode(sdir) == 0o700 and _mode(ovl) == 0o700
        for p in [*sdir.iterdir(), *ovl.iterdir()]:
            if p.is_file() and not p.is_symlink():
                assert _mode(p) & 0o077 == 0, f"{p} is {_mode(p):o}"
    finally:
        _abort_all(box)


def test_status_as_another_user_is_one_clear_line(box: Sandbox, fs_tools, ext4_image) -> None:
    box.prepare(fs_tools, ext4_image)
    try:
        r = box.live_restore("st", env=SLOW)
        assert r.returncode == 0, r.stderr
        env = {k: v for k, v in os.environ.items() if k not in ENV_KEYS}
        env.update(box.env)
        env["PYTHONPATH"] = str(Path(__file__).resolve().parents[3])
        os.chmod(box.tmp, 0o755)
        os.chmod(box.tmp.parent, 0o755)
        res = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                              sys.executable, "-m", "dmrecover", "status", "st"], env=env,
                             capture_output=True, text=True, cwd="/", timeout=120)
        assert res.returncode != 0
        assert "Traceback" not in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert "st" in res.stderr
    finally:
        _abort_all(box)


def test_a_state_dir_another_user_can_write_is_refused(box: Sandbox, fs_tools, ext4_image,
                                                       tmp_path: Path) -> None:
    box.prepare(fs_tools, ext4_image)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    os.chown(foreign, 65534, 65534)
    r = box.live_restore("fx", "--state-dir", str(foreign))
    assert r.returncode != 0 and "owned by uid 65534" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert not (foreign / "session.json").exists()
    link = tmp_path / "link"
    os.symlink(box.state_root, link)
    r = box.live_restore("fx", "--state-dir", str(link))
    assert r.returncode != 0 and "symbolic link" in r.stderr, r.stderr


def test_a_session_json_another_user_could_change_is_not_trusted(
        box: Sandbox, fs_tools, ext4_image) -> None:
    box.prepare(fs_tools, ext4_image)
    r = box.live_restore("tr", env=SLOW)
    assert r.returncode == 0, r.stderr
    r = box.cli("abort", "tr")
    assert r.returncode == 0, r.stderr
    sj = box.state_root / "tr" / "session.json"
    os.chown(sj, 65534, 65534)
    r = box.cli("resume", "tr")
    assert r.returncode != 0 and "not trusted" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    os.chown(sj, 0, 0)
    os.chmod(sj, 0o666)
    r = box.cli("resume", "tr")
    assert r.returncode != 0 and "not trusted" in r.stderr, r.stderr


def test_a_file_dest_without_room_is_refused_up_front_and_one_with_room_is_preallocated(
        box: Sandbox, fs_tools, ext4_image, tmp_path: Path) -> None:
    from dmrecover.system.mounts import umount

    box.prepare(fs_tools, ext4_image)
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(small)], check=True)
    try:
        keep, box.dest = box.dest, small / "dest.img"
        r = box.live_restore("room")
        box.dest = keep
        assert r.returncode != 0 and "needs" in r.stderr and "free" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
        assert not (small / "dest.img").exists(), "nothing changed"
        assert not (box.state_root / "room").exists()
    finally:
        umount(str(small))
    box.dest.unlink()
    try:
        r = box.live_restore("room", env=SLOW)
        assert r.returncode == 0, r.stderr
        assert box.dest.stat().st_blocks * 512 >= box.size, "DEST is preallocated, not sparse"
    finally:
        _abort_all(box)
