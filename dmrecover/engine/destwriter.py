"""The DEST writer: one thread that writes the chunks read on demand to DEST, so that an
on-demand read returns as soon as its chunk's bytes are read (engine/fetcher.py, module doc).

The queue is bounded (`limit` chunks: memory); a full or closed queue refuses a chunk and the
reader writes it itself. Each chunk is written by `store(index, data)` and then handed to
`land(index, item)` whether the write succeeded or not (`fail(index, item, err)` first when
it did not), in the order the chunks were queued. Stopping without draining drops the queued
chunks but the one being written: they were never written, so they stay unrestored and are
fetched again (what a kill does too).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

WRITER_THREAD_NAME = "dmrecover-dest-writer"


class DestWriter:
    """A bounded queue of chunks to write to DEST and the one thread that writes them
    (started on first use)."""

    def __init__(self, store: Callable[[int, bytes], None],
                 land: Callable[[int, Any], None],
                 fail: Callable[[int, Any, BaseException], None], limit: int) -> None:
        self._store = store
        self._land = land
        self._fail = fail
        self.limit = limit
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._queue: deque[tuple[int, bytes, Any]] = deque()
        self._thread: threading.Thread | None = None
        self._closed = False

    def submit(self, index: int, data: bytes, item: Any) -> bool:
        """Queue chunk `index`'s write; False when the queue is full or closed (the caller
        writes it itself)."""
        with self._lock:
            if self._closed or len(self._queue) >= self.limit:
                return False
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, daemon=True,
                                                name=WRITER_THREAD_NAME)
                self._thread.start()
            self._queue.append((index, data, item))
            self._changed.notify_all()
        return True

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._closed:
                    self._changed.wait()
                if not self._queue:
                    return
                index, data, item = self._queue[0]
            try:
                self._store(index, data)
            except BaseException as err:  # noqa: BLE001 - the chunk stays unrestored
                self._fail(index, item, err)
            finally:
                with self._lock:
                    self._queue.popleft()
                    self._changed.notify_all()
                self._land(index, item)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every queued chunk is written (or failed); False on timeout."""
        with self._lock:
            return self._changed.wait_for(lambda: not self._queue, timeout)

    def stop(self, drain: bool) -> list[tuple[int, Any]]:
        """Stop the thread: after the queued writes (drain) or after the one in progress;
        returns the dropped chunks (index, item), which the caller lands as failed."""
        with self._lock:
            self._closed = True
            dropped = [] if drain or not self._queue else list(self._queue)[1:]
            for entry in dropped:
                self._queue.remove(entry)
            self._changed.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        return [(index, item) for index, _, item in dropped]
