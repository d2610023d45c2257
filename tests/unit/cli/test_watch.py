"""`status --watch` rendered into a fixed-size recording console at every state a wall screen
shows (restoring, waiting for the repository, ready, cutting over, done, failed, dead), the
compact table of many sessions in 40 rows, plain lines when not a terminal, the exit with a
summary, and the rate averaged over a window."""

from __future__ import annotations

import io
import time

import pytest
from rich.console import Console

from dmrecover.cli import status_display as sd
from tests.unit.cli.test_status_display import a_model

MiB = 1 << 20
NOW = time.time()
CUT = {"cutover_started": NOW - 3.0, "app_stopped": NOW - 2.5}

STATES = {
    "restoring": a_model(overlay_room=1024 * MiB, overlay_allocated=12 * MiB),
    "waiting": a_model(waiting_for_repository_since=NOW - 40, retries=7),
    "ready": a_model(state="ready", restored_bytes=100 * MiB, percent=100.0, rate=0.0,
                     eta=0.0),
    "cutting-over": a_model(state="cutting-over", phase="merge", restored_bytes=100 * MiB,
                            percent=100.0, timings=CUT),
    "done": a_model(state="done", alive=False, restored_bytes=100 * MiB, percent=100.0,
                    timings={**CUT, "merged": NOW - 1.0, "app_restarted": NOW - 0.5,
                             "cutover_downtime": 2.5, "done": NOW}),
    "failed": a_model(state="failed", alive=False, error="the application exited with "
                      "code 7"),
    "dead": a_model(alive=False, note="the session process is not running: "
                    "dmrecover resume a"),
}


def screen(renderable: object, width: int = 100, height: int = 40) -> str:
    console = Console(record=True, width=width, height=height, file=io.StringIO(),
                      force_terminal=True, color_system="truecolor")
    console.print(renderable)
    return console.export_text()


def colour_of(renderable: object) -> set[str]:
    console = Console(record=True, width=100, file=io.StringIO(), force_terminal=True,
                      color_system="truecolor")
    console.print(renderable)
    return {str(seg.style.color.name) for seg in console._record_buffer
            if seg.style and seg.style.color and seg.text.strip() in
            ("RESTORING", "READY", "DONE", "FAILED", "CUTTING-OVER (MERGE)")}


@pytest.mark.parametrize("state", list(STATES))
def test_every_state_on_one_screen(state: str) -> None:
    m = STATES[state]
    text = screen(sd.render_rich(m))
    lines = text.splitlines()
    assert len(lines) <= 40 and all(len(line) <= 100 for line in lines)
    top = lines[1]
    assert m["state"].upper() in top  # the state on top, on a line of its own
    word, colour = sd.health(m)
    assert word in top
    assert colour_of(sd.render_rich(m)) <= {colour}
    if state == "restoring":
        assert "25.0 MiB of 100.0 MiB (25.0%)" in text and "5.0 MiB/s   ETA 15.0 s" in text
        assert "7 fetches" in text and "12.0 MiB used of 1.0 GiB room (1%)" in text
        assert colour == "green"
    if state == "waiting":
        assert "waiting for repository" in top and colour == "yellow"
        assert "UNREACHABLE for " in text and "7 retries" in text
    if state in ("ready", "cutting-over", "done"):
        assert "restored" in text and "ETA" not in text
    if state == "cutting-over":
        assert "stop app 0.50 s > merge ..." in text
    if state == "done":
        assert "stop app 0.50 s > merge 1.50 s > restart app 0.50 s > downtime 2.50 s" in text
        assert colour == "green"
    if state == "failed":
        assert "exited with code 7" in text and colour == "red"
    if state == "dead":
        assert "DEAD" in top and colour == "red"
        assert "MiB/s" not in text and "ETA" not in text  # no stale rate
        assert "dmrecover resume a" in text


def test_forty_sessions_fit_forty_rows() -> None:
    models = [a_model(session=f"db{i:02d}") for i in range(60)]
    text = screen(sd.render_table(models, height=40), width=100, height=40)
    lines = text.rstrip("\n").splitlines()
    assert len(lines) <= 40 and all(len(line) <= 100 for line in lines)
    assert lines[0].split()[:3] == ["SESSION", "STATE", "HEALTH"]
    assert "db00" in text and "more" in lines[-1]
    few = screen(sd.render_table(models[:5], height=40))
    assert "more" not in few and "db04" in few


def test_plain_lines_when_not_a_terminal_and_a_summary_at_the_end() -> None:
    ticks = [[STATES["restoring"]], [STATES["cutting-over"]], [STATES["done"]]]
    out = io.StringIO()
    console = Console(file=out, width=200, force_terminal=False)
    assert sd.watch(lambda: ticks.pop(0), interval=0.01, console=console) == 0
    lines = out.getvalue().splitlines()
    assert [line.split()[2] for line in lines[:3]] == ["restoring", "cutting-over", "done"]
    assert "[healthy]" in lines[0] and "restored" in lines[2]
    assert lines[-1] == ("session a: done; the application runs on /dev/x at /srv/data "
                         "(downtime 2.50 s)")
    assert not ticks


def test_the_rich_display_ends_by_itself_on_a_terminal() -> None:
    ticks = [[STATES["restoring"]], [STATES["failed"]]]
    console = Console(record=True, width=100, height=40, file=io.StringIO(),
                      force_terminal=True)
    assert sd.watch(lambda: ticks.pop(0), interval=0.01, console=console) == 0
    text = console.export_text()
    assert "FAILED" in text and text.rstrip().endswith(
        "session a: failed: the application exited with code 7")


def test_follow_stays_after_the_end() -> None:
    calls = []

    def models() -> list[dict]:
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return [STATES["done"]]

    console = Console(file=io.StringIO(), width=200, force_terminal=False)
    assert sd.watch(models, interval=0.01, console=console, follow=True) == 0
    assert len(calls) == 4


def test_rate_is_averaged_over_a_window() -> None:
    w = sd.RateWindow(window=10.0)
    m = a_model(rate=123.0)
    assert w.apply({**m, "restored_bytes": 0}, now=0.0)["rate"] == 123.0  # too early
    for t in range(1, 21):  # 1 MiB/s steadily, then a stall of 2 s
        got = w.apply({**m, "restored_bytes": min(t, 18) * MiB}, now=float(t))
    assert 0.7 * MiB < got["rate"] < 1.0 * MiB  # not 0 after a short stall
    assert got["eta"] is not None and got["eta"] > 0
    dead = {**m, "alive": False, "restored_bytes": 50 * MiB}
    assert sd.RateWindow().apply(dead) is dead
