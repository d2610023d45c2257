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
