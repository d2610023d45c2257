"""The CLI-side operations (no root, fakes): typed results for cutover, abort and resume,
and their refusals."""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path

import pytest

from dmrecover.errors import SessionError
from dmrecover.session.control import abort_session, request_cutover, resume_session
from dmrecover.session.record import State
from tests.unit.session.fakes import brought_up, make_record, make_world


def test_cutover_of_a_done_session_says_so(tmp_path: Path) -> None:
    w = make_world()
    rec = make_record(tmp_path / "s")
    rec.set_state(State.DONE, timings={"cutover_downtime": 1.5})
    res = request_cutover("s", state_dir=rec.state_dir, get_backend=w.get_backend)
    assert res.already_done and res.downtime == 1.5 and not res.queued


def test_cutover_needs_a_running_session(tmp_path: Path) -> None:
    w = make_world()
    rec = make_record(tmp_path / "s")
    rec.set_state(State.RESTORING)
    with pytest.raises(SessionError, match="not running"):
        request_cutover("s", state_dir=rec.state_dir, get_backend=w.get_backend)


def test_cutover_request_reaches_the_session_process(tmp_path: Path) -> None:
    w = make_world(instant=False)
    rec = make_record(tmp_path / "s", cutover="manual")
    runner = brought_up(w, rec)
    lock = os.open(rec.file("lock"), os.O_RDWR | os.O_CREAT)
    fcntl.flock(lock, fcntl.LOCK_EX)  # what the live session process holds
    try:
        res = request_cutover("s", state_dir=rec.state_dir, wait=False,
                              get_backend=w.get_backend)
        assert res.queued and res.downtime is None  # still restoring: runs once restored
        w.volume.restored = True
        thread = threading.Thread(target=runner.loop)
        thread.start()
        res = request_cutover("s", state_dir=rec.state_dir, get_backend=w.get_backend,
                              timeout=30)
        thread.join(30)
        assert res.record.state == State.DONE and res.downtime is not None
    finally:
        os.close(lock)


def test_abort_of_a_dead_session_tears_down_and_keeps_the_overlay(tmp_path: Path) -> None:
    w = make_world()
    rec = make_record(tmp_path / "s")
    rec.set_state(State.RESTORING, pid=999999)
    with open(rec.file("overlay.img"), "wb") as f:
        f.write(b"x" * 8192)
        os.fsync(f.fileno())
    res = abort_session("s", state_dir=rec.state_dir, services=w.services)
    assert not res.already and res.record.state == State.ABORTED
    assert res.overlay_dir == rec.state_dir and res.overlay_bytes >= 8192
    assert w.backend.dead_torn_down == 1
    again = abort_session("s", state_dir=rec.state_dir, services=w.services)
    assert again.already and w.backend.dead_torn_down == 1


def test_abort_refusals(tmp_path: Path) -> None:
    w = make_world()
    rec = make_record(tmp_path / "s")
    rec.set_state(State.CUTTING_OVER, phase="merge")
    with pytest.raises(SessionError, match="cutting over"):
        abort_session("s", state_dir=rec.state_dir, services=w.services)
    rec.set_state(State.DONE, phase=None)
    with pytest.raises(SessionError, match="nothing to abort"):
        abort_session("s", state_dir=rec.state_dir, services=w.services)


def test_resume_of_a_done_session_returns_it(tmp_path: Path) -> None:
    w = make_world()
    rec = make_record(tmp_path / "s")
    rec.set_state(State.DONE)
    assert resume_session("s", state_dir=rec.state_dir, services=w.services).state == "done"
    assert w.events == []


def test_resume_after_abort_runs_the_session_again(tmp_path: Path) -> None:
    w = make_world()
    rec = make_record(tmp_path / "s")
    rec.set_state(State.ABORTED)
    seen = []
    done = resume_session("s", state_dir=rec.state_dir, foreground=True, services=w.services,
                          on_started=lambda r: seen.append(r.state))
    assert seen == [State.RESTORING] and done.state == State.DONE
    assert w.events[0] == "teardown-dead" and done.resumed is not None


def test_cutover_is_refused_at_once_when_the_restore_cannot_complete(tmp_path: Path) -> None:
    import time

    from dmrecover.session.record import STATUS_FILE, write_json_atomic

    w = make_world()
    rec = make_record(tmp_path / "s", cutover="manual")
    rec.set_state(State.RESTORING)
    write_json_atomic(rec.file(STATUS_FILE), {"stats": {
        "restorer_running": False,
        "restorer_error": "1 corrupt chunk(s) in the backup (first: chunk 7)"}})
    lock = os.open(rec.file("lock"), os.O_RDWR | os.O_CREAT)
    fcntl.flock(lock, fcntl.LOCK_EX)  # a live session process that never answers
    try:
        t0 = time.monotonic()
        with pytest.raises(SessionError, match="cannot complete.*corrupt chunk"):
            request_cutover("s", state_dir=rec.state_dir, get_backend=w.get_backend,
                            timeout=20)
        assert time.monotonic() - t0 < 5
    finally:
        os.close(lock)


def test_resume_serves_a_waiting_source_before_it_stops_or_tears_down(tmp_path: Path,
                                                                      monkeypatch) -> None:
    """dm-clone: the dead process's source queues the kernel's reads (an application write
    waits for its region's hydration). Stopping the application or unmounting first would
    wait forever, or fail that write: the volume is served again first, until the teardown
    is over."""
    from dmrecover.session import control

    calls = []
    # In a forked child in production (system/forked.py); the fakes record in this process.
    monkeypatch.setattr(control, "_isolated", lambda fn, what: calls.append(what) or fn())
    w = make_world()
    w.backend.source_waits = True
    survivor = [object()]  # the application the dead process left, until it is stopped
    w.app.processes = lambda: survivor if "app:stop" not in w.events else []  # type: ignore
    rec = make_record(tmp_path / "s")
    rec.set_state(State.RESTORING)
    resume_session("s", state_dir=rec.state_dir, foreground=True, services=w.services)
    assert w.events[:5] == ["open-volume", "serve-source", "app:stop", "teardown-dead",
                            "stop-serving"], w.events
    assert calls == ["the teardown of session s"]


def test_resume_of_a_waiting_source_without_its_backup_changes_nothing(tmp_path: Path,
                                                                       monkeypatch) -> None:
    from dmrecover.session import control

    monkeypatch.setattr(control, "_isolated", lambda fn, what: fn())
    w = make_world()
    w.backend.source_waits = True
    rec = make_record(tmp_path / "s")
    rec.set_state(State.RESTORING)

    def unreachable(*_a: object) -> None:
        raise SessionError("repository /repo is unreachable")

    def services(r=None):
        s = w.services(r)
        s.open_volume = unreachable
        return s

    with pytest.raises(SessionError, match="waits for the backup.*unreachable"):
        resume_session("s", state_dir=rec.state_dir, foreground=True, services=services)
    assert "teardown-dead" not in w.events and "app:stop" not in w.events
    assert rec.reload().state == State.RESTORING
