"""The typed session record: JSON round trip, records written by the first version, atomic
persistence with history, and the liveness lock (no root needed)."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import pytest

from dmrecover.errors import SessionError, UsageError
from dmrecover.session.app import AppSpec
from dmrecover.session.record import (
    CutoverMode,
    Phase,
    SessionRecord,
    State,
    lock_held,
    write_json_atomic,
)

# session.json as the first version (the untyped dict) wrote it, mid-cutover.
OLD_RECORD = {
    "format": "dmrecover-session", "version": 1, "name": "db", "created": 1764000000.5,
    "repo": "/backups/repo", "backup": "5f0c2a9e1b7d4c3a", "backup_name": "vol",
    "size": 67108864, "chunk_size": 262144, "fstype": "ext4", "dest": "/dev/vdb",
    "mountpoint": "/srv/db",
    "app": {"start": "python3 -m app serve", "stop": "python3 -m app stop", "unit": None},
    "backend": "fuse", "cutover": "manual", "fetch_deadline": 600.0,
    "engine_dir": "/var/lib/dmrecover/db", "state": "cutting-over",
    "cutover_phase": "mount-dest", "cutover_requested": True, "pid": 4242,
    "pid_create_time": 1764000001.25,
    "app_handle": {"pid": 4300, "pgid": 4300, "create_time": 1764000002.0,
                   "started_at": 1764000002.0, "exit_code": None},
    "app_started": False, "devices": {"fuse": "/var/lib/dmrecover/db/fuse",
                                      "loop": "/dev/loop3", "mount": "/srv/db"},
    "dest_loop": None, "error": None, "failed_in": None,
    "request_result": {"id": "1-2", "ok": False, "error": "cutover refused: busy"},
    "warnings": ["the application took 31 s to stop"],
    "timings": {"command_started": 1764000000.0, "app_started": 1764000002.0,
                "restored": 1764000100.0, "cutover_started": 1764000200.0},
    "history": [{"state": "starting", "phase": None, "time": 1764000000.6},
                {"state": "cutting-over", "phase": "mount-dest", "time": 1764000201.0}],
    "resumed": None, "updated": 1764000201.0,
}


def test_a_record_written_by_the_first_version_loads(tmp_path: Path) -> None:
    d = tmp_path / "db"
    d.mkdir()
    (d / "session.json").write_text(json.dumps(OLD_RECORD))
    r = SessionRecord.load(None, str(d))
    assert r.name == "db" and r.state == State.CUTTING_OVER and r.phase == Phase.MOUNT_DEST
    assert r.cutover_mode == CutoverMode.MANUAL and r.backend == "fuse"
    assert r.app == AppSpec(start="python3 -m app serve", stop="python3 -m app stop")
    assert r.app_handle["pid"] == 4300 and r.devices["loop"] == "/dev/loop3"
    assert r.engine_path == "/var/lib/dmrecover/db" and r.size == 67108864
    assert r.timings["cutover_started"] == 1764000200.0 and len(r.history) == 2
    assert r.application().handle.pid == 4300
    ctx = r.context()
    assert (ctx.session, ctx.mountpoint, ctx.dest) == ("db", "/srv/db", "/dev/vdb")
    # Written back: the same keys (others read them), the new version.
    r.save()
    data = json.loads((d / "session.json").read_text())
    assert data["version"] == 2 and data["cutover_phase"] == "mount-dest"
    assert data["cutover"] == "manual"
    assert {k for k in OLD_RECORD if k != "version"} <= set(data)
    for key in OLD_RECORD:
        if key not in ("version", "updated"):
            assert data[key] == OLD_RECORD[key], key


def test_a_sparse_record_loads_with_defaults_and_keeps_unknown_keys(tmp_path: Path) -> None:
    (tmp_path / "session.json").write_text(json.dumps(
        {"name": "busy", "state": "restoring", "devices": None, "future_key": [1, 2]}))
    r = SessionRecord.load("busy", str(tmp_path))
    assert r.state == State.RESTORING and r.devices == {} and r.warnings == []
    assert r.app == AppSpec() and r.phase is None
    r.save(error="x")
    assert json.loads((tmp_path / "session.json").read_text())["future_key"] == [1, 2]


def test_records_that_cannot_be_read(tmp_path: Path) -> None:
    path = tmp_path / "session.json"
    path.write_text(json.dumps({"name": "n", "version": 99}))
    with pytest.raises(SessionError, match="upgrade"):
        SessionRecord.load(None, str(tmp_path))
    path.write_text(json.dumps({"name": "n", "state": "exploded"}))
    with pytest.raises(SessionError, match="unknown state"):
        SessionRecord.load(None, str(tmp_path))
    path.write_text("{half")
    with pytest.raises(SessionError, match="unreadable"):
        SessionRecord.load(None, str(tmp_path))
    path.write_text(json.dumps({"name": "other"}))
    with pytest.raises(SessionError, match="holds session other, not n"):
        SessionRecord.load("n", str(tmp_path))
    with pytest.raises(UsageError):
        SessionRecord.load(None, None)


def test_missing_session_is_one_clear_error(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DMRECOVER_STATE_ROOT", str(tmp_path))
    with pytest.raises(SessionError, match="no session nope"):
        SessionRecord.load("nope")


def test_record_is_atomic_and_keeps_history(tmp_path: Path) -> None:
    r = SessionRecord(state_dir=str(tmp_path), name="x")
    r.set_state(State.STARTING)
    r.set_state(State.CUTTING_OVER, phase=Phase.MERGE)
    data = json.loads((tmp_path / "session.json").read_text())
    assert data["state"] == "cutting-over" and data["cutover_phase"] == "merge"
    assert [h["state"] for h in data["history"]] == ["starting", "cutting-over"]
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]
    loaded = SessionRecord.load(None, str(tmp_path))
    assert loaded.name == "x" and loaded.state == "cutting-over"
    r.set_state(State.DONE, phase=None)
    assert r.reload().phase is None
    with pytest.raises(AttributeError):
        r.save(no_such_field=1)
    write_json_atomic(tmp_path / "other.json", {"a": 1}, durable=False)
    assert json.loads((tmp_path / "other.json").read_text()) == {"a": 1}


def test_history_is_bounded(tmp_path: Path) -> None:
    r = SessionRecord(state_dir=str(tmp_path), name="x")
    for _ in range(60):
        r.set_state(State.RESTORING)
    assert len(r.reload().history) == 50


def test_lock_held_means_a_live_process(tmp_path: Path) -> None:
    assert not lock_held(str(tmp_path))  # no lock file
    fd = os.open(tmp_path / "lock", os.O_RDWR | os.O_CREAT)
    try:
        assert not lock_held(str(tmp_path))
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert lock_held(str(tmp_path))
        assert lock_held(str(tmp_path))  # probing does not steal or drop it
    finally:
        os.close(fd)
    assert not lock_held(str(tmp_path))
