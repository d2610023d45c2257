"""The background restore: every chunk not yet restored, at low priority, fetched in parallel.

A small pool of worker threads (`workers`, default 4: a network store's latency is hidden by
a few GETs in flight; a local store gains from decompression and verification on several
cores) takes chunks from one shared cursor: each calls `Fetcher.ensure(index,
background=True)` for the next missing chunk in ascending order from where the application
last read (see follow_reads), wrapping around. Chunks in the hands of a worker are skipped by
the others, so no chunk is fetched twice.

Priority: before each chunk a worker yields to on-demand fetches (`Fetcher.yield_to_demand`),
so an application read never waits behind background work: on-demand fetches run in the
reading thread and at most `workers` background fetches are already in flight when it comes.

Read-ahead: when the application reads (on-demand fetch of chunk i), the shared cursor jumps to
i+1, so the pool restores the chunks right after the application's position while it reads
sequentially.

One writer to DEST: the workers fetch in parallel, their DEST writes go one at a time (a lock
around `Fetcher.write_dest`), so DEST sees one sequential-ish stream, not `workers` competing
ones (plus the fetcher's writer thread, which writes the chunks read on demand; module doc
of fetcher). A read of a chunk a worker has in flight takes its bytes once they are read,
without waiting for this lock or the write.

Errors: a corrupt chunk is recorded and skipped (the application may never read it), and the
restore ends with an error naming it; transient faults are retried inside the fetcher (the
background restore waits for a lost repository); any other failure stops every worker and is
reported. DEST and the restored map are synced every `sync_chunks` chunks or `sync_seconds`
seconds and once more at the end; then `completed` is set and `on_complete` called.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from dmrecover import testhooks
from dmrecover.engine.fetcher import Fetcher, chunk_length
from dmrecover.errors import CorruptChunk
from dmrecover.progress import Progress

log = logging.getLogger(__name__)

DEFAULT_WORKERS = 4
MAX_WORKERS = 64
# Every thread of the background restore has this name (test hooks and profiles tell
# background fetches from on-demand ones by it).
THREAD_NAME = "dmrecover-restorer"


class Restorer:
    """Background restore over a Fetcher, with `workers` parallel fetches.

    on_complete: called (in the restorer thread) once every chunk is restored and synced.
    progress: optional structured progress (bytes restored by this restorer).
    follow_reads: after an on-demand fetch of chunk i, continue from i+1 (wrapping around at
        the end), so an application reading sequentially finds the next chunks restored
        ahead of it; without it, chunks go in ascending order from 0.
    workers: background fetches in flight at most (1: one chunk at a time).
    """

    def __init__(self, fetcher: Fetcher, *, on_complete: Callable[[], None] | None = None,
                 sync_chunks: int = 64, sync_seconds: float = 5.0,
                 progress: Progress | None = None, follow_reads: bool = True,
                 workers: int = DEFAULT_WORKERS) -> None:
        if not 1 <= workers <= MAX_WORKERS:
            raise ValueError(f"workers must be 1..{MAX_WORKERS}, not {workers}")
        self.fetcher = fetcher
        self.on_complete = on_complete
        self.sync_chunks = sync_chunks
        self.sync_seconds = sync_seconds
        self.progress = progress
        self.workers = workers
        self._stop = threading.Event()
        self.completed = threading.Event()  # every chunk restored and synced
        self.finished = threading.Event()   # the thread has exited (for whatever reason)
        self.error: str | None = None
        self.corrupt: list[int] = []
        self._corrupt_set: set[int] = set()
        self.follow_reads = follow_reads
        self.restored_bytes = 0   # by this restorer (background)
        self.started: float | None = None
        self.completed_at: float | None = None  # monotonic, once completed
        self._start_restored = 0
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()        # cursor, claimed, counters
        self._write_lock = threading.Lock()  # the one writer to DEST
        self._cursor = 0
        self._claimed: set[int] = set()      # chunks a worker is fetching
        self._since_sync = 0
        self._last_sync = 0.0
        self._failure: BaseException | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start the thread (once)."""
        if self._thread is not None:
            raise RuntimeError("restorer already started")
        self.started = time.monotonic()
        self._start_restored = self.fetcher.stats()["restored_bytes"]
        self._thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 10.0) -> None:
        """Ask the threads to stop and wait for them (the chunks in flight finish first)."""
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
            "workers": self.workers,
            "elapsed": elapsed,
            "rate": done / elapsed if elapsed > 0 else 0.0,
            "error": self.error,
            "corrupt_chunks": list(self.corrupt),
        }

    # ------------------------------------------------------------------ scheduling

    def _claim(self) -> int | None:
        """The next chunk for a worker: the first unrestored one at or after the cursor (moved
        to the application's latest on-demand fetch, when following reads), wrapping around;
        chunks other workers hold and corrupt chunks are skipped. None: nothing left."""
        f = self.fetcher
        with self._lock:
            if self.follow_reads:
                hint = f.take_demand_hint()
                if hint is not None:
                    self._cursor = hint
            for start in (self._cursor, 0):
                for index in f.iter_unrestored(start):
                    if index not in self._claimed and index not in self._corrupt_set:
                        self._claimed.add(index)
                        self._cursor = index + 1
                        return index
            return None

    def _write(self, offset: int, data: bytes | memoryview) -> None:
        with self._write_lock:
            self.fetcher.write_dest(offset, data)

    def _worker(self) -> None:
        f = self.fetcher
        try:
            while not self._stop.is_set():
                # On-demand fetches first: wait while any is in flight (bounded, so that a
                # storm of reads still lets the restore make progress now and then).
                f.yield_to_demand(timeout=1.0)
                testhooks.restore_hold(self._stop)
                if self._stop.is_set():
                    break
                index = self._claim()
                if index is None:
                    break
                try:
                    fetched = f.ensure(index, background=True, write=self._write)
                except CorruptChunk as err:
                    # Keep restoring the rest: the application may never read this chunk,
                    # but the restore cannot complete; the session reports it.
                    log.error("background restore: %s", err)
                    with self._lock:
                        self.corrupt.append(index)
                        self._corrupt_set.add(index)
                    continue
                finally:
                    with self._lock:
                        self._claimed.discard(index)
                if fetched:
                    self._count(chunk_length(f.source, index), f.source.is_zero(index))
        except BaseException as err:  # noqa: BLE001 - stops the others; reported by _run
            with self._lock:
                if self._failure is None:
                    self._failure = err
            self._stop.set()

    def _count(self, n: int, zero: bool = False) -> None:
        """Account one chunk restored here; sync DEST and the map when it is time. A zero
        chunk does not count towards sync_chunks: it wrote (next to) nothing, and redoing it
        after a crash costs next to nothing, while a sync every 64 of them (fsync of DEST
        and of the map) made the restore of a mostly empty volume several times slower than
        the offline restore, which skips them."""
        with self._lock:
            self.restored_bytes += n
            if not zero:
                self._since_sync += 1
            now = time.monotonic()
            due = self._since_sync >= self.sync_chunks or now - self._last_sync >= \
                self.sync_seconds
            if due:
                self._since_sync = 0
                self._last_sync = now
        if self.progress is not None:
            self.progress.update(n, 1)
        if due:
            self.fetcher.sync()

    def _run(self) -> None:
        f = self.fetcher
        self._last_sync = time.monotonic()
        try:
            pool = [threading.Thread(target=self._worker, name=THREAD_NAME, daemon=True)
                    for _ in range(self.workers - 1)]
            for t in pool:
                t.start()
            self._worker()  # this thread is one of the workers
            for t in pool:
                t.join()
            if self._failure is not None:
                raise self._failure
            f.sync()
            if self.corrupt:
                self.corrupt.sort()
                self.error = (f"{len(self.corrupt)} corrupt chunk(s) in the backup (first: "
                              f"{self.corrupt[0]}); the restore cannot complete")
            elif f.restored_all():
                self.completed_at = time.monotonic()
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
