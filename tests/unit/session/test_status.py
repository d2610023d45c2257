"""status: the model computed from session.json + status.json, and the 'process not running'
note (no root: files only). The rendering is the CLI's (tests/unit/cli/test_status_display.py)."""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path

import pytest

from dmrecover.session.control import list_sessions, load_session
from dmrecover.session.record import write_json_atomic
from dmrecover.session.status import model

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
    m = model(load_session("a"))
    assert m["percent"] == pytest.approx(25.0)
    assert m["eta"] == pytest.approx(75 * MiB / (5 * MiB))
    assert m["demand_fetches"] == 7 and m["overlay_bytes"] == 3 * MiB
    assert not m["alive"]
    assert "dmrecover resume a" in m["note"]
    assert m["state"] == "restoring" and m["phase"] is None and m["backend"] == "fuse"


def test_live_process_has_no_note(root: Path) -> None:
    d = _make(root, "b")
    fd = os.open(d / "lock", os.O_RDWR | os.O_CREAT)
    try:
        # flock from another open file description: what the session process holds.
        fcntl.flock(fd, fcntl.LOCK_EX)
        m = model(load_session("b"))
        assert m["alive"] and m["note"] is None
        assert m["app"] == "running" and m["app_pid"] == 42
    finally:
        os.close(fd)


def test_done_is_full(root: Path) -> None:
    _make(root, "c", state="done", restored=10 * MiB)
    m = model(load_session("c"))
    assert m["percent"] == 100.0 and m["note"] is None
    assert m["timings"]["cutover_downtime"] == 0.5


def test_list_sessions(root: Path) -> None:
    _make(root, "one")
    _make(root, "two", state="ready", restored=100 * MiB)
    (root / "not-a-session").mkdir()
    (root / "stray-file").write_text("x")
    models = [model(r) for r in list_sessions()]
    assert [m["session"] for m in models] == ["one", "two"]
    assert models[0]["note"] and models[1]["percent"] == 100.0


HELD = ("cutover refused: /srv/data is held by 77 (sleep), not by the application; the "
        "application runs again on the pseudo-volume; `dmrecover cutover r` retries once they "
        "are gone; the automatic cutover retries in 20s (attempt 3)")
STOP_LOG = ["   0.0s running the stop command", "   1.2s the stop command exited 0"]


def test_live_model_has_tracking_stop_log_and_cutover_retry(root: Path) -> None:
    d = _make(root, "r", state="ready", restored=100 * MiB)
    st = json.loads((d / "status.json").read_text())
    st["app"].update(tracking="cgroup2 /sys/fs/cgroup/dmrecover/r-1234abcd",
                     tracking_warning=None, stop_log=STOP_LOG)
    st["cutover_retry"] = {"attempt": 3, "in": 12.5}
    write_json_atomic(d / "status.json", st)
    data = json.loads((d / "session.json").read_text())
    write_json_atomic(d / "session.json", {**data, "error": HELD})
    fd = os.open(d / "lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        m = model(load_session("r"))
    finally:
        os.close(fd)
    assert m["app_tracking"] == "cgroup2 /sys/fs/cgroup/dmrecover/r-1234abcd"
    assert m["app_tracking_warning"] is None
    assert m["app_stop_log"] == STOP_LOG
    assert m["cutover_retry"] == {"attempt": 3, "in": 12.5, "reason": "held by 77 (sleep)"}


def test_dead_model_reads_tracking_and_stop_log_from_the_record(root: Path) -> None:
    """The process is gone: status.json is stale (no retry is pending), the record's handle
    says how the application was tracked and stopped."""
    d = _make(root, "s")
    st = json.loads((d / "status.json").read_text())
    st["cutover_retry"] = {"attempt": 2, "in": 5.0}
    write_json_atomic(d / "status.json", st)
    data = json.loads((d / "session.json").read_text())
    data["app_handle"] = {"pid": None, "stop_log": STOP_LOG, "cgroup": {
        "kind": "pgroup", "name": "s-1", "path": None, "unit": None, "leader": 9,
        "warning": "no cgroup could be made for the application (...)"}}
    write_json_atomic(d / "session.json", data)
    m = model(load_session("s"))
    assert not m["alive"] and m["cutover_retry"] is None
    assert m["app_tracking"] == "pgroup"
    assert m["app_tracking_warning"].startswith("no cgroup could be made")
    assert m["app_stop_log"] == STOP_LOG
