"""First data structure: the overlay that takes the application's writes.

Files in the state dir:
- overlay.img: a sparse file the size of the volume (rounded up to 4 KiB); block b of the
  volume lives at offset b * 4096.
- overlay.map: snapshot of the block map (a Bitmap, 1 bit per 4 KiB block), saved atomically.
- overlay.log: append-only journal since that snapshot. A write record (first block, block
  count, crc32 of the data) is appended after the data is pwritten and before the write is
  acknowledged (a plain write: it survives a kill of the process through the page cache). A
  barrier record names the log offset up to which the data was fdatasynced before it was
written, and is itself fdatasynced (flush()).

Recovery (opening an existing overlay): load the snapshot, then replay the log. Records a
barrier covers are trusted (their data was durable before the barrier was written); for the
others each block is kept only if its CRC matches the data now in overlay.img: an unflushed
write whose data did not reach the disk is dropped, which is what a disk may do with unflushed
data. A torn record at the log's end fails its own CRC and ends the replay.

Checkpoint: fdatasync the data, save the map snapshot, reset the log (all under the lock, so
no record is lost between the snapshot and the reset). Done when the log grows large and on
close.

A full filesystem: a write whose data or journal record does not fit fails with ENOSPC and
leaves nothing behind (a partly appended record is cut off again: a torn record in front of
later ones would end the replay there and lose them). A checkpoint that does not fit (the map
snapshot is a new file) is skipped: the journal still holds every acknowledged write, and the
next checkpoint, once there is room, takes it. Freeing space is enough to go on.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path

from dmrecover.engine.bitmap import Bitmap
from dmrecover.errors import BitmapError, OverlayError
from dmrecover.system.files import write_all

log = logging.getLogger(__name__)

BLOCK_SIZE = 4096
IMG, MAP, LOG = "overlay.img", "overlay.map", "overlay.log"

_HDR = struct.Struct("<4sQI")  # kind, first block, block count
WRITE, BARRIER = b"OVW2", b"OVB2"
CHECKPOINT_LOG_BYTES = 8 << 20  # checkpoint at a flush once the log is this large
_FORCE_CHECKPOINT_FACTOR = 4     # ... and in the write path at 4x that (a never-flushing app)


def record_size(count: int) -> int:
    """Bytes of a log record covering `count` blocks (0 for a barrier)."""
    return _HDR.size + 4 * count + 4


def _record(kind: bytes, first: int, data: memoryview | bytes = b"") -> bytes:
    """A log record: header, crc32 of each 4 KiB block of data, crc32 of all that.

    Per-block CRCs (not one per write) because a later write may overwrite part of an earlier
    one: recovery then still recognises the blocks of the earlier write that are intact.
    """
    view = memoryview(data)
    count = len(view) // BLOCK_SIZE
    crcs = struct.pack(f"<{count}I", *(zlib.crc32(view[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE])
                                       for i in range(count)))
    body = _HDR.pack(kind, first, count) + crcs
    return body + struct.pack("<I", zlib.crc32(body))


class Overlay:
    """Sparse overlay file + journalled 4 KiB block map (thread-safe).

    Opening a state dir that holds an overlay recovers it (see the module doc); otherwise a
    new, empty one is created. `size` must match the existing overlay's.
    """

    def __init__(self, state_dir: str | os.PathLike[str], size: int, *,
                 checkpoint_log_bytes: int = CHECKPOINT_LOG_BYTES) -> None:
        self.dir = Path(state_dir)
        self.size = size
        self.nblocks = (size + BLOCK_SIZE - 1) // BLOCK_SIZE
        self.checkpoint_log_bytes = checkpoint_log_bytes
        self._lock = threading.Lock()
        self._log_gen = 0  # bumped by every checkpoint (log reset)
        self._durable = 0  # log offset up to which every record is covered by a barrier
        self._flush_lock = threading.Lock()  # one flush syncs at a time (group commit)
        self.flush_calls = 0  # flush() calls, and those that synced (the rest were grouped)
        self.flush_syncs = 0
        self.img_path, self.map_path, self.log_path = (self.dir / IMG, self.dir / MAP,
                                                       self.dir / LOG)
        existed = self.img_path.exists()
        self._img = os.open(self.img_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._log = -1
        try:
            img_size = os.fstat(self._img).st_size
            if existed and img_size != self.nblocks * BLOCK_SIZE:
                raise OverlayError(f"overlay {self.img_path} is {img_size} bytes, expected "
                                   f"{self.nblocks * BLOCK_SIZE}",
                                   hint="the state dir belongs to another volume")
            if not existed:
                os.ftruncate(self._img, self.nblocks * BLOCK_SIZE)
            self.map = self._load_map()
            self.recovered_records, self.dropped_blocks, valid_end = self._replay()
            self.present_count = self.map.count()
            self._log = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND
                                | os.O_CLOEXEC, 0o600)
            self._log_bytes = os.fstat(self._log).st_size
            if self._log_bytes or not self.map_path.exists():
                # Start from a clean snapshot: the replayed state becomes the new baseline
                # (and a torn tail never sits in front of new records).
                try:
                    self._checkpoint_locked()
                except OSError as err:
                    if err.errno != errno.ENOSPC or not self.map_path.exists():
                        raise
                    # No room for a snapshot: keep the journal, without its torn tail.
                    log.warning("overlay: no room for a checkpoint (%s); the journal keeps "
                                "the writes", err.strerror)
                    os.ftruncate(self._log, valid_end)
                    os.fsync(self._log)
                    self._log_bytes = valid_end
        except BaseException:
            self._close_fds()
            raise

    # ------------------------------------------------------------------ recovery

    def _load_map(self) -> Bitmap:
        if not self.map_path.exists():
            return Bitmap(self.nblocks)
        try:
            bm = Bitmap.load(self.map_path)
        except BitmapError as err:
            raise OverlayError(f"overlay map unreadable: {err}",
                               hint="the overlay cannot be trusted; keep overlay.img aside "
                               "and inspect it") from err
        if bm.nbits != self.nblocks:
            raise OverlayError(f"overlay map {self.map_path} has {bm.nbits} blocks, expected "
                               f"{self.nblocks}", hint="the state dir belongs to another volume")
        return bm

    def _replay(self) -> tuple[int, int, int]:
        """Apply the log to self.map; returns (records replayed, blocks dropped, the log
        offset where the valid records end)."""
        try:
            raw = self.log_path.read_bytes()
        except FileNotFoundError:
            return 0, 0, 0
        # kind, first (a barrier: log offset it covers), count, offset of crcs, record end
        records: list[tuple[bytes, int, int, int, int]] = []
        pos = 0
        while pos + _HDR.size <= len(raw):
            kind, first, count = _HDR.unpack_from(raw, pos)
            end = pos + record_size(count)
            if kind not in (WRITE, BARRIER) or count > self.nblocks or end > len(raw) or \
                    zlib.crc32(raw[pos:end - 4]) != struct.unpack_from("<I", raw, end - 4)[0]:
                log.warning("overlay log: torn record at byte %d, replay ends there", pos)
                break
            records.append((kind, first, count, pos + _HDR.size, end))
            pos = end
        covered = max((r[1] for r in records if r[0] == BARRIER), default=0)
        replayed = 0
        unmatched: set[int] = set()
        for kind, first, count, crc_pos, end in records:
            if kind == BARRIER or count == 0 or first + count > self.nblocks:
                continue
            replayed += 1
            if end <= covered:
                self.map.set_range(first, count)
                continue
            # Not covered by a barrier: keep each block whose data is the data written.
            data = os.pread(self._img, count * BLOCK_SIZE, first * BLOCK_SIZE)
            crcs = struct.unpack_from(f"<{count}I", raw, crc_pos)
            for k in range(count):
                if zlib.crc32(data[k * BLOCK_SIZE:(k + 1) * BLOCK_SIZE]) == crcs[k]:
                    self.map.set(first + k)
                else:
                    unmatched.add(first + k)
        dropped = sum(1 for b in unmatched if not self.map.test(b))
        if dropped:
            log.warning("overlay recovery: dropped %d block(s) of unflushed writes whose data "
                        "did not reach the disk", dropped)
        return replayed, dropped, pos

    # ------------------------------------------------------------------ I/O

    def present(self, block: int) -> bool:
        return self.map.test(block)

    def runs(self, first: int, count: int) -> list[tuple[int, int, bool]]:
        """[first, first+count) split into (start, length, present) runs."""
        return self.map.runs(first, count)

    def read(self, offset: int, length: int) -> bytes:
        """Raw bytes of overlay.img (the caller knows the blocks are present)."""
        out = os.pread(self._img, length, offset)
        if len(out) < length:  # only past the end of the rounded-up file: never for callers
            out += bytes(length - len(out))
        return out

    def write_blocks(self, first: int, data: bytes | bytearray | memoryview) -> None:
        """Write whole blocks starting at block `first` and journal them. A short final block
        (only the volume's last block, when the size is not a multiple of 4 KiB) is padded
        with zeros. Returns when the write is acknowledged (journalled)."""
        n = len(data)
        count = (n + BLOCK_SIZE - 1) // BLOCK_SIZE
        if count == 0:
            return
        if first < 0 or first + count > self.nblocks:
            raise ValueError(f"blocks {first}+{count} beyond the overlay ({self.nblocks})")
        if n % BLOCK_SIZE:
            if first + count != self.nblocks:
                raise ValueError("only the last block of the volume may be short")
            data = bytes(data) + bytes(count * BLOCK_SIZE - n)
        view = memoryview(data)
        off = first * BLOCK_SIZE
        pos = 0
        while pos < len(view):
            pos += os.pwrite(self._img, view[pos:], off + pos)
        rec = _record(WRITE, first, view)
        with self._lock:
            self._append(rec)
            already = self.map.count_range(first, count)
            self.map.set_range(first, count)
            self.present_count += count - already
            if self._log_bytes >= self.checkpoint_log_bytes * _FORCE_CHECKPOINT_FACTOR:
                self._try_checkpoint()

    def _append(self, rec: bytes) -> None:
        """Append a record to the journal (caller holds the lock). When it does not all fit
        (ENOSPC, EIO), what was appended is cut off again and the error raised: a torn record
        would end the replay in front of later ones."""
        try:
            write_all(self._log, rec)
        except OSError:
            try:
                os.ftruncate(self._log, self._log_bytes)
            except OSError as err:  # the record is torn for good: the replay ends there
                log.error("overlay log: cannot cut off a torn record: %s", err)
            raise
        self._log_bytes += len(rec)

    def _try_checkpoint(self) -> None:
        """A checkpoint that may not fit (caller holds the lock): skipped on ENOSPC."""
        try:
            self._checkpoint_locked()
        except OSError as err:
            if err.errno != errno.ENOSPC:
                raise
            log.warning("overlay: no room for a checkpoint; the journal keeps the writes")

    def flush(self) -> None:
        """Make every write acknowledged before this call durable: fdatasync the data, then
        append a barrier record and fdatasync the log. Checkpoints when the log is large.

        Group commit: concurrent flushes share one round of syncs. A flush waits for the one
        in progress, then returns at once when that one's barrier (or a checkpoint) covered
        every write acknowledged before this flush began; otherwise it syncs, covering the
        writes of every flush that waited meanwhile. A flush with nothing new since the last
        barrier syncs nothing.
        """
        self.flush_calls += 1
        with self._lock:
            need, need_gen = self._mark()
        with self._flush_lock:
            with self._lock:
                if self._log_gen != need_gen or self._durable >= need:
                    return  # a checkpoint or a barrier since covered these writes
                mark, gen = self._mark()
            self.flush_syncs += 1
            os.fdatasync(self._img)
            with self._lock:
                end = self._barrier(mark, gen)
            if end is None:
                return  # a checkpoint since the mark made those writes durable already
            # The log's sync runs without the lock: writes go on being journalled meanwhile
            # (measured: holding the lock here put the log's sync time into the p99 of
            # concurrent writes). Records after the barrier are not covered by it anyway.
            os.fdatasync(self._log)
            with self._lock:
                if self._log_gen == gen:
                    self._durable = end
                if self._log_bytes >= self.checkpoint_log_bytes:
                    self._try_checkpoint()

    def _mark(self) -> tuple[int, int]:
        # caller holds the lock. Every record before this log offset had its data pwritten.
        return self._log_bytes, self._log_gen

    def _barrier(self, mark: int, gen: int) -> int | None:
        """Append a barrier covering the records before `mark` (caller holds the lock and
        fdatasynced the data after taking the mark; the caller then fdatasyncs the log). The
        barrier names the offset it covers, not "everything before me": a write journalled
        between the fdatasync and the barrier is not durable and must still be CRC-checked at
        recovery. Returns the log offset the barrier makes durable once the log is synced
        (None: a checkpoint since the mark made those writes durable already)."""
        if gen != self._log_gen:
            return None
        quiet = self._log_bytes == mark  # nothing journalled since the mark
        self._append(_record(BARRIER, mark))
        # Records journalled between the mark and the barrier are not covered (their data
        # may not be synced). Without any, the barrier's own record counts as covered: a
        # flush that finds nothing new after it need not sync again.
        return self._log_bytes if quiet else mark

    def checkpoint(self) -> None:
        """Save the map snapshot (after an fdatasync of the data) and reset the log."""
        with self._lock:
            self._checkpoint_locked()

    def _checkpoint_locked(self) -> None:
        # Every bit set in the map had its data pwritten before (write_blocks sets bits
        # after the pwrite): fdatasync here makes it all durable before the snapshot names it.
        os.fdatasync(self._img)
        self.map.save(self.map_path)
        if self._log >= 0:
            os.ftruncate(self._log, 0)
            os.fsync(self._log)
        else:
            fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                         0o600)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self._log_bytes = 0
        self._log_gen += 1
        self._durable = 0

    # ------------------------------------------------------------------ cutover, status

    def extents(self) -> Iterator[tuple[int, int]]:
        """(first block, count) of every present extent, ascending (for the cutover copy)."""
        return self.map.iter_extents()

    @property
    def present_bytes(self) -> int:
        return self.present_count * BLOCK_SIZE

    def close(self) -> None:
        """Checkpoint and close. Idempotent."""
        if self._img < 0:
            return
        try:
            with self._lock:
                try:
                    self._checkpoint_locked()
                except OSError as err:
                    if err.errno != errno.ENOSPC:
                        raise
                    # No room for the snapshot: the journal keeps every write (made
                    # durable here); the next open replays it.
                    log.warning("overlay: no room for a checkpoint at close; the journal "
                                "keeps the writes")
                    os.fdatasync(self._img)
                    os.fsync(self._log)
        finally:
            self._close_fds()

    def abandon(self) -> None:
        """Close without flushing or checkpointing (tests: simulates a killed process)."""
        self._close_fds()

    def _close_fds(self) -> None:
        for name in ("_img", "_log"):
            fd = getattr(self, name, -1)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)

    def remove_files(self) -> None:
        """Delete overlay.img/map/log (after a merge). The overlay must be closed."""
        for p in (self.img_path, self.map_path, self.log_path):
            p.unlink(missing_ok=True)

