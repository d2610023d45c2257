"""The cutover state machine with fakes (no root): the phases in order, resume from each
persisted phase, refusal (the application restarted, auto retry with a backoff) while a
stranger holds the mount after the stop, a failed merge resumed, the online cutover."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dmrecover.errors import UsageError
from dmrecover.session import runner as runner_mod
from dmrecover.session.app import AppSpec
from dmrecover.session.control import request_cutover, resume_session, send_request
from dmrecover.session.cutover import RESTART_PHASES, RESUMABLE_PHASES
from dmrecover.session.record import Phase, SessionRecord, State
from dmrecover.session.runner import SessionRunner
from dmrecover.session.start import LiveRestoreRequest, start_live_restore
from tests.unit.session.fakes import brought_up, make_record, make_world

RESTART = [str(p) for p in RESTART_PHASES]


def phases_of(record: SessionRecord) -> list[str]:
    return [h["phase"] for h in record.history if h["state"] == "cutting-over"]


def crashed_in(tmp_path: Path, phase: Phase) -> SessionRecord:
    """A session whose process died in `phase` of the cutover."""
    rec = make_record(tmp_path / "s")
    rec.set_state(State.RESTORING, app_started=True, app_handle={"pid": 1})
    rec.set_state(State.CUTTING_OVER, phase=phase, pid=12345)
    rec.history.clear()
    rec.save()
    return rec


@pytest.mark.parametrize("phase", RESTART_PHASES[:2])
def test_crash_before_merge_resumes_as_a_restore(tmp_path: Path, phase: Phase) -> None:
    w = make_world()
    rec = crashed_in(tmp_path, phase)
    assert SessionRunner(rec, w.services()).run() == 0
    assert rec.state == State.DONE
    states = [h["state"] for h in rec.history]
    assert states[:2] == ["starting", "restoring"]  # the stack and the app came back first
    assert phases_of(rec) == RESTART  # then the whole cutover ran again
    assert w.events[:4] == ["open-volume", "build:origin", "build:device", "build:mount"]


@pytest.mark.parametrize("phase", RESUMABLE_PHASES)
def test_resume_continues_from_merge_on(tmp_path: Path, phase: Phase) -> None:
    w = make_world()
    w.volume.restored = True
    w.volume.merged = phase != Phase.MERGE  # merge ran to its end before the crash
    rec = crashed_in(tmp_path, phase)
    assert SessionRunner(rec, w.services()).run() == 0
    assert rec.state == State.DONE and rec.phase is None
    assert phases_of(rec) == RESTART[RESTART.index(phase):]
    assert not any(e.startswith("build:") for e in w.events)  # no stack: straight on
    expected = {"merge": "merge", "mount-dest": "mount-dest", "start-app": "app:start",
                "discard": "discard"}
    assert w.events[1] == expected[phase]
    assert "app:stop" not in w.events


def test_stranger_after_the_stop_refuses_and_restarts_the_app(tmp_path: Path,
                                                               monkeypatch) -> None:
    """Strangers are looked for once the application is stopped: the cutover is refused,
    the application starts again on the pseudo-volume, and auto mode retries by itself
    after a backoff (said in the error and in status) until the stranger is gone."""
    monkeypatch.setattr(runner_mod, "AUTO_RETRY_BASE", 60.0)
    w = make_world()
    w.host.stray = "77 (less)"
    rec = make_record(tmp_path / "s")
    runner = brought_up(w, rec)
    assert runner.step() is None  # auto: tried, refused after the stop
    assert w.events[-2:] == ["app:stop", "app:start"] and w.app.running
    assert rec.state == State.READY and rec.phase is None and w.backend.live
    assert "held by 77 (less), not by the application" in rec.error
    assert "retries in 60s (attempt 2)" in rec.error
    assert phases_of(rec) == ["stop-app"]
    status = rec.status()
    assert status is not None
    runner.write_status()
    assert rec.status()["cutover_retry"]["attempt"] == 2
    starts = w.app.starts
    assert runner.step() is None and w.app.starts == starts  # not before the backoff
    w.host.stray = None
    runner.auto_retry_at = 0.0  # the backoff has passed
    assert runner.step() == 0 and rec.state == State.DONE


def test_auto_retry_backoff_doubles(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(runner_mod, "AUTO_RETRY_BASE", 2.0)
    monkeypatch.setattr(runner_mod, "AUTO_RETRY_MAX", 5.0)
    w = make_world()
    w.host.stray = "77 (less)"
    rec = make_record(tmp_path / "s")
    runner = brought_up(w, rec)
    delays = []
    for _ in range(3):
        runner.auto_retry_at = 0.0
        assert runner.step() is None
        delays.append(rec.error.split("retries in ")[1].split("s ")[0])
    assert delays == ["2", "4", "5"]


def test_manual_cutover_refused_by_a_stranger_waits_for_the_next_request(tmp_path: Path
                                                                          ) -> None:
    w = make_world()
    w.host.stray = "77 (less)"
    rec = make_record(tmp_path / "s", cutover="manual")
    runner = brought_up(w, rec)
    assert runner.step() is None and rec.state == State.READY
    rid = send_request(rec, "cutover")
    assert runner.step() is None
    assert rec.request_result["id"] == rid and "77 (less)" in rec.request_result["error"]
    assert "automatic cutover retries" not in rec.error and w.app.running
    assert runner.step() is None and rec.state == State.READY  # waits for `cutover`
    w.host.stray = None
    send_request(rec, "cutover")
    assert runner.step() == 0 and rec.state == State.DONE


def test_stop_warnings_are_recorded(tmp_path: Path) -> None:
    w = make_world()
    w.app.stop_warnings = ["the stop command: exit 1: falling back to SIGTERM"]
    rec = make_record(tmp_path / "s")
    runner = brought_up(w, rec)
    assert runner.step() == 0 and rec.state == State.DONE
    assert rec.warnings == w.app.stop_warnings


def test_teardown_refused_restarts_the_app_on_the_pseudo_volume(tmp_path: Path) -> None:
    w = make_world()
    w.backend.busy = True
    rec = make_record(tmp_path / "s", cutover="manual")
    runner = brought_up(w, rec)
    assert runner.step() is None and rec.state == State.READY
    rid = send_request(rec, "cutover")
    assert runner.step() is None
    assert rec.state == State.READY and rec.phase is None and w.app.running
    assert w.events[-2:] == ["app:stop", "app:start"]
    assert rec.request_result["id"] == rid and "busy" in rec.request_result["error"]
    assert not rec.cutover_requested and w.backend.live  # the stack is intact
    w.backend.busy = False
    send_request(rec, "cutover")
    assert runner.step() == 0 and rec.state == State.DONE and not w.backend.live


def test_failed_merge_then_resume_continues_the_merge(tmp_path: Path) -> None:
    w = make_world()
    w.backend.fail_merge = True
    rec = make_record(tmp_path / "s")
    assert SessionRunner(rec, w.services()).run() == 1
    assert rec.state == State.FAILED and rec.failed_in == State.CUTTING_OVER
    assert rec.phase == Phase.MERGE and "fake merge failure" in rec.error
    assert not w.app.running  # stopped for the cutover; DEST is not mounted yet
    # `dmrecover resume`: tears down what is left and continues at the merge.
    w.backend.fail_merge = False
    w.events.clear()
    done = resume_session("s", state_dir=rec.state_dir, foreground=True,
                          services=w.services)
    assert done.state == State.DONE and done.error is None
    assert w.events == ["teardown-dead", "open-volume", "merge", "mount-dest", "app:start",
                        "discard"]


def test_online_cutover_never_stops_the_app(tmp_path: Path) -> None:
    w = make_world(online=True)
    rec = make_record(tmp_path / "s", cutover="online")
    assert SessionRunner(rec, w.services()).run() == 0
    assert rec.state == State.DONE and phases_of(rec) == ["online-merge"]
    assert "app:stop" not in w.events and w.app.starts == 1
    assert w.events[-2:] == ["online-cutover", "finish-online"]
    assert rec.online_phase == "merging" and rec.timings["cutover_downtime"] == 0.0
    assert os.path.exists(os.path.join(rec.engine_path, "merged"))


def test_online_crash_resumes_as_a_restore(tmp_path: Path) -> None:
    w = make_world(online=True)
    rec = make_record(tmp_path / "s", cutover="online")
    w.backend.fail_online = True
    assert SessionRunner(rec, w.services()).run() == 1
    assert rec.phase == Phase.ONLINE_MERGE and rec.failed_in == State.CUTTING_OVER
    w.backend.fail_online = False
    w.events.clear()
    done = resume_session("s", state_dir=rec.state_dir, foreground=True,
                          services=w.services)
    assert done.state == State.DONE
    assert "build:mount" in w.events and w.events[-1] == "finish-online"


def test_online_cutover_needs_a_backend_that_has_one(tmp_path: Path) -> None:
    w = make_world(online=False)
    req = LiveRestoreRequest(repo=str(tmp_path / "repo"), backup="b", dest=str(tmp_path / "d"),
                             mountpoint=str(tmp_path / "m"), app=AppSpec(start="true"),
                             cutover="online")
    with pytest.raises(UsageError, match="--cutover online"):
        start_live_restore(req, choose_backend=lambda name: w.backend)
    assert not (tmp_path / "d").exists()  # refused before anything changed
    rec = make_record(tmp_path / "s")
    with pytest.raises(UsageError, match="--online"):
        request_cutover("s", state_dir=rec.state_dir, online=True, get_backend=w.get_backend)


def test_online_request_on_a_restart_only_backend_in_the_runner(tmp_path: Path) -> None:
    # A record saying "online" on a backend without it (e.g. moved between hosts) cuts over
    # the restart way rather than not at all.
    w = make_world(online=False)
    rec = make_record(tmp_path / "s", cutover="online")
    assert SessionRunner(rec, w.services()).run() == 0
    assert phases_of(rec) == RESTART
