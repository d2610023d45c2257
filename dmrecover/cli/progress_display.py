"""The CLI's progress displays: a rich bar on a TTY, plain lines for logs and pipes, JSON lines
for programs. The library only emits `dmrecover.progress.ProgressEvent`s; these print them.
"""

from __future__ import annotations

import json
import sys
import time
from typing import IO

from rich.progress import BarColumn, DownloadColumn, ProgressColumn, Task, TimeRemainingColumn
from rich.progress import Progress as RichProgress
from rich.text import Text

from dmrecover.progress import NullRenderer, ProgressEvent, Renderer
from dmrecover.units import format_rate, format_size

MODES = ("auto", "rich", "plain", "json", "none")


class _Throttled:
    """Lets an event through every `interval` seconds; the first and the last always pass."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._last: float | None = None

    def due(self, event: ProgressEvent) -> bool:
        now = time.monotonic()
        if not event.finished and self._last is not None and now - self._last < self.interval:
            return False
        self._last = now
        return True


class PlainRenderer:
    """One line every `interval` seconds and one at the end; for logs and pipes."""

    def __init__(self, stream: IO[str] | None = None, interval: float = 2.0) -> None:
        self.stream = stream or sys.stderr
        self._gate = _Throttled(interval)

    def render(self, event: ProgressEvent) -> None:
        if not self._gate.due(event):
            return
        state = "done" if event.finished else f"{event.percent:5.1f}%"
        print(
            f"{event.operation}: {state} {format_size(event.done_bytes)}"
            f"/{format_size(event.total_bytes)} at {format_rate(event.rate)}"
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
        self._gate = _Throttled(interval)

    def render(self, event: ProgressEvent) -> None:
        if self._gate.due(event):
            print(json.dumps(event.to_dict()), file=self.stream, flush=True)

    def close(self) -> None:
        pass


class RateColumn(ProgressColumn):
    """The rate in IEC units like every other display (rich's own says MB/s)."""

    def render(self, task: Task) -> Text:
        return Text(format_rate(task.speed) if task.speed is not None else "?",
                    style="progress.data.speed")


class RichRenderer:
    """A rich progress bar on a TTY."""

    def __init__(self) -> None:
        self._bar = RichProgress(
            "[bold]{task.description}",
            BarColumn(),
            DownloadColumn(binary_units=True),
            RateColumn(),
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
