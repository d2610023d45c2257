"""status: the model computed from session.json + status.json, text and JSON output, the
list of sessions, and the 'process not running' note (no root: files only)."""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import time
from pathlib import Path

import pytest

from dmrecover.session.session import Session, write_json_atomic
from dmrecover.session.status import model, render_text, status_command

MiB = 1 << 20


def _make(root: Path, name: str, state: str = "restoring", restored: int = 25 * MiB,
          rate: float = 5 * MiB) -> Path:
    d = root / name
    d.mkdir(parents=True)
    write_json_atomic(d / "session.json", {
        "name": name, "state": state, "repo": "/r", "backup": "b1", "backup_name": "vol",
        "dest": "/dev/x", "mountpoint": "/srv/data", "fstype": "ext4", "backend": "fuse",
        "cutover": "auto", "size": 100 * MiB, "cutover_phase": None,
        "app": {"start": "true", "stop": None, "unit": None},
        "app_handle": {"pid": None}, "timings": {"cutover_downtime": 0.5}})
    write_json_atomic(d / "status.json", {
        "state": state, "time": time.time(), "app": {"state": "running", "pid": 42},
        "stats": {"total_bytes": 100 * MiB, "restored_bytes": restored, "rate": rate,
                  "demand_fetches": 7, "demand_latency_mean": 0.002,
                  "demand_latency_p99": 0.01, "demand_latency_max": 0.02,
                  "overlay_bytes": 3 * MiB, "retries": 0, "errors": []}})
    return d


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DMRECOVER_STATE_ROOT", str(tmp_path))
    return tmp_path


def test_model_numbers_and_dead_process_note(root: Path) -> None:
    _make(root, "a")
    m = model(Session.load("a"))
    assert m["percent"] == pytest.approx(25.0)
    assert m["eta"] == pytest.approx(75 * MiB / (5 * MiB))
    assert m["demand_fetches"] == 7 and m["overlay_bytes"] == 3 * MiB
    assert not m["alive"]
    assert "dmrecover resume a" in m["note"]
    text = render_text(m)
    assert "25.0%" in text and "resume a" in text and "7 fetches" in text


def test_live_process_has_no_note(root: Path) -> None:
    d = _make(root, "b")
    fd = os.open(d / "lock", os.O_RDWR | os.O_CREAT)
    try:
        # flock from another open file description: what the session process holds.
        fcntl.flock(fd, fcntl.LOCK_EX)
        m = model(Session.load("b"))
        assert m["alive"] and m["note"] is None
        assert m["app"] == "running" and m["app_pid"] == 42
    finally:
        os.close(fd)


def test_done_is_full(root: Path) -> None:
    _make(root, "c", state="done", restored=10 * MiB)
    m = model(Session.load("c"))
    assert m["percent"] == 100.0 and m["note"] is None
    assert "downtime 0.50 s" in render_text(m)


def test_status_command_json_and_list(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _make(root, "one")
    _make(root, "two", state="ready", restored=100 * MiB)
    ns = argparse.Namespace(session="one", state_dir=None, json=True, watch=False)
    assert status_command(ns) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["session"] == "one" and out["state"] == "restoring"
    ns = argparse.Namespace(session=None, state_dir=None, json=False, watch=False)
    assert status_command(ns) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("SESSION")
    assert any(line.startswith("one") and "restoring!" in line for line in lines)
    assert any(line.startswith("two") and "100.0%" in line for line in lines)
    ns = argparse.Namespace(session=None, state_dir=None, json=True, watch=False)
    status_command(ns)
    assert [m["session"] for m in json.loads(capsys.readouterr().out)] == ["one", "two"]


def test_missing_session_is_one_clear_error(root: Path) -> None:
    from dmrecover.errors import SessionError

    with pytest.raises(SessionError, match="no session nope"):
        Session.load("nope")


def test_watch_leaves_on_ctrl_c(root: Path) -> None:
    import signal
    import subprocess
    import sys

    _make(root, "w")
    env = dict(os.environ, DMRECOVER_STATE_ROOT=str(root), COLUMNS="100")
    p = subprocess.Popen([sys.executable, "-m", "dmrecover", "status", "w", "--watch"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    time.sleep(1.5)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=10)
    assert p.returncode == 0, err
    assert "dmrecover session w" in out and "25.0%" in out
