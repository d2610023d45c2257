"""The CLI's progress displays: JSON lines, throttled plain lines, the choice by TTY."""

from __future__ import annotations

import io
import json

import pytest

from dmrecover.cli.progress_display import JsonRenderer, PlainRenderer, make_renderer
from dmrecover.progress import NullRenderer, Progress


def test_json_lines() -> None:
    out = io.StringIO()
    p = Progress("restore", total_bytes=1000, total_items=4, renderer=JsonRenderer(out, 0))
    p.update(250, items=1)
    p.update(750, items=3, message="last")
    p.finish()
    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    assert lines[-1]["finished"] is True
    assert lines[-1]["done_bytes"] == 1000
    assert lines[-1]["done_items"] == 4
    assert lines[-1]["percent"] == 100.0
    assert lines[1]["message"] == "last"


def test_plain_renderer_throttles_but_always_prints_the_end() -> None:
    out = io.StringIO()
    p = Progress("backup", total_bytes=100, renderer=PlainRenderer(out, interval=3600))
    for _ in range(50):
        p.update(1)
    p.finish()
    lines = out.getvalue().splitlines()
    # the first update prints, the next 49 are throttled, the end always prints
    assert len(lines) == 2
    assert lines[-1].startswith("backup: done")


def test_make_renderer_picks_plain_when_not_a_tty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert isinstance(make_renderer("auto"), PlainRenderer)
    assert isinstance(make_renderer("none"), NullRenderer)
    assert isinstance(make_renderer("json"), JsonRenderer)
