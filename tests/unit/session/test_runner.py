"""The session process's state machine with a fake backend, application and volume (no root):
start -> restoring -> ready -> cutover -> done, auto cutover, abort, failures while starting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dmrecover.session.control import send_request
from dmrecover.session.record import Phase, SessionRecord, State
from dmrecover.session.runner import SessionRunner, run_session
from tests.unit.session.fakes import BUILD_STEPS, brought_up, make_record, make_world

RESTART = ["stop-app", "unmount", "merge", "mount-dest", "start-app", "discard"]


def phases_of(record: SessionRecord) -> list[str]:
    return [h["phase"] for h in record.history if h["state"] == "cutting-over"]


def test_manual_cutover_goes_through_every_state(tmp_path: Path) -> None:
    w = make_world(instant=False)
    rec = make_record(tmp_path / "s", cutover="manual")
    runner = SessionRunner(rec, w.services(), on_started=lambda r: w.events.append("started"))
    runner.open()
    runner.bring_up()
    assert rec.state == State.RESTORING and rec.app_started
    assert w.events == ["open-volume", "build:origin", "build:device", "build:mount",
                        "app:start", "restore:start", "started"]
    assert runner.step() is None and rec.state == State.RESTORING
    w.volume.restored = True
    assert runner.step() is None and rec.state == State.READY  # manual: it waits
    assert runner.step() is None and rec.state == State.READY
    w.events.clear()
    send_request(rec, "cutover")
    assert runner.step() == 0
    assert rec.state == State.DONE and rec.phase is None and rec.pid is None
    assert phases_of(rec) == RESTART
    assert w.events == ["app:stop", "teardown", "undo:mount", "undo:device", "undo:origin",
                        "merge", "mount-dest", "app:start", "discard"]
    assert not w.backend.live
    t = rec.timings
    assert t["merged_bytes"] == 4096 and t["cutover_downtime"] >= 0
    on_disk = json.loads(Path(rec.path).read_text())
    assert on_disk["state"] == "done" and on_disk["cutover_phase"] is None
    status = json.loads(Path(rec.file("status.json")).read_text())
    assert status["state"] == "ready"  # the last status written before the cutover


def test_auto_cutover_runs_once_restored(tmp_path: Path) -> None:
    w = make_world()
    rec = make_record(tmp_path / "s")
    assert SessionRunner(rec, w.services()).run() == 0
    assert rec.state == State.DONE and phases_of(rec) == RESTART
    assert [h["state"] for h in rec.history][:2] == ["starting", "restoring"]
    assert "ready" not in [h["state"] for h in rec.history]
    assert w.volume.discarded and w.volume.closed and w.app.running
    status = json.loads(Path(rec.file("status.json")).read_text())
    assert status["state"] == "done"


def test_run_session_takes_the_lock_and_records_the_pid(tmp_path: Path) -> None:
    w = make_world()
    rec = make_record(tmp_path / "s")
    seen = []
    rc = run_session("s", state_dir=rec.state_dir, services=w.services,
                     on_started=lambda r: seen.append((r.state, r.alive())))
    assert rc == 0 and seen == [(State.RESTORING, True)]
    done = rec.reload()
    assert done.state == State.DONE and done.pid is None and not done.alive()
    assert Path(rec.file("session.log")).exists()


def test_abort_keeps_the_overlay(tmp_path: Path) -> None:
    w = make_world(instant=False)
    rec = make_record(tmp_path / "s", cutover="manual")
    runner = brought_up(w, rec)
    send_request(rec, "abort")
    assert runner.step() == 0
    assert rec.state == State.ABORTED and not w.backend.live and not w.app.running
    assert w.volume.closed and not w.volume.discarded


def test_abort_with_a_stranger_stops_the_app_and_names_the_stranger(tmp_path: Path) -> None:
    w = make_world(instant=False)
    rec = make_record(tmp_path / "s")
    runner = brought_up(w, rec)
    w.host.stray = "4242 (bash)"
    rid = send_request(rec, "abort")
    assert runner.step() is None
    # abort's job is done for the application: stopped, and not restarted
    assert rec.state == State.RESTORING and not w.app.running and w.backend.live
    assert rec.request_result["id"] == rid and not rec.request_result["ok"]
    assert "the application is stopped" in rec.error and "4242 (bash)" in rec.error
    w.volume.restored = True
    assert runner.step() is None and not w.app.running  # no auto cutover restarts it
    w.host.stray = None
    send_request(rec, "abort")
    assert runner.step() == 0 and rec.state == State.ABORTED and not w.backend.live
    assert w.events[-1] == "app:release"


def test_abort_when_teardown_fails_keeps_the_app_stopped(tmp_path: Path) -> None:
    w = make_world(instant=False)
    rec = make_record(tmp_path / "s", cutover="manual")
    runner = brought_up(w, rec)
    w.backend.busy = True
    send_request(rec, "abort")
    assert runner.step() is None
    assert rec.state == State.RESTORING and not w.app.running and "busy" in rec.error
    assert w.events[-1] == "restore:start"  # the restore goes on


def test_sigterm_suspends_and_keeps_the_state(tmp_path: Path) -> None:
    w = make_world(instant=False)
    rec = make_record(tmp_path / "s")
    runner = brought_up(w, rec)
    runner.stop_requested = True
    assert runner.step() == 0
    assert rec.state == State.RESTORING and rec.pid is None
    assert not w.backend.live and not w.app.running and w.volume.closed


@pytest.mark.parametrize("step", BUILD_STEPS)
def test_build_failure_leaves_nothing(tmp_path: Path, step: str) -> None:
    w = make_world()
    w.backend.fail_at = step
    rec = make_record(tmp_path / "s")
    assert SessionRunner(rec, w.services()).run() == 1
    assert rec.state == State.FAILED and rec.failed_in == State.STARTING
    assert f"fake failure at {step}" in rec.error
    assert not w.backend.live and not w.app.running and w.volume.closed
    assert rec.reload().state == State.FAILED


def test_app_start_failure_unwinds_the_stack(tmp_path: Path) -> None:
    w = make_world()
    w.app.fail_start = True
    rec = make_record(tmp_path / "s")
    assert SessionRunner(rec, w.services()).run() == 1
    assert rec.state == State.FAILED and "would not start" in rec.error
    assert not w.backend.live
    assert w.events[-3:] == ["undo:mount", "undo:device", "undo:origin"]


def test_injected_app_fault_unwinds_the_stack(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DMRECOVER_TEST_HOOKS", "1")
    monkeypatch.setenv("DMRECOVER_FAIL_AT", "app")
    w = make_world()
    rec = make_record(tmp_path / "s")
    assert SessionRunner(rec, w.services()).run() == 1
    assert rec.state == State.FAILED and "injected failure at step app" in rec.error
    assert not w.backend.live and w.app.starts == 0


def test_restore_error_is_shown_and_the_app_keeps_running(tmp_path: Path) -> None:
    w = make_world(instant=False)
    rec = make_record(tmp_path / "s")
    runner = brought_up(w, rec)
    w.volume.restore_error = "chunk 7 is corrupt"
    assert runner.step() is None
    assert rec.state == State.RESTORING and rec.error == "chunk 7 is corrupt"
    assert w.app.running


def test_done_session_does_nothing(tmp_path: Path) -> None:
    w = make_world()
    rec = make_record(tmp_path / "s")
    rec.set_state(State.DONE)
    assert SessionRunner(rec, w.services()).run() == 0
    assert w.events == []


def test_phase_enum_is_what_is_persisted(tmp_path: Path) -> None:
    rec = make_record(tmp_path / "s")
    rec.set_state(State.CUTTING_OVER, phase=Phase.MERGE)
    assert json.loads(Path(rec.path).read_text())["cutover_phase"] == "merge"
    rec.set_state(State.FAILED, error="x")  # the phase is kept unless given
    assert rec.reload().phase == Phase.MERGE
