"""The background restore: every chunk not yet restored, at low priority.

One thread walks the restored map and calls `Fetcher.ensure(index, background=True)` for each
missing chunk, in ascending order from where the application last read (see follow_reads),
wrapping around. Before each chunk it yields to on-demand fetches (`Fetcher.yield_to_demand`),
so an application read never waits behind background work. It syncs DEST and the restored map
every `sync_chunks` chunks or `sync_seconds` seconds, and once more at the end; then it sets
`completed` and calls `on_complete`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from dmrecover.engine.fetcher import Fetcher, chunk_length
from dmrecover.errors import CorruptChunk
from dmrecover.progress import Progress

log = logging.getLogger(__name__)


class Restorer:
    """Background restore thread over a Fetcher.

    on_complete: called (in the restorer thread) once every chunk is restored and synced.
    progress: optional structured progress (bytes restored by this restorer).
    follow_reads: after an on-demand fetch of chunk i, continue from i+1 (wrapping around at
        the end), so an application reading sequentially finds the next chunks restored
        ahead of it; without it, chunks go in ascending order from 0.
    """

    def __init__(self, fetcher: Fetcher, *, on_complete: Callable[[], None] | None = None,
                 sync_chunks: int = 64, sync_seconds: float = 5.0,
                 progress: Progress | None = None, follow_reads: bool = True) -> None:
        self.fetcher = fetcher
        self.on_complete = on_complete
        self.sync_chunks = sync_chunks
        self.sync_seconds = sync_seconds
        self.progress = progress
        self._stop = threading.Event()
        self.completed = threading.Event()  # every chunk restored and synced
        self.finished = threading.Event()   # the thread has exited (for whatever reason)
        self.error: str | None = None
        self.corrupt: list[int] = []
        self._corrupt_set: set[int] = set()
        self.follow_reads = follow_reads
        self.restored_bytes = 0   # by this restorer (background)
        self.started: float | None = None
        self._start_restored = 0
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start the thread (once)."""
        if self._thread is not None:
            raise RuntimeError("restorer already started")
        self.started = time.monotonic()
        self._start_restored = self.fetcher.stats()["restored_bytes"]
        self._thread = threading.Thread(target=self._run, name="dmrecover-restorer",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 10.0) -> None:
        """Ask the thread to stop and wait for it (the chunk in flight finishes first)."""
        self._stop.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout)

    def stats(self) -> dict:
        """rate: bytes/s restored (by any path) since start; error; completed."""
        elapsed = time.monotonic() - self.started if self.started else 0.0
        done = self.fetcher.stats()["restored_bytes"] - self._start_restored
        return {
            "running": self.running,
            "completed": self.completed.is_set(),
            "background_bytes": self.restored_bytes,
            "elapsed": elapsed,
            "rate": done / elapsed if elapsed > 0 else 0.0,
            "error": self.error,
            "corrupt_chunks": list(self.corrupt),
        }

    def _next(self, cursor: int) -> int | None:
        """The next chunk to restore: the first unrestored one at or after `cursor`, wrapping
        around to the start; corrupt chunks (already reported) are skipped."""
        f = self.fetcher
        for start in (cursor, 0):
            for index in f.iter_unrestored(start):
                if index not in self._corrupt_set:
                    return index
        return None

    def _run(self) -> None:
        f = self.fetcher
        last_sync = time.monotonic()
        since_sync = 0
        cursor = 0
        try:
            while not self._stop.is_set():
                # On-demand fetches first: wait while any is in flight (bounded, so that a
                # storm of reads still lets the restore make progress now and then).
                f.yield_to_demand(timeout=1.0)
                if self._stop.is_set():
                    break
                if self.follow_reads:
                    hint = f.take_demand_hint()
                    if hint is not None:
                        cursor = hint
                index = self._next(cursor)
                if index is None:
                    break
                cursor = index + 1
                try:
                    fetched = f.ensure(index, background=True)
                except CorruptChunk as err:
                    # Keep restoring the rest: the application may never read this chunk,
                    # but the restore cannot complete; the session reports it.
                    log.error("background restore: %s", err)
                    self.corrupt.append(index)
                    self._corrupt_set.add(index)
                    continue
                if not fetched:
                    continue  # an on-demand fetch got there first
                n = chunk_length(f.source, index)
                self.restored_bytes += n
                if self.progress is not None:
                    self.progress.update(n, 1)
                since_sync += 1
                now = time.monotonic()
                if since_sync >= self.sync_chunks or now - last_sync >= self.sync_seconds:
                    f.sync()
                    since_sync = 0
                    last_sync = now
            f.sync()
            if self.corrupt:
                self.error = (f"{len(self.corrupt)} corrupt chunk(s) in the backup (first: "
                              f"{self.corrupt[0]}); the restore cannot complete")
            elif f.restored_all():
                self.completed.set()
                if self.progress is not None:
                    self.progress.finish("restored")
                if self.on_complete is not None:
                    self.on_complete()
        except Exception as err:  # surfaced through stats(); the session decides
            log.error("background restore failed: %s", err)
            self.error = str(err)
        finally:
            self.finished.set()
