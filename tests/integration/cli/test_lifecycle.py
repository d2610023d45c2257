"""A session's life after its end, through the real CLI on real loop devices: `forget` for
done, aborted and failed sessions (what it keeps, what it refuses), a name reused only after
forget, and `resume` with a corrected --app-start."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dmrecover.system.mounts import mount_at, umount
from tests.apps.livekit import Sandbox

pytestmark = pytest.mark.root
MiB = 1 << 20


@pytest.fixture
def box(tmp_path: Path, fs_tools):
    sb = Sandbox(tmp_path)
    img = tmp_path / "small.img"
    with open(img, "wb") as f:
        f.truncate(16 * MiB)
    fs_tools.mkfs(img, "ext4")
    with fs_tools.mounted(img) as m:
        fs_tools.fill_with_data(m, seed=13, budget=4 * MiB)
    sb.prepare(fs_tools, img, chunk_size=64 << 10)
    try:
        yield sb
    finally:
        sb.teardown()
        assert not sb.mounts_under() and not sb.loops_under()


def _one_line_error(r: subprocess.CompletedProcess[str], *words: str) -> str:
    assert r.returncode != 0, r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dmrecover: error: "), r.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def _status_list(box: Sandbox) -> str:
    r = box.cli("status")
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_done_session_is_forgotten_and_its_name_reused(box: Sandbox) -> None:
    r = box.live_restore("db")
    assert r.returncode == 0, r.stderr
    assert box.wait_state("db", ("done", "failed"))["state"] == "done"
    box.wait_app()
    listing = _status_list(box)
    assert "finished (`dmrecover forget SESSION`" in listing, listing
    assert "db                   done" in listing and f"runs on {box.dest}" in listing
    # The name is not silently reused: the done record and its running app stay known.
    before = (box.state_root / "db" / "session.json").read_bytes()
    _one_line_error(box.live_restore("db", "--force"), "session db", "is done",
                    "dmrecover forget db")
    assert (box.state_root / "db" / "session.json").read_bytes() == before

    r = box.cli("forget", "db")
    assert r.returncode == 0, r.stderr
    assert f"removed {box.state_root / 'db'}" in r.stdout
    assert f"the application keeps running on {box.dest} at {box.mnt}" in r.stdout
    assert not (box.state_root / "db").exists()
    box.wait_app()  # untouched: it still answers on DEST
    assert mount_at(str(box.mnt)) is not None
    assert "no sessions" in _status_list(box)

    # The name is free: a new live-restore under it runs (DEST reused with --force).
    box.stop_app()
    umount(str(box.mnt))
    r = box.live_restore("db", "--force")
    assert r.returncode == 0, r.stderr
    assert box.wait_state("db", ("done", "failed"))["state"] == "done"


def test_aborted_session_keeps_its_overlay_unless_discarded(box: Sandbox) -> None:
    r = box.live_restore("ab", "--cutover", "manual")
    assert r.returncode == 0, r.stderr
    box.wait_app()
    r = box.cli("abort", "ab")
    assert r.returncode == 0, r.stderr
    assert "dmrecover forget ab --discard-overlay" in r.stdout
    listing = _status_list(box)
    assert "finished" in listing and "ab" in listing
    files = sorted(p.name for p in (box.state_root / "ab").iterdir())
    _one_line_error(box.cli("forget", "ab"), "holds the application's writes",
                    "dmrecover resume ab", "--discard-overlay")
    assert sorted(p.name for p in (box.state_root / "ab").iterdir()) == files
    r = box.cli("forget", "ab", "--discard-overlay")
    assert r.returncode == 0, r.stderr
    assert f"{box.dest} holds an incomplete restore" in r.stdout
    assert "discarded" in r.stdout
    assert not (box.state_root / "ab").exists()
    assert not box.mounts_under() and not box.app_procs()


def test_running_session_cannot_be_forgotten(box: Sandbox) -> None:
    r = box.live_restore("run", "--cutover", "manual")
    assert r.returncode == 0, r.stderr
    box.wait_state("run", ("restoring", "ready"))
    _one_line_error(box.cli("forget", "run"), "session run is running",
                    "dmrecover cutover run", "dmrecover abort run")
    assert (box.state_root / "run" / "session.json").exists()
    assert box.cli("abort", "run").returncode == 0


def test_resume_with_a_corrected_app_start(box: Sandbox) -> None:
    good = box.app_args()
    typo = ["--app-start", good[1].replace(sys.executable, sys.executable + "3.11x"),
            "--app-stop", good[3]]
    r = box.cli("live-restore", "--repo", str(box.repo), box.backup_id, str(box.dest),
                "--mount", str(box.mnt), "--session", "typo", *typo)
    assert r.returncode != 0
    assert box.session("typo")["state"] == "failed"
    record = (box.state_root / "typo" / "session.json").read_bytes()
    # refused as live-restore refuses it, and nothing recorded
    for bad, word in ((["--app-start", good[1], "--app-unit", "x.service"], "not allowed"),
                      (["--app-start", "'unclosed"], "cannot parse")):
        _one_line_error(box.cli("resume", "typo", *bad), word)
        assert (box.state_root / "typo" / "session.json").read_bytes() == record
    r = box.cli("resume", "typo", *good)
    assert r.returncode == 0, r.stderr
    assert "the application is now run by start" in r.stdout
    assert box.wait_state("typo", ("done", "failed"))["state"] == "done"
    app = box.session("typo")["app"]
    assert app["start"] == good[1] and app["stop"] == good[3]
    box.wait_app()
    r = box.cli("forget", "typo")
    assert r.returncode == 0, r.stderr
    assert json.loads(box.cli("status", "--json").stdout) == []


def test_teardown_kills_a_resumed_session_and_its_application(box: Sandbox) -> None:
    """The harness's teardown after a resume: the session process, forked from `resume` (its
    command line names neither session-run nor the application), is found by the pid and
    start time its record names and killed; nothing starts the application again."""
    import psutil

    r = box.live_restore("td", "--cutover", "manual")
    assert r.returncode == 0, r.stderr
    box.wait_app()
    first = box.session("td")["pid"]
    os.kill(first, signal.SIGKILL)
    box.stop_app()
    r = box.cli("resume", "td")
    assert r.returncode == 0, r.stderr
    box.wait_app()
    pid = box.session("td")["pid"]
    assert pid != first and psutil.pid_exists(pid)
    box.teardown()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    time.sleep(1.0)  # a surviving session would restart its application by now
    box.assert_app_gone()
