"""Overlay: journalled block map, recovery after a kill, torn/unflushed records, checkpoints."""

from __future__ import annotations

import os

import pytest

from dmrecover.engine.overlay import BLOCK_SIZE, Overlay, record_size
from dmrecover.errors import OverlayError

B = BLOCK_SIZE
SIZE = 64 * B + 1000  # last block short on purpose


def blk(ch: int, n: int = 1) -> bytes:
    return bytes([ch]) * (n * B)


def test_write_read_and_extents(tmp_path) -> None:
    ov = Overlay(tmp_path, SIZE)
    assert ov.present_count == 0
    ov.write_blocks(3, blk(1, 2))
    ov.write_blocks(10, blk(2))
    ov.write_blocks(4, blk(3, 2))  # overlaps: counted once
    assert ov.present_count == 4
    assert ov.read(3 * B, 3 * B) == blk(1) + blk(3, 2)
    assert list(ov.extents()) == [(3, 3), (10, 1)]
    assert ov.runs(2, 4) == [(2, 1, False), (3, 3, True)]
    # the short last block of the volume
    ov.write_blocks(ov.nblocks - 1, b"x" * 1000)
    assert ov.read((ov.nblocks - 1) * B, 1000) == b"x" * 1000
    with pytest.raises(ValueError):
        ov.write_blocks(2, b"y" * 1000)  # short block not at the end
    with pytest.raises(ValueError):
        ov.write_blocks(ov.nblocks, blk(1))
    ov.close()


def test_reopen_after_kill_keeps_every_acknowledged_write(tmp_path) -> None:
    ov = Overlay(tmp_path, SIZE)
    ov.write_blocks(0, blk(1))
    ov.flush()
    ov.write_blocks(5, blk(2, 3))  # acknowledged, not flushed
    ov.abandon()  # like SIGKILL: page cache keeps data and log
    ov2 = Overlay(tmp_path, SIZE)
    assert list(ov2.extents()) == [(0, 1), (5, 3)]
    assert ov2.recovered_records == 2 and ov2.dropped_blocks == 0
    assert ov2.read(5 * B, 3 * B) == blk(2, 3)
    ov2.close()


def test_unflushed_record_whose_data_is_lost_is_dropped(tmp_path) -> None:
    ov = Overlay(tmp_path, SIZE)
    ov.write_blocks(1, blk(7))
    ov.flush()
    ov.write_blocks(8, blk(9, 2))  # unflushed
    ov.abandon()
    # a power loss lost the data of the unflushed write: the file holds something else
    with open(tmp_path / "overlay.img", "r+b") as f:
        f.seek(9 * B)
        f.write(b"\0" * B)
    ov2 = Overlay(tmp_path, SIZE)
    # block 8 of that write reached the disk (its CRC matches): kept; block 9 did not: dropped
    assert list(ov2.extents()) == [(1, 1), (8, 1)]
    assert ov2.dropped_blocks == 1
    ov2.close()
    # the recovery was checkpointed: a second reopen agrees without replaying anything
    ov3 = Overlay(tmp_path, SIZE)
    assert list(ov3.extents()) == [(1, 1), (8, 1)]
    assert ov3.recovered_records == 0 and os.path.getsize(tmp_path / "overlay.log") == 0
    ov3.close()


def test_partly_overwritten_unflushed_write_survives_a_kill(tmp_path) -> None:
    # Found by the stateful test: one CRC per write would drop block 1 here, since block 0
    # was overwritten later; the per-block CRCs keep every acknowledged block.
    ov = Overlay(tmp_path, SIZE)
    ov.write_blocks(0, blk(1, 2))
    ov.write_blocks(0, blk(2))
    ov.abandon()
    ov2 = Overlay(tmp_path, SIZE)
    assert list(ov2.extents()) == [(0, 2)] and ov2.dropped_blocks == 0
    assert ov2.read(0, 2 * B) == blk(2) + blk(1)
    ov2.close()


def test_records_before_a_barrier_are_trusted(tmp_path) -> None:
    ov = Overlay(tmp_path, SIZE)
    ov.write_blocks(2, blk(4))
    ov.flush()
    ov.abandon()
    # a later change of the data (not journalled) does not make a flushed write disappear
    with open(tmp_path / "overlay.img", "r+b") as f:
        f.seek(2 * B)
        f.write(b"z" * 10)
    ov2 = Overlay(tmp_path, SIZE)
    assert list(ov2.extents()) == [(2, 1)]
    ov2.close()


def test_torn_log_tail_ends_the_replay(tmp_path) -> None:
    ov = Overlay(tmp_path, SIZE)
    ov.write_blocks(1, blk(1))
    ov.write_blocks(2, blk(2))
    ov.abandon()
    log = tmp_path / "overlay.log"
    raw = log.read_bytes()
    assert len(raw) == 2 * record_size(1)
    one = record_size(1)
    log.write_bytes(raw[:one] + raw[one:one + 7])  # second record torn
    ov2 = Overlay(tmp_path, SIZE)
    assert list(ov2.extents()) == [(1, 1)]
    ov2.close()
    # a record with a flipped bit fails its own CRC
    ov = Overlay(tmp_path, SIZE)
    ov.write_blocks(20, blk(5))
    ov.abandon()
    raw = bytearray(log.read_bytes())
    raw[6] ^= 1  # inside "first block"
    log.write_bytes(bytes(raw))
    ov3 = Overlay(tmp_path, SIZE)
    assert list(ov3.extents()) == [(1, 1)]
    ov3.close()


def test_checkpoint_resets_the_log_and_keeps_the_map(tmp_path) -> None:
    ov = Overlay(tmp_path, SIZE, checkpoint_log_bytes=4 * record_size(1))
    for i in range(6):
        ov.write_blocks(i * 2, blk(i + 1))
    ov.flush()  # log over the threshold: checkpoint
    assert os.path.getsize(tmp_path / "overlay.log") == 0
    ov.write_blocks(30, blk(9))
    ov.abandon()
    ov2 = Overlay(tmp_path, SIZE)
    assert [f for f, _ in ov2.extents()] == [0, 2, 4, 6, 8, 10, 30]
    ov2.close()


def test_size_mismatch_is_refused(tmp_path) -> None:
    Overlay(tmp_path, SIZE).close()
    with pytest.raises(OverlayError):
        Overlay(tmp_path, SIZE * 2)


def test_damaged_map_snapshot_is_refused(tmp_path) -> None:
    ov = Overlay(tmp_path, SIZE)
    ov.write_blocks(0, blk(1))
    ov.close()
    raw = bytearray((tmp_path / "overlay.map").read_bytes())
    raw[-1] ^= 1
    (tmp_path / "overlay.map").write_bytes(bytes(raw))
    with pytest.raises(OverlayError):
        Overlay(tmp_path, SIZE)


def test_write_journalled_during_a_flush_is_not_covered_by_its_barrier(tmp_path) -> None:
    # The interleaving a concurrent flush can produce: the flush takes its mark and fdatasyncs
    # the data, another thread's write is journalled, then the barrier is appended. That write
    # is not durable: the barrier must not vouch for it.
    ov = Overlay(tmp_path, SIZE)
    ov.write_blocks(1, blk(1))
    with ov._lock:
        mark, gen = ov._mark()
    os.fdatasync(ov._img)
    ov.write_blocks(5, blk(5))  # journalled after the data sync
    with ov._lock:
        ov._barrier(mark, gen)
    ov.abandon()
    with open(tmp_path / "overlay.img", "r+b") as f:  # its data was lost
        f.seek(5 * B)
        f.write(b"\0" * B)
    ov2 = Overlay(tmp_path, SIZE)
    assert list(ov2.extents()) == [(1, 1)]
    ov2.close()


def test_new_records_after_a_torn_tail_are_not_lost(tmp_path) -> None:
    ov = Overlay(tmp_path, SIZE)
    ov.write_blocks(1, blk(1))
    ov.abandon()
    with open(tmp_path / "overlay.log", "ab") as f:
        f.write(b"OVW2garbage")  # a torn record
    ov2 = Overlay(tmp_path, SIZE)
    ov2.write_blocks(2, blk(2))
    ov2.abandon()
    ov3 = Overlay(tmp_path, SIZE)
    assert list(ov3.extents()) == [(1, 2)]
    ov3.close()


@pytest.fixture
def small_fs(tmp_path):
    """A 1 MiB tmpfs: the overlay's filesystem, easy to fill."""
    import subprocess

    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mnt)],
                   check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def _fill(path) -> None:
    import errno

    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(bytes(4096))
        except OSError as err:
            assert err.errno == errno.ENOSPC


@pytest.mark.root
def test_a_full_overlay_filesystem_fails_only_the_writes_that_do_not_fit(small_fs) -> None:
    import errno

    size = 64 << 20
    ov = Overlay(small_fs, size, checkpoint_log_bytes=1 << 30)
    for b in range(16):
        ov.write_blocks(b, blk(b))
    ov.flush()
    _fill(small_fs / "filler")
    # New blocks need room: refused, nothing marked present.
    with pytest.raises(OSError) as err:
        ov.write_blocks(1000, blk(7, 8))
    assert err.value.errno == errno.ENOSPC and not ov.present(1000)
    # Overwrites need no data room, but the journal grows until it has none either: the
    # write that does not fit fails, and leaves no torn record behind.
    acked: dict[int, bytes] = {}
    for i in range(100_000):
        data = bytes([i % 251 + 1]) * BLOCK_SIZE
        try:
            ov.write_blocks(i % 16, data)
        except OSError as e:
            assert e.errno == errno.ENOSPC
            # A failed write leaves its range undefined (as a disk does): old or new data.
            failed = (i % 16, acked.pop(i % 16, None), data)
            break
        acked[i % 16] = data
    else:
        raise AssertionError("the journal never filled the filesystem")
    assert os.path.getsize(small_fs / "overlay.log") == ov._log_bytes
    ov.close()  # no room for a checkpoint: close still keeps every acknowledged write
    ov = Overlay(small_fs, size, checkpoint_log_bytes=1 << 30)
    for b, data in acked.items():
        assert ov.read(b * BLOCK_SIZE, BLOCK_SIZE) == data, b
    assert ov.read(failed[0] * BLOCK_SIZE, BLOCK_SIZE) in failed[1:]
    # Freeing space is enough.
    os.unlink(small_fs / "filler")
    ov.write_blocks(1000, blk(9, 8))
    ov.flush()
    assert ov.read(1000 * BLOCK_SIZE, 8 * BLOCK_SIZE) == blk(9, 8)
    ov.close()


def test_group_commit_covers_every_write_acknowledged_before_a_flush(tmp_path) -> None:
    # Threads write a block each and flush; a flush that returned must have a barrier covering
    # that write even when it shared another thread's syncs. Afterwards every byte of
    # overlay.img is lost: only what barriers cover may (and must) be recovered.
    import threading

    ov = Overlay(tmp_path, 4096 * B)
    flushed: list[int] = []
    lock = threading.Lock()

    def worker(t: int) -> None:
        for i in range(40):
            block = t * 100 + i
            ov.write_blocks(block, blk(t + 1))
            ov.flush()
            with lock:
                flushed.append(block)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    ov.write_blocks(4000, blk(9))  # acknowledged, never flushed
    assert ov.flush_calls == 320 and ov.flush_syncs <= 320
    ov.abandon()
    os.truncate(tmp_path / "overlay.img", 0)
    os.truncate(tmp_path / "overlay.img", 4096 * B)
    ov2 = Overlay(tmp_path, 4096 * B)
    present = {b for first, n in ov2.extents() for b in range(first, first + n)}
    assert present == set(flushed)
    ov2.close()


def test_concurrent_flushes_share_their_syncs(tmp_path, monkeypatch) -> None:
    import threading
    import time

    import dmrecover.engine.overlay as overlay_mod

    ov = Overlay(tmp_path, SIZE)
    real = os.fdatasync

    def slow_fdatasync(fd: int) -> None:
        time.sleep(0.05)  # a slow disk: flushes arriving meanwhile queue up
        real(fd)

    monkeypatch.setattr(overlay_mod.os, "fdatasync", slow_fdatasync)
    ov.write_blocks(1, blk(1))
    go = threading.Barrier(8)

    def worker(t: int) -> None:
        ov.write_blocks(10 + t, blk(t))
        go.wait()
        ov.flush()

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert ov.flush_calls == 8
    assert ov.flush_syncs < 8  # at most the first and one for all who waited behind it
    ov.close()


def test_flush_with_nothing_new_syncs_nothing(tmp_path) -> None:
    ov = Overlay(tmp_path, SIZE)
    ov.flush()  # nothing written since the checkpoint at open
    assert ov.flush_syncs == 0
    ov.write_blocks(2, blk(2))
    ov.flush()
    ov.flush()
    assert (ov.flush_calls, ov.flush_syncs) == (3, 1)
    ov.close()


def test_write_journalled_during_a_group_flush_gets_its_own_sync(tmp_path, monkeypatch) -> None:
    # A write journalled while a flush syncs the data is not covered by that flush's barrier:
    # the next flush must sync again instead of counting it as covered.
    import dmrecover.engine.overlay as overlay_mod

    ov = Overlay(tmp_path, SIZE)
    real = os.fdatasync
    calls = []

    def fdatasync(fd: int) -> None:
        real(fd)
        if fd == ov._img and not calls:
            calls.append(fd)
            ov.write_blocks(7, blk(7))  # another thread's write, right after the data sync

    monkeypatch.setattr(overlay_mod.os, "fdatasync", fdatasync)
    ov.write_blocks(1, blk(1))
    ov.flush()
    ov.flush()  # covers block 7
    assert ov.flush_syncs == 2
    ov.abandon()
    os.truncate(tmp_path / "overlay.img", 0)
    os.truncate(tmp_path / "overlay.img", 65 * B)
    ov2 = Overlay(tmp_path, SIZE)
    assert list(ov2.extents()) == [(1, 1), (7, 1)]
    ov2.close()
