"""Structured progress from the engine, rendered separately (rich, plain lines, or JSON lines).

The engine only calls `Progress.update()`; it never prints. The renderer is picked by the CLI:
rich on a TTY, plain lines otherwise, JSON lines with --json.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import IO, Protocol

from dmrecover.units import format_size


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
    def render(self, event: ProgressEvent) -> None: ...
    def close(self) -> None: ...


class NullRenderer:
    def render(self, event: ProgressEvent) -> None:
        pass

    def close(self) -> None:
        pass


class PlainRenderer:
    """One line every `interval` seconds and one at the end; for logs and pipes."""

    def __init__(self, stream: IO[str] | None = None, interval: float = 2.0) -> None:
        self.stream = stream or sys.stderr
        self.interval = interval
        self._last: float | None = None  # the first event always prints

    def render(self, event: ProgressEvent) -> None:
        now = time.monotonic()
        if not event.finished and self._last is not None and now - self._last < self.interval:
            return
        self._last = now
        state = "done" if event.finished else f"{event.percent:5.1f}%"
        print(
            f"{event.operation}: {state} {format_size(event.done_bytes)}"
            f"/{format_size(event.total_bytes)} at {format_size(event.rate)}/s"
            + (f" {event.message}" if event.message else ""),
            file=self.stream,
            flush=True,
        )

    def close(self) -> None:
        pass


class JsonRenderer:
    """JSON lines, for programs."""

    def __init__(self, stream: IO[str] | None = None, interval: float = 1.0) -> None:
        self.stream = stream or sys.stderr
        self.interval = interval
        self._last: float | None = None  # the first event always prints

    def render(self, event: ProgressEvent) -> None:
        now = time.monotonic()
        if not event.finished and self._last is not None and now - self._last < self.interval:
            return
        self._last = now
        print(json.dumps(event.to_dict()), file=self.stream, flush=True)

    def close(self) -> None:
        pass


class RichRenderer:
    """A rich progress bar on a TTY."""

    def __init__(self) -> None:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )
        from rich.progress import (
            Progress as RichProgress,
        )

        self._bar = RichProgress(
            "[bold]{task.description}",
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            transient=False,
        )
        self._task = None
        self._bar.start()

    def render(self, event: ProgressEvent) -> None:
        if self._task is None:
            self._task = self._bar.add_task(event.operation, total=event.total_bytes or None)
        self._bar.update(self._task, completed=event.done_bytes, total=event.total_bytes or None)

    def close(self) -> None:
        self._bar.stop()


def make_renderer(mode: str = "auto") -> Renderer:
    """mode: auto (rich on a TTY, else plain), rich, plain, json, none."""
    if mode == "auto":
        mode = "rich" if sys.stderr.isatty() else "plain"
    return {
        "rich": RichRenderer,
        "plain": PlainRenderer,
        "json": JsonRenderer,
        "none": NullRenderer,
    }[mode]()


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
