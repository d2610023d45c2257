"""Second data structure and fetch path: the restored map, DEST, on-demand fetch, retries.

A chunk is fetched from a `ChunkSource` (verified there), written to DEST and marked restored
in memory; from then on reads of it are served from DEST. `sync()` makes DEST durable and only
then persists the restored map, so the map on disk never names a chunk that is not on DEST.

Repository lost: a transient fault (RepositoryUnavailable) is retried with a backoff. Past
`deadline` the repository is "lost" (stats: repository_lost_since): with on_lost="block" (the
default, and the only choice for a kernel origin, where one read error invalidates a
dm-snapshot for good) reads keep waiting; with on_lost="error" on-demand reads fail (EIO to the
application) at once while it is lost. The background restore always waits. The first read
that succeeds ends the lost state: the session recovers by itself.

The mark: with `mark_head` (a file in the state dir), DEST's first MARK_SIZE bytes are kept
aside in that file and are zeros on DEST for as long as the restore is incomplete, so that no
filesystem is found on a half-restored DEST (after an abort, a crash) and no one mounts it by
mistake. Order: the head is saved aside durably BEFORE DEST's is zeroed; writes to it go to
the saved copy (durably, before the restored map can name chunk 0), reads come from it; once
every chunk is restored and synced, the head is written back to DEST and synced BEFORE the
saved copy is deleted. A crash at any point leaves either the saved copy (the mark is made
again / put back again: both idempotent) or a complete DEST.

Priority: on-demand fetches run in the calling thread (no queue to wait in); concurrent
ensure() calls of one chunk share the one fetch in flight. Before each background chunk the
restorer's `yield_to_demand()` waits while on-demand fetches are in flight. engine/priority.py:
a thread fetching on demand runs at a raised CPU priority, and so does a background fetch an
on-demand read waits for; while on-demand reads are busy, at most `busy_reads` background
chunk reads are in flight (ReadGate), and one that an on-demand read waits for goes first.

No DEST write on a read's path (`read`): an on-demand read returns as soon as its chunk's
bytes are read and verified, served from them; their DEST write goes to the DEST writer
(engine/destwriter.py). A read of a chunk whose fetch is in flight (on demand or
background) takes its bytes as soon as they are read, without waiting for that fetch's DEST
write either (measured before: a 4 MiB DEST write in the reader took 89 ms at p99 under the
background restore's writeback). Safety is unchanged: a chunk stays in flight (never fetched again)
until its write is done, and only then is it marked restored, so the map on disk still never
names a chunk not on DEST; a failed write leaves it unrestored (the reader's bytes were
right: verified) and a kill drops the pending writes (fetched again later).

Writeback: each chunk written to DEST starts its writeback at once (sync_file_range WRITE),
so DEST's dirty data goes to the disk as a steady stream, not in bursts at each sync that
on-demand repository reads queue behind (their blocked time at p99 123 -> 43 ms). Durability
is still the sync's fsync alone.
"""

from __future__ import annotations

import fcntl
import logging
import os
import stat
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path

from dmrecover.engine.bitmap import Bitmap, SlotFile
from dmrecover.engine.destwriter import WRITER_THREAD_NAME, DestWriter
from dmrecover.engine.fastio import reads_as_zeros, zero_range
from dmrecover.engine.priority import DEFAULT_HOLD, DEMAND_NICE, ReadGate, boost, unboost
from dmrecover.engine.source import ChunkSource, MemorySource, chunk_length
from dmrecover.engine.timing import Stages, breakdown, percentile
from dmrecover.errors import (
    BitmapError,
    CorruptChunk,
    DeviceError,
    EngineError,
    RepositoryUnavailable,
)
from dmrecover.system.files import atomic_write, fsync_dir, start_writeback

# ChunkSource, chunk_length and MemorySource live in engine/source.py; importable from here.
__all__ = ["DEMAND_NICE", "ON_LOST", "WRITER_THREAD_NAME", "ChunkSource", "Fetcher",
           "MemorySource", "chunk_length"]

log = logging.getLogger(__name__)

_BLKZEROOUT = 0x127F  # _IO(0x12, 127)
_LATENCY_SAMPLES = 4096
ON_LOST = ("block", "error")
MARK_SIZE = 4096
# On-demand chunks waiting for their DEST write at most (memory: this many chunks); past it
# the reading thread writes its chunk itself.
_WRITE_QUEUE = 4
# A zero chunk's bytes in flight (never allocated: 4 MiB of zeros per chunk cost the restore
# of a mostly empty volume seconds); a chunk's real bytes are never empty.
ZERO_CHUNK = b""


class _Inflight:
    """One fetch in flight: `ready` is set once its bytes are read (`data`) or it failed,
    `done` once they are on DEST and restored or it failed (`error`). `tid`: the fetching
    thread; `urgent`: an on-demand read waits for it; `boosted`: that thread's nice before
    an on-demand read raised it (engine/priority.py)."""

    __slots__ = ("background", "boosted", "data", "done", "error", "ready", "tid", "urgent")

    def __init__(self, background: bool = False) -> None:
        self.background = background
        self.tid = threading.get_native_id()
        self.urgent = False
        self.boosted: int | None = None
        self.data: bytes | None = None
        self.ready = threading.Event()
        self.done = threading.Event()
        self.error: BaseException | None = None


class Fetcher:
    """The restored map, DEST, and the fetch path (thread-safe).

    dest_path: DEST, a block device or regular file, at least source.size bytes (checked by the
        caller; checked here again).
    map_path: the persisted restored map (loaded when it exists: resume).
    deadline: seconds a transient fault (RepositoryUnavailable) is retried before the
        repository counts as lost.
    on_lost: "block" (reads wait for the repository) or "error" (on-demand reads fail while
        it is lost); see the module doc.
    busy_reads: background chunk reads in flight at most while on-demand reads are busy
        (None, the default: no limit; 1 cut the p99 further but cost the background restore
        ~8%, docs/architecture.md, Performance); busy_hold: seconds
        the demand stays busy after a fetch (engine/priority.py, ReadGate); demand_rt: fetch
        on demand at a real-time priority (SCHED_RR; False: at nice DEMAND_NICE).
    """

    def __init__(self, source: ChunkSource, dest_path: str | os.PathLike[str],
                 map_path: str | os.PathLike[str], *, deadline: float = 600.0,
                 backoff_max: float = 5.0, on_lost: str = "block",
                 mark_head: str | os.PathLike[str] | None = None,
                 busy_reads: int | None = None, busy_hold: float = DEFAULT_HOLD,
                 demand_rt: bool = True) -> None:
        if on_lost not in ON_LOST:
            raise ValueError(f"on_lost must be one of {ON_LOST}, not {on_lost!r}")
        self.on_lost = on_lost
        self.source = source
        self.dest_path = str(dest_path)
        self.map_path = Path(map_path)
        self.deadline = deadline
        self.backoff_max = backoff_max
        self._lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._inflight: dict[int, _Inflight] = {}
        self._demand_active = 0
        self._demand_hint: int | None = None
        self._demand_idle = threading.Condition(self._lock)
        self.gate = ReadGate(busy_reads, busy_hold)
        self.demand_rt = demand_rt
        self._waiting: dict[int, float] = {}  # thread id -> wall time it started waiting
        self.failure: BaseException | None = None  # a fault nothing can retry (none today)
        self.lost_since: float | None = None  # wall time the repository counted as lost
        self.errors: deque[str] = deque(maxlen=20)
        self.demand_fetches = 0
        self.background_fetches = 0
        self.fetched_bytes = 0
        self.retries = 0
        self._latencies: deque[float] = deque(maxlen=_LATENCY_SAMPLES)
        self._stages: deque[Stages] = deque(maxlen=_LATENCY_SAMPLES)
        self._writer = DestWriter(
            lambda index, data: self._store(index, data, False, self.write_dest, None),
            self._land, self._write_failed, _WRITE_QUEUE)
        self._latency_max = 0.0
        self._latency_sum = 0.0
        self.synced_at: float | None = None
        self.synced_chunks = 0  # chunks the persisted map names (what a crash keeps)

        try:
            fd = os.open(self.dest_path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as err:
            raise DeviceError(f"cannot open DEST {self.dest_path}: {err.strerror}",
                              hint="check the path and that nothing holds it open") from err
        self._fd = fd
        st = os.fstat(fd)
        self._is_blockdev = stat.S_ISBLK(st.st_mode)
        dest_size = os.lseek(fd, 0, os.SEEK_END)
        if dest_size < source.size:
            os.close(fd)
            raise DeviceError(f"DEST {self.dest_path} is {dest_size} bytes, the backup needs "
                              f"{source.size}", hint="use a larger destination")
        self._mapfile = SlotFile(self.map_path, source.chunk_count)
        self.mark_path = Path(mark_head) if mark_head is not None else None
        self._head: bytearray | None = None  # DEST's first bytes while it is marked
        try:
            self.restored = self._load_map()
            self._restored_count = self.restored.count()
            if self.mark_path is not None:
                if self.restored_all():
                    self.unmark()  # a crash after the restore completed: put it back
                else:
                    self._mark()
        except BaseException:
            os.close(fd)
            raise

    # ------------------------------------------------------------------ state

    def _load_map(self) -> Bitmap:
        """The persisted restored map; a new map file is created (allocated in full now, so
        that saving it later needs no new space on a filesystem that may be full). A map of
        the first format (one Bitmap file replaced on every save) is converted."""
        n = self.source.chunk_count
        try:
            if not self.map_path.exists():
                self._mapfile.create()
                self._mapfile.save(Bitmap(n))  # a valid slot from the start
                return Bitmap(n)
            if SlotFile.is_slot_file(self.map_path):
                bm = self._mapfile.load()
                self._mapfile.create()  # opens it for saving (kept as it is)
                return bm
            bm = Bitmap.load(self.map_path)
            if bm.nbits == n:
                self._convert_map(bm)
        except BitmapError as err:
            raise EngineError(f"restored map {self.map_path} is unreadable: {err}",
                               hint="remove it to restore every chunk again") from err
        if bm.nbits != n:
            raise EngineError(f"restored map {self.map_path} has {bm.nbits} chunks, the "
                               f"backup has {n}", hint="the state dir belongs to another backup")
        return bm

    def _convert_map(self, bm: Bitmap) -> None:
        """Replace a first-format map file by a SlotFile holding bm (atomically)."""
        tmp = self.map_path.with_name(self.map_path.name + ".new")
        new = SlotFile(tmp, bm.nbits)
        new.create()
        new.save(bm)
        new.close()
        os.replace(tmp, self.map_path)
        fsync_dir(self.map_path.parent)
        self._mapfile.load()
        self._mapfile.create()

    def is_restored(self, index: int) -> bool:
        """True when chunk `index` is on DEST (possibly only in its page cache)."""
        return self.restored.test(index)

    def restored_all(self) -> bool:
        """True when every chunk is restored."""
        return self._restored_count == self.source.chunk_count

    @property
    def restored_chunks(self) -> int:
        return self._restored_count

    def iter_unrestored(self, start: int = 0) -> Iterator[int]:
        """Chunk indexes not restored yet, ascending from `start` (evaluated lazily)."""
        return self.restored.iter_clear(start)

    def wait_change(self, timeout: float) -> None:
        """Block until a chunk is restored or `timeout` passes."""
        with self._changed:
            self._changed.wait(timeout)

    # ------------------------------------------------------------------ fetch

    def take_demand_hint(self) -> int | None:
        """Index after the latest on-demand fetch since the last call (None: none since)."""
        with self._lock:
            hint, self._demand_hint = self._demand_hint, None
            return hint

    def ensure(self, index: int, *, background: bool = False,
               write: Callable[[int, bytes], None] | None = None) -> bool:
        """Make chunk `index` present on DEST, fetching it when needed (copy-on-read).

        Returns at once when it is restored. Otherwise, if another thread fetches it, waits for
        that fetch; else fetches it here: read from the source (verified), write to DEST, mark
        restored in memory. Transient faults are retried; past the deadline the call
        keeps waiting (on_lost="block", background) or raises RepositoryUnavailable
        (on_lost="error"). CorruptChunk is raised at
        once and nothing is marked restored. Returns True when this call did the fetch.
        write: what writes the chunk to DEST (default write_dest; the restorer's pool
        passes one that writes one chunk at a time).
        """
        return self._ensure(index, background, write, defer=False)[0]

    def read(self, offset: int, length: int) -> bytes:
        """Bytes [offset, offset+length) of the volume's lower tier (within the source's
        size): restored chunks from DEST; any other chunk fetched on demand (or taken from
        the fetch of it in flight, as soon as its bytes are read) and served from the fetched
        bytes, its DEST write left to the DEST writer (module doc, Priority). Raises what
        ensure() raises."""
        cs = self.source.chunk_size
        end = offset + length
        first, last = offset // cs, (end - 1) // cs
        if all(self.restored.test(i) for i in range(first, last + 1)):
            return self.read_dest(offset, length)
        parts: list[bytes] = []
        for index in range(first, last + 1):
            a, b = max(offset, index * cs), min(end, (index + 1) * cs)
            data = self._ensure(index, False, None, defer=True)[1]
            parts.append(self.read_dest(a, b - a) if data is None
                         else _part(data, a - index * cs, b - index * cs))
        return b"".join(parts)

    def _ensure(self, index: int, background: bool,
                write: Callable[[int, bytes], None] | None,
                defer: bool) -> tuple[bool, bytes | None]:
        """ensure(); with `defer` (an on-demand read), returns once the chunk's bytes are
        known, leaving their DEST write to the writer thread: (did the fetch, the bytes; None
        when the chunk is restored)."""
        if self.restored.test(index):
            return False, None
        t0 = time.monotonic()
        stages = None if background else Stages()
        with self._lock:
            if stages is not None:
                stages.lock = time.monotonic() - t0
            if self.restored.test(index):
                return False, None
            if not background:
                self._demand_active += 1
                self.gate.demand_begin()
            try:
                flight = self._inflight.get(index)
                owner = flight is None
                if owner:
                    if self.failure is not None:
                        raise self.failure
                    flight = _Inflight(background)
                    self._inflight[index] = flight
                elif stages is not None:
                    stages.shared = "background" if flight.background else "demand"
                    if flight.background and not flight.ready.is_set():
                        self._raise_flight(flight)
            except BaseException:
                self._demand_done(background)
                raise
        try:
            if not owner:
                tw = time.monotonic()
                (flight.ready if defer else flight.done).wait()
                if stages is not None:
                    stages.wait = time.monotonic() - tw
                if defer and flight.data is not None:
                    return False, flight.data  # right even if its DEST write failed
                if flight.error is not None:
                    raise flight.error
                return False, None
            if not background:
                with self._lock:
                    self._demand_hint = index + 1
            handed_off = False
            nice = None if background else boost(realtime=self.demand_rt)
            try:
                data = self._obtain(index, background, stages, flight)
                flight.data = data
                flight.ready.set()  # readers of this chunk need not wait for DEST
                self._lower_flight(flight)
                if defer and self._hand_off(index, data, flight):
                    handed_off = True
                    return True, data
                self._store(index, data, background, write or self.write_dest, stages)
            except BaseException as err:
                flight.error = err
                raise
            finally:
                if nice is not None:
                    unboost(nice)
                if flight.boosted is not None:
                    self._lower_flight(flight)
                if not handed_off:
                    self._land(index, flight)
            return True, data if defer else None
        finally:
            with self._lock:
                self._demand_done(background)
                if stages is not None:
                    lat = time.monotonic() - t0
                    self._latencies.append(lat)
                    self._latency_sum += lat
                    self._latency_max = max(self._latency_max, lat)
                    self.demand_fetches += 1
                    stages.total = lat
                    self._stages.append(stages)

    def _demand_done(self, background: bool) -> None:
        # caller holds self._lock
        if not background:
            self.gate.demand_end()
            self._demand_active -= 1
            if self._demand_active == 0:
                self._demand_idle.notify_all()

    def yield_to_demand(self, timeout: float | None = None) -> None:
        """Block (the background restorer) while on-demand fetches are in flight."""
        with self._demand_idle:
            self._demand_idle.wait_for(lambda: self._demand_active == 0, timeout)

    def _raise_flight(self, flight: _Inflight) -> None:
        """An on-demand read waits for the background fetch `flight` (bytes not read yet):
        let its read through the gate and give its thread the demand's CPU priority until
        its bytes are read (_lower_flight). Caller holds self._lock."""
        flight.urgent = True
        self.gate.wake()
        if flight.boosted is None:
            flight.boosted = boost(flight.tid, self.demand_rt)

    def _lower_flight(self, flight: _Inflight) -> None:
        """The fetching thread of `flight` gets back the nice an on-demand read raised
        (called by that thread once its bytes are read, or it failed)."""
        with self._lock:
            nice, flight.boosted = flight.boosted, None
        if nice is not None:
            unboost(nice, flight.tid)

    def _obtain(self, index: int, background: bool, stages: Stages | None,
                flight: _Inflight | None = None) -> bytes:
        """The chunk's verified bytes; ZERO_CHUNK for a zero chunk (not read). A background
        read goes through the gate (`flight`: lets it through once an on-demand read waits
        for it)."""
        length = chunk_length(self.source, index)
        if self.source.is_zero(index):
            return ZERO_CHUNK
        t = time.monotonic()
        cpu = time.thread_time()
        data = self._read_with_retry(index, background, flight)
        if stages is not None:
            stages.read_cpu = time.thread_time() - cpu
            stages.read = time.monotonic() - t
        if len(data) != length:
            raise CorruptChunk(f"chunk {index} has {len(data)} bytes, expected {length}",
                               index=index, hint="verify the repository")
        return data

    def _store(self, index: int, data: bytes, background: bool,
               write: Callable[[int, bytes], None], stages: Stages | None) -> None:
        """Write the chunk's bytes to DEST, then mark it restored (in memory)."""
        length = chunk_length(self.source, index)
        offset = index * self.source.chunk_size
        t = time.monotonic()
        if self.source.is_zero(index):
            self._zero_dest(offset, length)
        else:
            write(offset, data)
            if self._fd >= 0:
                start_writeback(self._fd, offset, length)
        if stages is not None:
            stages.write = time.monotonic() - t
        with self._lock:
            self.restored.set(index)
            self._restored_count += 1
            self.fetched_bytes += length
            if background:
                self.background_fetches += 1
            self._changed.notify_all()

    def _land(self, index: int, flight: _Inflight) -> None:
        """The fetch of chunk `index` is over (restored, or failed: flight.error)."""
        with self._lock:
            del self._inflight[index]
            flight.ready.set()
            flight.done.set()

    # ------------------------------------------------------------------ the DEST writer

    def _hand_off(self, index: int, data: bytes, flight: _Inflight) -> bool:
        """Queue an on-demand chunk's DEST write for the writer thread; False when the queue
        is full or closed (the caller writes it itself)."""
        return self._writer.submit(index, data, flight)

    def _write_failed(self, index: int, flight: _Inflight, err: BaseException) -> None:
        flight.error = err
        log.error("writing on-demand chunk %d to DEST failed: %s", index, err)
        with self._lock:
            self.errors.append(f"writing chunk {index} to DEST failed: {err}")

    def wait_writes(self, timeout: float | None = None) -> bool:
        """Wait until every on-demand chunk handed to the writer is on DEST (or failed);
        False on timeout."""
        return self._writer.wait(timeout)

    def _stop_writer(self, drain: bool) -> None:
        """Stop the writer thread: after the queued writes (drain) or after the one in
        progress, the others dropped (their chunks stay unrestored: fetched again later)."""
        for index, flight in self._writer.stop(drain):
            flight.error = EngineError(f"chunk {index} was not written: DEST was closed")
            self._land(index, flight)

    def _read_with_retry(self, index: int, background: bool = False,
                         flight: _Inflight | None = None) -> bytes:
        tid = threading.get_ident()
        first_fault: float | None = None
        delay = 0.05
        try:
            while True:
                try:
                    if background:
                        with self.gate.background(lambda: flight is not None and flight.urgent):
                            data = self.source.read_chunk(index)
                    else:
                        data = self.source.read_chunk(index)
                except RepositoryUnavailable as err:
                    now = time.monotonic()
                    fail_now = not background and self.on_lost == "error"
                    if first_fault is None:
                        first_fault = now
                        with self._lock:
                            self._waiting[tid] = time.time()
                            lost = self.lost_since
                        if fail_now and lost is not None:
                            raise self._lost_error(index, err, lost) from err
                        log.warning("repository unavailable reading chunk %d: %s; retrying "
                                    "for up to %gs", index, err, self.deadline)
                    waited = now - first_fault
                    if waited >= self.deadline:
                        with self._lock:
                            if self.lost_since is None:
                                self.lost_since = time.time() - waited
                                self.errors.append(
                                    f"repository unavailable for {waited:.0f}s (deadline "
                                    f"{self.deadline:g}s): {err}; "
                                    + ("waiting for it" if self.on_lost == "block" else
                                       "reads fail until it returns"))
                                log.error("%s", self.errors[-1])
                            lost = self.lost_since
                        if fail_now:
                            raise self._lost_error(index, err, lost) from err
                    with self._lock:
                        self.retries += 1
                    pause = delay if waited >= self.deadline else \
                        min(delay, self.deadline - waited + 0.001)
                    time.sleep(pause)
                    delay = min(delay * 2, self.backoff_max)
                except CorruptChunk as err:
                    with self._lock:
                        self.errors.append(str(err))
                    raise
                else:
                    if self.lost_since is not None:
                        with self._lock:
                            if self.lost_since is not None:
                                log.warning("the repository is back after %.0fs",
                                            time.time() - self.lost_since)
                                self.lost_since = None
                    return data
        finally:
            if first_fault is not None:
                with self._lock:
                    self._waiting.pop(tid, None)

    def _lost_error(self, index: int, err: BaseException, since: float) -> RepositoryUnavailable:
        return RepositoryUnavailable(
            f"repository unavailable for {time.time() - since:.0f}s (deadline "
            f"{self.deadline:g}s) fetching chunk {index}: {err}",
            hint="bring the repository back: reads work again as soon as it is")

    # ------------------------------------------------------------------ the mark

    @property
    def marked(self) -> bool:
        """True while DEST's head is kept aside (zeros on DEST)."""
        return self._head is not None

    def _mark(self) -> None:
        assert self.mark_path is not None
        n = min(MARK_SIZE, self.source.size)
        if self.mark_path.exists():
            head = self.mark_path.read_bytes()
            if len(head) != n:
                raise EngineError(f"{self.mark_path} holds {len(head)} bytes, not {n}",
                                  hint="the state dir belongs to another volume")
        else:
            head = os.pread(self._fd, n, 0)
            atomic_write(self.mark_path, head)  # durable before DEST's head is zeroed
        self._head = bytearray(head)
        self._pwrite(0, bytes(n))
        self.sync_dest()

    def unmark(self) -> None:
        """Put DEST's head back (every chunk must be restored): DEST synced, then the saved
        copy removed. No-op when not marked."""
        if self.mark_path is None:
            return
        with self._lock:
            head = self._head
            if head is None and self.mark_path.exists():
                head = bytearray(self.mark_path.read_bytes())
            if head is None:
                return
            self._pwrite(0, bytes(head))
            self.sync_dest()
            self._head = None
        self.mark_path.unlink(missing_ok=True)
        fsync_dir(self.mark_path.parent)
        log.info("DEST %s is complete: its first %d bytes are back", self.dest_path, len(head))

    def _split_head(self, offset: int, data: bytes | memoryview) -> tuple[int, memoryview]:
        """Write the part of data that falls in the marked head into the saved copy (durably);
        returns what remains for DEST. Caller checked self._head."""
        view = memoryview(data)
        with self._lock:
            head = self._head
            if head is None or offset >= len(head):
                return offset, view
            n = min(len(view), len(head) - offset)
            head[offset:offset + n] = view[:n]
            assert self.mark_path is not None
            atomic_write(self.mark_path, bytes(head))
        return offset + n, view[n:]

    # ------------------------------------------------------------------ DEST I/O

    def read_dest(self, offset: int, length: int) -> bytes:
        """pread from DEST (the caller made sure the chunks are restored)."""
        head = self._head
        if head is not None and offset < len(head):
            with self._lock:
                head = self._head
                if head is not None and offset < len(head):
                    n = min(length, len(head) - offset)
                    first = bytes(head[offset:offset + n])
                    return first + (self.read_dest(offset + n, length - n) if length > n
                                    else b"")
        out = os.pread(self._fd, length, offset)
        while len(out) < length:  # pread may return short on block devices
            more = os.pread(self._fd, length - len(out), offset + len(out))
            if not more:
                raise DeviceError(f"short read from DEST {self.dest_path} at {offset}")
            out += more
        return out

    def write_dest(self, offset: int, data: bytes | memoryview) -> None:
        """pwrite all of data to DEST at offset (into the saved head while DEST is marked)."""
        if self._head is not None and offset < MARK_SIZE:
            offset, data = self._split_head(offset, data)
        self._pwrite(offset, data)

    def _pwrite(self, offset: int, data: bytes | memoryview) -> None:
        view = memoryview(data)
        try:
            while view:
                n = os.pwrite(self._fd, view, offset)
                view = view[n:]
                offset += n
        except OSError as err:
            raise DeviceError(f"writing DEST {self.dest_path} at {offset} failed: "
                              f"{err.strerror}", hint="check the destination device") from err

    def _zero_dest(self, offset: int, length: int) -> None:
        """Make [offset, offset+length) of DEST read as zeros, cheaply when possible."""
        if length <= 0:
            return
        if self._head is not None and offset < MARK_SIZE:
            n = min(length, MARK_SIZE - offset)
            self.write_dest(offset, bytes(n))
            offset, length = offset + n, length - n
            if length <= 0:
                return
        if self._is_blockdev:
            if offset % 512 == 0 and length % 512 == 0:
                try:
                    fcntl.ioctl(self._fd, _BLKZEROOUT, struct.pack("QQ", offset, length))
                    return
                except OSError as err:
                    log.debug("BLKZEROOUT failed (%s); writing zeros", err)
        elif reads_as_zeros(self._fd, offset, length) or zero_range(self._fd, offset, length):
            return
        zeros = bytes(min(length, 1 << 20))
        pos = offset
        while pos < offset + length:
            n = min(len(zeros), offset + length - pos)
            self.write_dest(pos, zeros[:n] if n < len(zeros) else zeros)
            pos += n

    def sync_dest(self) -> None:
        """fsync DEST (a regular file's hole punches are metadata: fsync, not fdatasync)."""
        if self._is_blockdev:
            os.fdatasync(self._fd)
        else:
            os.fsync(self._fd)

    def sync(self) -> None:
        """Make DEST durable, then persist the restored map naming only the chunks written
        before that sync. Data before metadata; safe to call from any thread."""
        with self._sync_lock:  # one at a time: maps saved in order, one temp file
            with self._lock:
                snapshot = self.restored.copy()
            self.sync_dest()
            self._mapfile.save(snapshot)
            self.synced_at = time.time()
            self.synced_chunks = snapshot.count()

    # ------------------------------------------------------------------ status

    def stats(self) -> dict:
        """Counters for status (JSON-ready)."""
        with self._lock:
            lats = sorted(self._latencies)
            waiting = min(self._waiting.values()) if self._waiting else None
            n = self.demand_fetches
            total = self.source.size
            restored_bytes = self._restored_bytes()
            return {
                "total_bytes": total,
                "total_chunks": self.source.chunk_count,
                "restored_chunks": self._restored_count,
                "restored_bytes": restored_bytes,
                "percent": 100.0 * restored_bytes / total if total else 100.0,
                "fetched_bytes": self.fetched_bytes,
                "demand_fetches": n,
                "background_fetches": self.background_fetches,
                "demand_latency_mean": self._latency_sum / n if n else None,
                "demand_latency_p50": percentile(lats, 0.50),
                "demand_latency_p99": percentile(lats, 0.99),
                "demand_latency_max": self._latency_max if n else None,
                "retries": self.retries,
                "waiting_for_repository_since": waiting,
                "repository_lost_since": self.lost_since,
                "dest_marked": self._head is not None,
                "on_repository_lost": self.on_lost,
                "failed": str(self.failure) if self.failure is not None else None,
                "errors": list(self.errors),
                "synced_at": self.synced_at,
                "synced_chunks": self.synced_chunks,
            }

    def demand_breakdown(self) -> dict:
        """Where the recent on-demand fetches spent their time, stage by stage (JSON-ready;
        see timing.breakdown)."""
        with self._lock:
            samples = list(self._stages)
        return breakdown(samples)

    def _restored_bytes(self) -> int:
        cs = self.source.chunk_size
        last = self.source.chunk_count - 1
        n = self._restored_count * cs
        if last >= 0 and self.restored.test(last):
            n -= cs - chunk_length(self.source, last)
        return n

    def abandon(self) -> None:
        """Close DEST without syncing (tests: what a SIGKILL leaves)."""
        self._stop_writer(drain=False)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._mapfile.close()

    def close(self) -> None:
        """Sync (DEST, then the map) and close DEST. Idempotent."""
        if self._fd < 0:
            return
        try:
            self._stop_writer(drain=True)
            self.sync()
        finally:
            os.close(self._fd)
            self._fd = -1
            self._mapfile.close()


def _part(data: bytes, start: int, end: int) -> bytes:
    """Bytes [start, end) of a chunk's fetched bytes (ZERO_CHUNK: zeros)."""
    return bytes(end - start) if not data else data[start:end]
