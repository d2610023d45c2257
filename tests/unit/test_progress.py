"""The progress emitter: counts, messages, the end, and a renderer called one event at a time.
(The displays that print events are the CLI's: tests/unit/cli/test_progress_display.py.)"""

from __future__ import annotations

import threading

from dmrecover.progress import NullRenderer, Progress, ProgressEvent


class Recorder:
    """A renderer that keeps a copy of every event."""

    def __init__(self) -> None:
        self.events: list[dict] = []
        self.closed = 0

    def render(self, event: ProgressEvent) -> None:
        self.events.append(event.to_dict())

    def close(self) -> None:
        self.closed += 1


def test_progress_counts_messages_and_finishes() -> None:
    rec = Recorder()
    p = Progress("restore", total_bytes=1000, total_items=4, renderer=rec)
    p.update(250, items=1)
    p.update(750, items=3, message="last")
    p.finish()
    assert [e["done_bytes"] for e in rec.events] == [250, 1000, 1000]
    assert rec.events[1]["message"] == "last"
    last = rec.events[-1]
    assert last["finished"] is True and last["done_items"] == 4 and last["percent"] == 100.0
    assert "started" not in last and last["elapsed"] >= 0
    assert rec.closed == 1


def test_concurrent_updates_are_all_counted() -> None:
    rec = Recorder()
    p = Progress("backup", total_bytes=8000, renderer=rec)

    def work() -> None:
        for _ in range(1000):
            p.update(1)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    p.finish()
    assert rec.events[-1]["done_bytes"] == 8000
    assert len(rec.events) == 8001


def test_null_renderer_is_the_default() -> None:
    p = Progress("verify", total_bytes=0)
    assert isinstance(p.renderer, NullRenderer)
    p.update(0)
    p.finish()
    assert p.event.percent == 100.0  # nothing to do is all done
