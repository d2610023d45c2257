"""Fetcher, restorer and PseudoVolume behaviour: dedup, retries, deadline, corruption,
ordering of DEST data and the restored map, priority of on-demand fetches, cutover merge."""

from __future__ import annotations

import errno
import random
import threading
import time
from pathlib import Path

import pytest

from dmrecover.engine.bitmap import Bitmap
from dmrecover.engine.fetcher import Fetcher, MemorySource
from dmrecover.engine.pseudovolume import PseudoVolume
from dmrecover.engine.restorer import Restorer
from dmrecover.errors import CorruptChunk, EngineError, RepositoryUnavailable

CS = 64 * 1024


def make_data(nchunks: int, tail: int = 0, seed: int = 1, zero: tuple[int, ...] = ()) -> bytes:
    rnd = random.Random(seed)
    data = bytearray(rnd.randbytes(nchunks * CS + tail))
    for z in zero:
        data[z * CS:(z + 1) * CS] = bytes(CS)
    return bytes(data)


def make_dest(tmp_path: Path, size: int, fill: bytes = b"\xee") -> Path:
    dest = tmp_path / "dest"
    dest.write_bytes(fill * size)  # garbage: must never be served for an unrestored chunk
    return dest


def test_concurrent_ensure_of_one_chunk_fetches_once(tmp_path) -> None:
    data = make_data(8)
    src = MemorySource(data, CS, delay=0.2)
    f = Fetcher(src, make_dest(tmp_path, len(data)), tmp_path / "restored.map")
    threads = [threading.Thread(target=f.ensure, args=(3,)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert src.reads == [3]
    assert f.read_dest(3 * CS, CS) == data[3 * CS:4 * CS]
    assert f.is_restored(3) and f.restored_chunks == 1
    f.close()


def test_transient_fault_is_retried(tmp_path) -> None:
    data = make_data(4)
    src = MemorySource(data, CS)
    src.transient_failures = 3
    f = Fetcher(src, make_dest(tmp_path, len(data)), tmp_path / "m", deadline=10)
    f.ensure(1)
    assert src.reads == [1, 1, 1, 1]
    assert f.stats()["retries"] == 3
    assert f.read_dest(CS, CS) == data[CS:2 * CS]
    f.close()


def test_waiting_for_repository_shows_in_stats_then_recovers(tmp_path) -> None:
    data = make_data(4)
    src = MemorySource(data, CS)
    src.unavailable = True
    f = Fetcher(src, make_dest(tmp_path, len(data)), tmp_path / "m", deadline=30,
                backoff_max=0.05)
    errors: list[BaseException] = []

    def read() -> None:
        try:
            f.ensure(2)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    t = threading.Thread(target=read)
    t0 = time.time()
    t.start()
    for _ in range(200):
        since = f.stats()["waiting_for_repository_since"]
        if since is not None:
            break
        time.sleep(0.01)
    assert since is not None and t0 - 1 <= since <= time.time()
    assert t.is_alive()  # still waiting, no error yet
    src.unavailable = False
    t.join(5)
    assert not t.is_alive() and not errors
    assert f.stats()["waiting_for_repository_since"] is None
    assert f.is_restored(2)
    f.close()


def test_past_the_deadline_a_read_waits_and_completes_when_the_repository_returns(
        tmp_path) -> None:
    data = make_data(4)
    src = MemorySource(data, CS)
    src.unavailable = True
    f = Fetcher(src, make_dest(tmp_path, len(data)), tmp_path / "m", deadline=0.2,
                backoff_max=0.05)
    errors: list[BaseException] = []

    def read() -> None:
        try:
            f.ensure(0)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    t = threading.Thread(target=read)
    t.start()
    deadline = time.monotonic() + 30
    while not f.stats()["repository_lost_since"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert f.stats()["repository_lost_since"], "past the deadline the fetcher says so"
    assert t.is_alive() and not errors, "the read blocks (block is the default)"
    assert not f.stats()["failed"]
    src.unavailable = False
    t.join(10)
    assert not t.is_alive() and not errors
    assert f.read_dest(0, CS) == data[:CS]
    assert f.stats()["repository_lost_since"] is None
    assert f.stats()["waiting_for_repository_since"] is None
    f.ensure(1)  # not failed for good
    f.close()
    assert Bitmap.load(tmp_path / "m").count() == 2


def test_on_lost_error_fails_reads_past_the_deadline_but_not_for_good(tmp_path) -> None:
    data = make_data(4)
    src = MemorySource(data, CS)
    src.unavailable = True
    f = Fetcher(src, make_dest(tmp_path, len(data)), tmp_path / "m", deadline=0.3,
                backoff_max=0.05, on_lost="error")
    t0 = time.monotonic()
    with pytest.raises(RepositoryUnavailable, match="deadline"):
        f.ensure(0)
    assert 0.3 <= time.monotonic() - t0 < 5
    assert not f.is_restored(0)
    t1 = time.monotonic()
    with pytest.raises(RepositoryUnavailable):  # still lost: fails at once
        f.ensure(1)
    assert time.monotonic() - t1 < 0.25
    src.unavailable = False
    f.ensure(1)  # the repository is back: reads work again
    f.ensure(0)
    assert f.read_dest(0, 2 * CS) == data[:2 * CS]
    assert f.stats()["repository_lost_since"] is None
    f.close()


def test_the_background_restore_waits_for_the_repository_in_error_mode_too(tmp_path) -> None:
    data = make_data(6)
    src = MemorySource(data, CS)
    src.unavailable = True
    pv = PseudoVolume(src, make_dest(tmp_path, len(data)), tmp_path / "state",
                      fetch_deadline=0.1, on_repository_lost="error")
    pv.fetcher.backoff_max = 0.05
    pv.start_restore()
    deadline = time.monotonic() + 30
    while not pv.stats()["repository_lost_since"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert pv.restorer is not None and pv.restorer.running and not pv.restorer.error
    src.unavailable = False
    assert pv.wait_restored(30)
    assert pv.read(0, len(data)) == data
    pv.close()


def test_an_unknown_on_lost_policy_is_refused(tmp_path) -> None:
    data = make_data(2)
    with pytest.raises(ValueError):
        Fetcher(MemorySource(data, CS), make_dest(tmp_path, len(data)), tmp_path / "m",
                on_lost="ignore")


def test_corrupt_chunk_fails_at_once_and_is_not_marked(tmp_path) -> None:
    data = make_data(4)
    src = MemorySource(data, CS)
    src.corrupt = {2}
    dest = make_dest(tmp_path, len(data))
    pv = PseudoVolume(src, dest, tmp_path / "state")
    with pytest.raises(CorruptChunk):
        pv.read(2 * CS + 10, 100)
    assert src.reads == [2]  # not retried
    assert pv.read(0, 100) == data[:100]  # other chunks still served
    pv.sync_restored_map()
    assert not Bitmap.load(tmp_path / "state" / "restored.map").test(2)
    assert dest.read_bytes()[2 * CS:3 * CS] == b"\xee" * CS  # nothing written
    pv.start_restore()
    assert not pv.wait_restored(5)
    assert "corrupt" in pv.stats()["restorer_error"]
    pv.close()


def test_zero_chunks_are_zeroed_without_reading(tmp_path) -> None:
    data = make_data(4, zero=(1, 3))
    src = MemorySource(data, CS)
    dest = make_dest(tmp_path, len(data))
    pv = PseudoVolume(src, dest, tmp_path / "state")
    assert pv.read(0, len(data)) == data
    assert sorted(src.reads) == [0, 2]
    pv.close()
    assert dest.read_bytes() == data


class OrderCheckingFetcher(Fetcher):
    """Records which chunks were written to DEST before each sync_dest(), and checks that the
    map saved right after names no other chunk."""

    def __init__(self, *a, **kw) -> None:
        self.written: set[int] = set()
        self.durable: set[int] = set()
        self.violations: list[set[int]] = []
        self.syncs = 0
        super().__init__(*a, **kw)

    def write_dest(self, offset: int, data) -> None:
        super().write_dest(offset, data)
        self.written.add(offset // self.source.chunk_size)

    def _zero_dest(self, offset: int, length: int) -> None:
        super()._zero_dest(offset, length)
        self.written.add(offset // self.source.chunk_size)

    def sync_dest(self) -> None:
        snapshot = set(self.written)
        super().sync_dest()
        self.durable |= snapshot

    def sync(self) -> None:
        super().sync()
        self.syncs += 1
        on_disk = set(Bitmap.load(self.map_path).iter_set())
        if not on_disk <= self.durable:
            self.violations.append(on_disk - self.durable)


def test_restored_map_on_disk_never_names_a_chunk_not_durable_on_dest(tmp_path) -> None:
    data = make_data(40, tail=1234, zero=(5, 6, 30))
    src = MemorySource(data, CS, delay=0.001)
    dest = make_dest(tmp_path, len(data))
    f = OrderCheckingFetcher(src, dest, tmp_path / "restored.map")
    r = Restorer(f, sync_chunks=3, sync_seconds=0.01)
    r.start()
    # on-demand fetches from other threads meanwhile
    def reader() -> None:
        rnd = random.Random(5)
        for _ in range(30):
            f.ensure(rnd.randrange(src.chunk_count))

    ts = [threading.Thread(target=reader) for _ in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert r.completed.wait(20)
    assert f.syncs > 5 and not f.violations
    on_disk = Bitmap.load(tmp_path / "restored.map")
    assert on_disk.count() == src.chunk_count
    f.close()
    assert dest.read_bytes()[:len(data)] == data


def test_on_demand_fetch_goes_ahead_of_the_background_restore(tmp_path) -> None:
    delay = 0.05
    data = make_data(200)
    src = MemorySource(data, CS, delay=delay)
    pv = PseudoVolume(src, make_dest(tmp_path, len(data)), tmp_path / "state")
    pv.start_restore()
    time.sleep(0.2)
    lat = []
    for i in range(10):
        idx = 199 - i * 3  # far ahead of the restorer
        t0 = time.monotonic()
        assert pv.read(idx * CS, 4096) == data[idx * CS:idx * CS + 4096]
        lat.append(time.monotonic() - t0)
    s = pv.stats()
    pv.stop_restore()
    # A fetch costs one source read (delay); waiting behind background work would cost more.
    # At most one background chunk is in flight when the request arrives: <= 2 * delay + slack.
    assert max(lat) < 2 * delay + 0.08, lat
    assert s["demand_fetches"] == 10 and s["demand_latency_max"] < 2 * delay + 0.08
    assert s["background_fetches"] > 0
    t0 = time.monotonic()
    pv.close()
    assert time.monotonic() - t0 < 1.0  # stop is prompt


def test_restore_completes_and_resumes_after_reopen(tmp_path) -> None:
    data = make_data(20, tail=100)
    src = MemorySource(data, CS)
    dest = make_dest(tmp_path, len(data))
    done = threading.Event()
    pv = PseudoVolume(src, dest, tmp_path / "state", on_restored=done.set)
    for i in range(0, 20, 2):
        pv.read(i * CS, 1)
    pv.close()
    src2 = MemorySource(data, CS)
    pv2 = PseudoVolume(src2, dest, tmp_path / "state", on_restored=done.set)
    assert pv2.stats()["restored_chunks"] == 10
    pv2.start_restore()
    assert pv2.wait_restored(10) and pv2.restored_all() and done.is_set()
    # only the missing ones are fetched (20 is the short tail chunk)
    assert sorted(src2.reads) == [*range(1, 21, 2), 20]
    s = pv2.stats()
    assert s["percent"] == 100.0 and s["eta"] == 0.0
    pv2.close()
    assert dest.read_bytes() == data


def test_bounds_and_read_only(tmp_path) -> None:
    data = make_data(2, tail=1000)
    src = MemorySource(data, CS)
    dest = make_dest(tmp_path, len(data))
    pv = PseudoVolume(src, dest, tmp_path / "state")
    assert pv.read(len(data) - 10, 100) == data[-10:]
    assert pv.read(len(data), 10) == b""
    with pytest.raises(OSError) as e:
        pv.write(len(data) - 1, b"ab")
    assert e.value.errno == errno.ENOSPC
    pv.write(len(data) - 2, b"ab")  # exactly to the end (short last block)
    assert pv.read(len(data) - 3, 10) == data[-3:-2] + b"ab"
    pv.close()
    ro = PseudoVolume(src, dest, tmp_path / "state2", read_only=True)
    with pytest.raises(OSError) as e:
        ro.write(0, b"x")
    assert e.value.errno == errno.EROFS
    assert ro.read(0, 10) == data[:10]
    ro.close()
    assert not (tmp_path / "state2" / "overlay.img").exists()


def test_merge_overlay_into_dest_is_idempotent_and_discard_needs_merge(tmp_path) -> None:
    data = make_data(6, tail=777)
    src = MemorySource(data, CS)
    dest = make_dest(tmp_path, len(data))
    model = bytearray(data)
    pv = PseudoVolume(src, dest, tmp_path / "state")
    rnd = random.Random(3)
    for _ in range(50):
        off = rnd.randrange(len(data))
        b = rnd.randbytes(min(rnd.randrange(1, 9000), len(data) - off))
        pv.write(off, b)
        model[off:off + len(b)] = b
    with pytest.raises(EngineError):
        pv.merge_overlay_into_dest()  # restore not complete
    with pytest.raises(EngineError):
        pv.discard_overlay()
    pv.start_restore()
    assert pv.wait_restored(10)
    copied = pv.merge_overlay_into_dest()
    assert copied > 0 and pv.merged
    assert pv.merge_overlay_into_dest() == 0
    with pytest.raises(OSError):
        pv.write(0, b"late")
    assert pv.read(0, len(data)) == bytes(model)
    pv.discard_overlay()
    assert not (tmp_path / "state" / "overlay.img").exists()
    pv.close()
    assert dest.read_bytes() == bytes(model)


def test_concurrent_syncs_do_not_collide(tmp_path) -> None:
    # Found through FUSE: an application fsync while the restorer synced renamed one temp file
    # twice. Syncs are serialised.
    data = make_data(30)
    src = MemorySource(data, CS)
    pv = PseudoVolume(src, make_dest(tmp_path, len(data)), tmp_path / "state")
    errors: list[BaseException] = []

    def syncer() -> None:
        try:
            for _ in range(30):
                pv.flush()
                pv.sync_restored_map()
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    ts = [threading.Thread(target=syncer) for _ in range(4)]
    pv.start_restore()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert pv.wait_restored(10)
    pv.close()
    assert not errors
    assert Bitmap.load(tmp_path / "state" / "restored.map").count() == src.chunk_count


def test_concurrent_partial_writes_into_shared_blocks_lose_nothing(tmp_path) -> None:
    # 4 threads, each owning every 4th 512-byte sector: their writes share 4 KiB blocks, so
    # the read-modify-write of one must never undo another's (striped block locks).
    data = make_data(4)
    src = MemorySource(data, CS, delay=0.002)
    pv = PseudoVolume(src, make_dest(tmp_path, len(data)), tmp_path / "state")
    nsect = len(data) // 512
    final: dict[int, bytes] = {}
    lock = threading.Lock()

    def writer(t: int) -> None:
        rnd = random.Random(t)
        mine = [s for s in range(nsect) if s % 4 == t]
        for _ in range(400):
            s = rnd.choice(mine)
            b = rnd.randbytes(512)
            pv.write(s * 512, b)
            with lock:
                final[s] = b

    pv.start_restore()
    ts = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    got = pv.read(0, len(data))
    pv.close()
    want = bytearray(data)
    for s, b in final.items():
        want[s * 512:(s + 1) * 512] = b
    assert got == bytes(want)


def test_background_restore_follows_the_application_reads(tmp_path) -> None:
    data = make_data(100)
    src = MemorySource(data, CS, delay=0.01)
    pv = PseudoVolume(src, make_dest(tmp_path, len(data)), tmp_path / "state")
    pv.start_restore()
    time.sleep(0.1)
    assert pv.read(80 * CS, 10) == data[80 * CS:80 * CS + 10]
    time.sleep(0.1)
    reads = list(src.reads)
    pos = reads.index(80)
    # the chunks after the one the application read come next (one background chunk may
    # have been in flight already)
    assert {81, 82, 83} <= set(reads[pos + 1:pos + 5]), reads
    assert pv.wait_restored(10)  # and it still wraps around to restore everything
    assert sorted(set(src.reads)) == list(range(100))
    assert len(src.reads) == 100  # nothing fetched twice
    pv.close()


def test_the_restored_map_lives_in_map_dir_and_an_old_one_moves_there(tmp_path) -> None:
    data = make_data(4)
    src = MemorySource(data, CS)
    dest = make_dest(tmp_path, len(data))
    eng, state = tmp_path / "eng", tmp_path / "state"
    state.mkdir()
    pv = PseudoVolume(src, dest, eng)  # an earlier session: the map beside the overlay
    pv.read(0, 10)
    pv.close()
    assert (eng / "restored.map").exists()
    pv = PseudoVolume(src, dest, eng, map_dir=state)
    assert not (eng / "restored.map").exists() and pv.fetcher.is_restored(0)
    pv.read(CS, 10)
    st = pv.stats()
    assert st["overlay_room"] >= st["overlay_allocated"] >= 0
    pv.close()
    assert Bitmap.load(state / "restored.map").count() == 2


def test_an_incomplete_dest_is_marked_until_the_restore_completes(tmp_path) -> None:
    data = make_data(4)
    src = MemorySource(data, CS)
    dest = make_dest(tmp_path, len(data))
    head = tmp_path / "state" / "dest-head"
    pv = PseudoVolume(src, dest, tmp_path / "state", mark_dest=head)
    assert head.exists() and dest.read_bytes()[:4096] == bytes(4096), "marked at once"
    assert pv.read(0, 8192) == data[:8192]  # served as restored, DEST still marked
    assert pv.fetcher.wait_writes(30)  # the chunk's DEST write follows the read
    assert dest.read_bytes()[:4096] == bytes(4096)
    assert dest.read_bytes()[4096:8192] == data[4096:8192]
    assert pv.stats()["dest_marked"]
    pv.abandon()  # a kill: the mark stays, the saved head is durable
    pv = PseudoVolume(src, dest, tmp_path / "state", mark_dest=head)
    assert dest.read_bytes()[:4096] == bytes(4096) and pv.read(0, 100) == data[:100]
    pv.start_restore()
    assert pv.wait_restored(30)
    assert not head.exists() and not pv.stats()["dest_marked"]
    assert dest.read_bytes() == data, "the head is back once everything is restored"
    pv.close()


def test_zero_chunks_of_a_sparse_dest_stay_holes(tmp_path) -> None:
    # A sparse DEST (1 TiB on a small disk): its zero chunks already read as zeros and must
    # not be allocated by zeroing them; zero chunks over old data are still zeroed.
    import os

    data = make_data(64, zero=tuple(range(1, 63)))
    dest = tmp_path / "dest"
    with open(dest, "wb") as f:
        f.truncate(len(data))
        f.seek(5 * CS)
        f.write(b"\xee" * CS)  # old data where the backup has a zero chunk
    with PseudoVolume(MemorySource(data, CS), dest, tmp_path / "state") as pv:
        pv.start_restore()
        assert pv.wait_restored(60)
        assert pv.read(0, len(data)) == data
    assert dest.read_bytes() == data
    # chunks 0 and 63 hold data; nothing else allocated (a few blocks of slack for metadata)
    assert os.stat(dest).st_blocks * 512 <= 3 * CS
