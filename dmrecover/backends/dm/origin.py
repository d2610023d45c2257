"""The dm backend's origin: restored ranges read from DEST in the kernel, the rest from FUSE.

    dmrecover-<session>-origin (read-only dm device, the snapshot's origin):
        each maximal run of durably restored chunks -> linear <DEST device> <same offset>
        every other range                          -> linear <origin loop (FUSE)> <same offset>

Both paths return the same bytes (DEST holds backup data only until the cutover), so the
table holds no state: it only decides which path a read takes. It names a chunk DEST only
once the persisted restored map does (the map is saved after DEST's fsync: see
engine/fetcher.py), never from in-flight state, because a dm linear read of DEST does not see
DEST's dirty page cache. After a crash or a resume it is rebuilt from that map; correctness
never depends on it, only speed.

While DEST is marked (its first MARK_SIZE bytes are zeros on DEST until the restore is
complete, see the fetcher's module doc) those bytes always stay on the FUSE origin.

The `OriginReloader` thread follows the persisted map: when it changed (each sync of the
restored map) and at most once per `interval`, it builds the new table and swaps it in with
`ioctl.swap` (in-process: loaded inactive and read-only, then one resume, in which the kernel
suspends the device, swaps the tables and resumes it). Only that resume stops I/O: the pause
it measures. A failed load keeps the old table (nothing suspended); a failed swap is resumed
on the old table. dm-snapshot invalidates a snapshot for
good on one origin read error, so no reload may ever leave the origin failing reads.

Segment cap: at most `max_segments` table lines; past it the shortest DEST runs stay on the
FUSE origin (correct, only slower). Once every chunk is restored (and DEST's head is back),
the table is one linear on DEST.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from dmrecover.backends.dm import dmsetup as dm
from dmrecover.backends.dm import ioctl
from dmrecover.engine.bitmap import Bitmap, SlotFile
from dmrecover.errors import BitmapError, DmrecoverError, StackError

log = logging.getLogger(__name__)

#: Table lines at most (a dm table of a few thousand linear targets loads in milliseconds).
MAX_SEGMENTS = 2048
#: Seconds between two reloads at most once per; the persisted map changes at each sync.
RELOAD_INTERVAL = 1.0
#: Seconds between two looks at the fetcher's sync time (cheap: one attribute).
POLL = 0.2
THREAD_NAME = "dmrecover-origin-reload"


@dataclass(frozen=True)
class Segment:
    """One table line: [start, start+length) in 512-byte sectors, on DEST or on FUSE."""

    start: int
    length: int
    on_dest: bool


def dest_extents(restored: Bitmap, chunk_size: int, size: int, *, keep_off: int = 0
                 ) -> list[tuple[int, int]]:
    """Byte ranges (start, end) of the maximal runs of restored chunks, clipped to the
    volume's size, with [0, keep_off) left out (DEST's marked head)."""
    out = []
    for first, count in restored.iter_extents():
        start = max(first * chunk_size, keep_off)
        end = min((first + count) * chunk_size, size)
        if start < end:
            out.append((start, end))
    return out


def build_segments(restored: Bitmap, chunk_size: int, size: int, *, keep_off: int = 0,
                   max_segments: int = MAX_SEGMENTS) -> list[Segment]:
    """The origin's segments: restored runs on DEST, the gaps on FUSE, covering [0, size).

    size and chunk_size are bytes, multiples of 512 (the last chunk may be short: it ends at
    size). At most max_segments (>= 1) segments: the shortest DEST runs stay on FUSE.
    """
    if size % dm.SECTOR or chunk_size % dm.SECTOR or chunk_size <= 0:
        raise StackError(f"the volume size {size} and chunk size {chunk_size} are not both "
                         f"multiples of {dm.SECTOR} bytes: no device-mapper origin for them")
    if max_segments < 1:
        raise ValueError("max_segments must be >= 1")
    runs = dest_extents(restored, chunk_size, size, keep_off=keep_off)
    # n DEST runs need at most 2n+1 segments; keep the longest (ties: the first ones).
    keep = (max_segments - 1) // 2
    if len(runs) > keep and not (len(runs) == 1 and runs[0] == (0, size)):
        runs = sorted(sorted(runs, key=lambda r: (r[0] - r[1], r[0]))[:keep])
    segs: list[Segment] = []
    pos = 0
    for start, end in runs:
        if start > pos:
            segs.append(Segment(pos // dm.SECTOR, (start - pos) // dm.SECTOR, False))
        segs.append(Segment(start // dm.SECTOR, (end - start) // dm.SECTOR, True))
        pos = end
    if pos < size:
        segs.append(Segment(pos // dm.SECTOR, (size - pos) // dm.SECTOR, False))
    return segs


def table_lines(segments: list[Segment], dest: str, fuse: str) -> list[str]:
    """The dm table of the segments (offsets on both devices equal the volume's)."""
    return [f"{s.start} {s.length} linear {dest if s.on_dest else fuse} {s.start}"
            for s in segments]


def persisted_map(map_path: str, nbits: int) -> Bitmap:
    """The restored map as a crash would leave it: read from its file (the fetcher saves it
    after DEST's fsync). A slot torn by a save in progress reads as the previous one."""
    return SlotFile(map_path, nbits).load()


@dataclass
class ReloadStats:
    """What the reloads cost: count and the I/O pause (suspend to resume) of each."""

    reloads: int = 0
    failed: int = 0
    deferred: int = 0
    pause_max: float = 0.0
    pause_sum: float = 0.0
    pause_last: float = 0.0
    segments: int = 0
    dest_segments: int = 0
    dest_bytes: int = 0

    def as_dict(self) -> dict:
        """JSON-ready (the session record's devices, status)."""
        return {"reloads": self.reloads, "reload_failures": self.failed,
                "reloads_deferred": self.deferred,
                "pause_max": round(self.pause_max, 6), "pause_last": round(self.pause_last, 6),
                "pause_mean": round(self.pause_sum / self.reloads, 6) if self.reloads else None,
                "segments": self.segments, "dest_segments": self.dest_segments,
                "dest_bytes": self.dest_bytes}


class OriginReloader:
    """The origin device's table, following the persisted restored map (module doc).

    name: the origin dm device (exists, created by the stack from `table()`).
    map_path, nbits, chunk_size, size: the fetcher's persisted map and the volume's geometry.
    dest, fuse: the devices DEST and the FUSE origin loop.
    marked: whether DEST's head is still kept aside (its first `head` bytes stay on FUSE).
    synced: a cheap token that changes whenever the persisted map may have changed.
    busy: True while a reload's suspend would wait long (reads waiting for the repository:
        suspend waits for the origin's in-flight I/O, and would hold every other read up).
    """

    def __init__(self, name: str, *, map_path: str, nbits: int, chunk_size: int, size: int,
                 dest: str, fuse: str, marked: Callable[[], bool], head: int,
                 synced: Callable[[], object], busy: Callable[[], bool] = lambda: False,
                 interval: float = RELOAD_INTERVAL, max_segments: int = MAX_SEGMENTS) -> None:
        self.name = name
        self.map_path = map_path
        self.nbits = nbits
        self.chunk_size = chunk_size
        self.size = size
        self.dest = dest
        self.fuse = fuse
        self.marked = marked
        self.head = head
        self.synced = synced
        self.busy = busy
        self.interval = interval
        self.max_segments = max_segments
        self.stats = ReloadStats()
        self.segments: list[Segment] = []
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # one reload at a time (thread, stop, tests)
        self._pending = False  # a reload was put off (busy): try again without a new sync

    # ------------------------------------------------------------------ tables

    def wanted(self) -> list[Segment]:
        """The segments the persisted map asks for now."""
        try:
            bm = persisted_map(self.map_path, self.nbits)
        except BitmapError as err:  # keep what is loaded: FUSE serves every range correctly
            log.warning("origin table: the restored map is unreadable (%s); kept", err)
            return self.segments
        keep_off = self.head if self.marked() else 0
        return build_segments(bm, self.chunk_size, self.size, keep_off=keep_off,
                              max_segments=self.max_segments)

    def table(self) -> list[str]:
        """The table to create the device with (recorded as the current one)."""
        self.segments = self.wanted()
        self._account(self.segments)
        return table_lines(self.segments, self.dest, self.fuse)

    def _account(self, segs: list[Segment]) -> None:
        self.stats.segments = len(segs)
        dest = [s for s in segs if s.on_dest]
        self.stats.dest_segments = len(dest)
        self.stats.dest_bytes = sum(s.length for s in dest) * dm.SECTOR

    @property
    def all_dest(self) -> bool:
        """True when the table is one linear on DEST."""
        return len(self.segments) == 1 and self.segments[0].on_dest

    def reload(self) -> bool:
        """Load the wanted table and swap it in when it differs; True when swapped.

        Load first (inactive, I/O goes on); a failed load keeps the old table. Then one
        resume, which suspends, swaps and resumes in the kernel: the pause. A failed swap
        is resumed again (retried): a suspended origin would hold every read of the
        pseudo-volume.
        """
        with self._lock:
            segs = self.wanted()
            self._pending = False
            if segs == self.segments:
                return False
            if self.busy():
                self.stats.deferred += 1
                self._pending = True
                return False
            # Loaded first (I/O goes on; a failed load keeps the old table), then one resume
            # swaps it in: the kernel suspends the device (waiting for its in-flight I/O),
            # swaps the tables and resumes, in one ioctl (dm-ioctl.c do_resume). In-process:
            # a dmsetup start cost 100+ ms under the pause in the TCG guest.
            try:
                done = ioctl.swap(self.name, table_lines(segs, self.dest, self.fuse),
                                  suspend_first=False, read_only=True, settle=False)
            except DmrecoverError as err:
                # ioctl.swap resumed the device on the old table (or says it could not).
                self.stats.failed += 1
                self._pending = True  # tried again after the interval
                log.warning("origin table not swapped (the old one stays): %s", err)
                st = ioctl.dev_status(self.name)
                if st is not None and st.suspended:
                    raise StackError(f"origin {self.name} stays suspended: every read of the "
                                     "pseudo-volume waits",
                                     hint=f"run `dmsetup resume {self.name}`") from err
                return False
            pause = done.pause
            self.segments = segs
            self._account(segs)
            s = self.stats
            s.reloads += 1
            s.pause_last = pause
            s.pause_sum += pause
            s.pause_max = max(s.pause_max, pause)
            log.info("origin table: %d segments, %d on DEST (%d MiB); I/O paused %.1f ms",
                     s.segments, s.dest_segments, s.dest_bytes >> 20, pause * 1000)
            return True

    # ------------------------------------------------------------------ the thread

    def start(self) -> None:
        """Start following the persisted map (no-op when running)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)
        self._thread.start()

    def poke(self) -> None:
        """Look again now (e.g. after a sync), still at most one reload per interval."""
        self._wake.set()

    def stop(self, timeout: float = 60.0) -> None:
        """Stop the thread; a reload in progress finishes first (never left suspended)."""
        self._stop.set()
        self._wake.set()
        t = self._thread
        if t is not None:
            t.join(timeout)
            if t.is_alive():
                log.error("origin reload thread did not stop within %gs", timeout)
        self._thread = None

    def _run(self) -> None:
        seen = self.synced()
        marked = self.marked()
        last = 0.0
        while not self._stop.is_set() and not self.all_dest:
            self._wake.wait(POLL)
            self._wake.clear()
            if self._stop.is_set():
                break
            token, mark = self.synced(), self.marked()
            if token == seen and mark == marked and not self._pending:
                continue
            wait = last + self.interval - time.monotonic()
            if wait > 0 and self._stop.wait(wait):
                break
            seen, marked = self.synced(), self.marked()
            try:
                self.reload()
            except Exception:  # noqa: BLE001 - a failed reload must not end the following
                log.exception("origin table reload failed")
            last = time.monotonic()
        if self.all_dest:
            log.info("origin %s is DEST alone: no more reloads", self.name)
