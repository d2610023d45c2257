"""The status displays: text for one session, the list, the rich panel (from model dicts)."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from dmrecover.cli import status_display as sd
from dmrecover.units import format_size

MiB = 1 << 20


def a_model(**changes: object) -> dict:
    m = {
        "session": "a", "state": "restoring", "phase": None, "alive": True, "pid": 7,
        "note": None, "error": None, "state_dir": "/var/lib/dmrecover/a", "repo": "/r",
        "backup": "b1", "backup_name": "vol", "dest": "/dev/x", "mountpoint": "/srv/data",
        "fstype": "ext4", "backend": "fuse", "cutover": "auto", "total_bytes": 100 * MiB,
        "restored_bytes": 25 * MiB, "percent": 25.0, "rate": 5.0 * MiB, "eta": 15.0,
        "demand_fetches": 7, "demand_latency_mean": 0.002, "demand_latency_p99": 0.01,
        "demand_latency_max": 0.02, "background_fetches": 20, "overlay_bytes": 3 * MiB,
        "retries": 0, "waiting_for_repository_since": None, "engine_errors": [],
        "app": "running", "app_pid": 42, "timings": {}, "warnings": [], "updated": 0.0,
    }
    m.update(changes)
    return m


def test_text_of_a_running_session() -> None:
    text = sd.render_text(a_model())
    assert text.splitlines()[0] == "session a: restoring"
    assert "25.0%" in text and "7 fetches" in text and "ETA 15.0 s" in text
    assert "running (pid 42)" in text and "0 retries" in text


def test_text_of_a_dead_session_names_resume() -> None:
    text = sd.render_text(a_model(alive=False, note="the session process is not running: "
                                                    "dmrecover resume a"))
    assert text.splitlines()[0].endswith("[process not running]")
    assert "dmrecover resume a" in text


def test_text_of_a_done_session_shows_the_downtime() -> None:
    m = a_model(state="done", alive=False, percent=100.0, restored_bytes=100 * MiB,
                timings={"cutover_downtime": 0.5, "merged_bytes": 3 * MiB})
    text = sd.render_text(m)
    assert "[process not running]" not in text
    assert f"downtime 0.50 s, {format_size(3 * MiB)} merged" in text
    assert "throughput" not in text


def test_unreachable_repository_is_shouted() -> None:
    import time

    text = sd.render_text(a_model(waiting_for_repository_since=time.time() - 90, retries=4))
    assert "UNREACHABLE for 1m3" in text and "4 retries" in text


def test_list() -> None:
    assert sd.render_list([]) == "no sessions"
    lines = sd.render_list([a_model(note="x"), a_model(session="two", state="ready",
                                                       percent=100.0)]).splitlines()
    assert lines[0].startswith("SESSION")
    assert lines[1].startswith("a") and "restoring!" in lines[1] and "25.0%" in lines[1]
    assert lines[2].startswith("two") and "100.0%" in lines[2]


def test_list_shows_finished_sessions_apart_and_briefly() -> None:
    lines = sd.render_list([
        a_model(session="run"),
        a_model(session="old", state="done", alive=False, timings={"done": 0.0}),
        a_model(session="ab", state="aborted", alive=False),
        a_model(session="bad", state="failed", alive=False, error="app exited 7\nmore")],
    ).splitlines()
    assert lines[0].startswith("SESSION") and lines[1].startswith("run ")
    assert lines[2] == "" and lines[3].startswith("finished (`dmrecover forget SESSION`")
    assert lines[4].split()[:2] == ["old", "done"] and "runs on /dev/x at /srv/data" in lines[4]
    assert "dmrecover forget ab --discard-overlay" in lines[5]
    assert lines[6].endswith("failed                   app exited 7")
    only_done = sd.render_list([a_model(session="old", state="done")]).splitlines()
    assert only_done[0].startswith("finished") and len(only_done) == 2


@pytest.mark.parametrize("changes", [{}, {"error": "boom", "alive": False},
                                     {"state": "failed", "restored_bytes": None, "percent": None}])
def test_rich_panel_renders(changes: dict) -> None:
    out = io.StringIO()
    Console(file=out, width=100).print(sd.render_rich(a_model(**changes)))
    text = out.getvalue()
    assert "dmrecover session a" in text and "/srv/data" in text
    if changes.get("error"):
        assert "boom" in text and "not running" in text


def test_live_display() -> None:
    out = io.StringIO()
    with sd.LiveStatus(Console(file=out, width=100)) as live:
        live.update([a_model()])
        live.update([])
    assert "no sessions" in out.getvalue()


TRACKED = {"app_tracking": "cgroup2 /sys/fs/cgroup/unified/dmrecover/a-1234abcd",
           "app_stop_log": ["   0.0s running the stop command",
                            "  10.0s still running after 10s: 7 (postgres); sending SIGTERM",
                            "  10.3s stopped by SIGTERM"],
           "cutover_retry": {"attempt": 2, "in": 9.6, "reason": "held by 77 (sleep)"}}


def test_text_shows_tracking_the_last_stop_and_a_pending_retry() -> None:
    lines = sd.render_text(a_model(state="ready", **TRACKED)).splitlines()
    assert "  tracking:    cgroup2 /sys/fs/cgroup/unified/dmrecover/a-1234abcd" in lines
    i = next(n for n, line in enumerate(lines) if line.startswith("  last stop:"))
    assert lines[i].split(":", 1)[1].strip() == "0.0s running the stop command"
    assert lines[i + 1].strip() == "10.0s still running after 10s: 7 (postgres); sending SIGTERM"
    assert lines[i + 2].strip() == "10.3s stopped by SIGTERM"
    assert "  cutover:     refused: held by 77 (sleep); retrying in 10 s (attempt 2)" \
        in lines


def test_text_shows_the_tracking_fallback_as_a_warning() -> None:
    text = sd.render_text(a_model(app_tracking="pgroup process group 9",
                                  app_tracking_warning="no cgroup could be made"))
    assert "  tracking:    WARNING: no cgroup could be made" in text
    assert "last stop" not in text and "retrying" not in text


def test_rich_panel_shows_tracking_the_last_stop_and_a_pending_retry() -> None:
    out = io.StringIO()
    Console(file=out, width=120).print(sd.render_rich(a_model(state="ready", **TRACKED)))
    text = out.getvalue()
    assert "dmrecover/a-1234abcd" in text
    assert "still running after 10s: 7 (postgres); sending SIGTERM" in text
    assert "10.3s stopped by SIGTERM" in text
    assert "refused: held by 77 (sleep); retrying in 10 s (attempt 2)" in text
