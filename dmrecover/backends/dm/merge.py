"""The dm backend's COW and its merge into DEST.

The application's writes sit in a persistent COW file (`STATE/cow.img`, 4 KiB chunks). A
`snapshot-merge <DEST> <cow>` table copies them into DEST in the kernel; the COW's own metadata
records every merged chunk, so a merge cut short by a crash continues where it stopped.

- restart mode: `merge_into_dest()` (application stopped, nothing mounted) makes a
  `snapshot-merge` device, waits for it, removes it, writes the durable "merged" marker and
  drops the COW;
- online mode: DmStack.online_cutover() reloads the mounted device itself and uses
  `wait_merged()`; `finish_online_cutover()` then writes the marker and drops the COW.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from dmrecover.backends.base import UndoStack
from dmrecover.backends.dm import dmsetup as dm
from dmrecover.engine.pseudovolume import MERGED_MARKER
from dmrecover.errors import StackError
from dmrecover.system import command, loops
from dmrecover.system.files import atomic_write
from dmrecover.testhooks import fault_point, merge_pause

if TYPE_CHECKING:  # typing only
    from dmrecover.engine.pseudovolume import PseudoVolume

log = logging.getLogger(__name__)

COW_FILE = "cow.img"
CHUNK_SECTORS = 8  # 4 KiB: a small write never copies more than 4 KiB from the origin
MERGE_TIMEOUT = 24 * 3600.0


def fdatasync_path(path: str) -> None:
    """fdatasync a file by name (DEST as a regular file, before and after the kernel writes it
    through a loop device)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


def flush_block_cache(dev: str) -> None:
    """Write back and drop a block device's page cache (BLKFLSBUF).

    The engine writes DEST through its page cache while dm writes DEST underneath it: after
    a merge the cached pages would be stale for whoever reads DEST through its node next.
    """
    if stat.S_ISBLK(os.stat(dev).st_mode):
        command.run(["blockdev", "--flushbufs", dev], error=StackError,
                    what=f"flushing the cache of {dev}")


def wait_merged(name: str, *, timeout: float = MERGE_TIMEOUT,
                progress: Callable[[dm.SnapshotStatus], None] | None = None) -> None:
    """Wait until a snapshot-merge device has merged everything (allocated == metadata)."""
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        st = dm.snapshot_status(name)
        if st.invalid or st.merge_failed:
            raise StackError(f"the merge of {name} failed (status: {dm.status(name)})",
                             hint="the COW is kept; see the kernel log (dmesg)")
        if progress is not None:
            progress(st)
        if st.merged:
            return
        if time.monotonic() > deadline:
            raise StackError(f"the merge of {name} did not finish within {timeout:g}s")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.5)


def merge_into_dest(volume: PseudoVolume, state_dir: str, dest: str, session: str = "",
                    *, timeout: float = MERGE_TIMEOUT) -> int:
    """Restart-mode merge: DEST += COW, with the application stopped and nothing mounted.

    A `snapshot-merge <DEST> <cow>` device is created, left to merge, then removed; the COW's
    own metadata records each merged chunk, so after a crash this runs again and continues.
    Then the "merged" marker is written (durably) and the COW file removed. Returns the COW's
    allocated bytes before the merge. Idempotent.
    """
    session = session or os.path.basename(os.path.abspath(state_dir))
    cow = os.path.join(state_dir, COW_FILE)
    marker = os.path.join(state_dir, MERGED_MARKER)
    if os.path.exists(marker):
        return 0
    undo = UndoStack()
    merged_bytes = 0
    try:
        if os.path.exists(cow):
            volume.fetcher.sync_dest()
            if stat.S_ISBLK(os.stat(dest).st_mode):
                dest_dev = dest
            else:
                fdatasync_path(dest)
                dest_dev = loops.attach(dest)
                undo.push("dest-loop", lambda: loops.detach(dest_dev))
            flush_block_cache(dest_dev)
            cow_loop = loops.attach(cow)
            undo.push("cow-loop", lambda: loops.detach(cow_loop))
            name = dm.dm_name(session, "merge")
            if dm.info(name) is not None:
                dm.remove(name)
            fault_point("dm-merge")
            dm.create(name, dm.snapshot_merge_table(dest_dev, cow_loop, volume.size,
                                                    CHUNK_SECTORS),
                      dm.dm_uuid(session, "merge"))
            undo.push("dm-merge", lambda: dm.remove(name))
            # Test hook: hold the merge phase open so a test can cut the power during it.
            time.sleep(merge_pause())
            st = dm.snapshot_status(name)
            merged_bytes = max(0, st.allocated - st.metadata) * dm.SECTOR
            wait_merged(name, timeout=timeout)
            undo.unwind()
            if stat.S_ISBLK(os.stat(dest).st_mode):
                flush_block_cache(dest)  # drop the engine's now stale cached pages of DEST
            fdatasync_path(dest)
    except BaseException:
        errors = undo.unwind()
        if errors:
            log.error("undo after a failed merge left problems: %s", "; ".join(errors))
        raise
    mark_merged(state_dir)
    discard_cow(state_dir)
    return merged_bytes


def mark_merged(state_dir: str) -> None:
    """Write the durable "merged" marker: the COW's blocks are in DEST."""
    atomic_write(os.path.join(state_dir, MERGED_MARKER), f"{time.time():.3f}\n".encode())


def discard_cow(state_dir: str) -> None:
    """Remove the COW file (only once merged)."""
    try:
        os.unlink(os.path.join(state_dir, COW_FILE))
    except FileNotFoundError:
        pass
