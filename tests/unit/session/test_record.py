"""The undo list behind every set-up, the atomic session record, and the liveness lock
(no root needed)."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import pytest

from dmrecover.backends.fuse.stack import FAULT_ENV, UndoStack, fault_point
from dmrecover.errors import StackError
from dmrecover.session.session import Session, lock_held, write_json_atomic


def test_unwind_runs_newest_first_and_goes_on_past_failures() -> None:
    done: list[str] = []
    u = UndoStack()
    u.push("fuse", lambda: done.append("fuse"))
    u.push("loop", lambda: (_ for _ in ()).throw(StackError("loop busy")))
    u.push("mount", lambda: done.append("mount"))
    errors = u.unwind()
    assert done == ["mount", "fuse"]
    assert len(errors) == 1 and "loop busy" in errors[0]
    assert len(u) == 0 and u.unwind() == []


def test_pop_takes_one_step_out() -> None:
    done: list[str] = []
    u = UndoStack()
    u.push("a", lambda: done.append("a"))
    u.push("b", lambda: done.append("b"))
    u.pop("a")()
    assert done == ["a"] and u.names() == ["b"]
    with pytest.raises(KeyError):
        u.pop("a")


def test_fault_point(monkeypatch: pytest.MonkeyPatch) -> None:
    fault_point("loop")  # unset: nothing
    monkeypatch.setenv(FAULT_ENV, "loop")
    fault_point("mount")
    with pytest.raises(StackError, match="injected failure at step loop"):
        fault_point("loop")


def test_session_record_is_atomic_and_keeps_history(tmp_path: Path) -> None:
    s = Session(str(tmp_path), {"name": "x", "state": "starting"})
    s.set_state("starting")
    s.set_state("cutting-over", cutover_phase="merge")
    data = json.loads((tmp_path / "session.json").read_text())
    assert data["state"] == "cutting-over" and data["cutover_phase"] == "merge"
    assert [h["state"] for h in data["history"]] == ["starting", "cutting-over"]
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]
    loaded = Session.load(None, str(tmp_path))
    assert loaded.name == "x" and loaded.state == "cutting-over"
    write_json_atomic(tmp_path / "other.json", {"a": 1}, durable=False)
    assert json.loads((tmp_path / "other.json").read_text()) == {"a": 1}


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
