"""Structured progress: the library emits events, a front-end renders them.

The engine and the repository only call `Progress.update()`; they never print. A renderer is
anything with `render(event)` and `close()`: the CLI's displays (rich, plain lines, JSON lines)
live in dmrecover/cli/progress_display.py; the library's default is `NullRenderer`.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Protocol


@dataclass
class ProgressEvent:
    """One snapshot of an operation's progress."""

    operation: str  # "backup", "restore", "verify", ...
    done_bytes: int = 0
    total_bytes: int = 0
    done_items: int = 0
    total_items: int = 0
    started: float = field(default_factory=time.monotonic)
    message: str = ""
    finished: bool = False

    @property
    def elapsed(self) -> float:
        return max(time.monotonic() - self.started, 1e-9)

    @property
    def rate(self) -> float:
        """Bytes per second so far."""
        return self.done_bytes / self.elapsed

    @property
    def percent(self) -> float:
        return 100.0 * self.done_bytes / self.total_bytes if self.total_bytes else 100.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(elapsed=round(self.elapsed, 3), rate=round(self.rate), percent=self.percent)
        d.pop("started")
        return d


class Renderer(Protocol):
    """What `Progress` feeds: called under its lock, so one event at a time."""

    def render(self, event: ProgressEvent) -> None: ...
    def close(self) -> None: ...


class NullRenderer:
    """Shows nothing (the default)."""

    def render(self, event: ProgressEvent) -> None:
        pass

    def close(self) -> None:
        pass


class Progress:
    """Thread-safe progress counter that feeds a renderer."""

    def __init__(self, operation: str, total_bytes: int = 0, total_items: int = 0,
                 renderer: Renderer | None = None) -> None:
        self.event = ProgressEvent(operation, total_bytes=total_bytes, total_items=total_items)
        self.renderer = renderer or NullRenderer()
        self._lock = threading.Lock()

    def update(self, nbytes: int = 0, items: int = 0, message: str | None = None) -> None:
        with self._lock:
            self.event.done_bytes += nbytes
            self.event.done_items += items
            if message is not None:
                self.event.message = message
            self.renderer.render(self.event)

    def finish(self, message: str | None = None) -> None:
        with self._lock:
            self.event.finished = True
            if message is not None:
                self.event.message = message
            self.renderer.render(self.event)
            self.renderer.close()
