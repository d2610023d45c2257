"""The parallel background restorer: fetches in parallel, one DEST writer, no chunk fetched
twice, on-demand fetches first, read-ahead after the application's reads, errors."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from dmrecover import testhooks
from dmrecover.engine.bitmap import Bitmap, SlotFile
from dmrecover.engine.fetcher import Fetcher, MemorySource
from dmrecover.engine.restorer import Restorer
from dmrecover.errors import DeviceError

CS = 16 * 1024


def make_data(nchunks: int, tail: int = 0) -> bytes:
    return os.urandom(nchunks * CS + tail)


def make_dest(tmp_path: Path, size: int) -> Path:
    p = tmp_path / "dest.img"
    p.write_bytes(b"\xee" * size)
    return p


class CountingSource(MemorySource):
    """A MemorySource that records how many reads run at once, and can be gated."""

    def __init__(self, data: bytes, delay: float = 0.0) -> None:
        super().__init__(data, CS, zero_chunks=set(), delay=delay)
        self.active = 0
        self.peak = 0
        self.gate = threading.Event()
        self.gate.set()
        self._count_lock = threading.Lock()

    def read_chunk(self, index: int) -> bytes:
        with self._count_lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
        try:
            self.gate.wait(30)
            return super().read_chunk(index)
        finally:
            with self._count_lock:
                self.active -= 1


class WriteWatchingFetcher(Fetcher):
    """Records DEST writes that overlap in time (there must be none from the restorer)."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.writing = 0
        self.write_peak = 0
        self._w = threading.Lock()

    def write_dest(self, offset: int, data) -> None:
        with self._w:
            self.writing += 1
            self.write_peak = max(self.write_peak, self.writing)
        try:
            time.sleep(0.001)  # room for another writer to overlap, if one could
            super().write_dest(offset, data)
        finally:
            with self._w:
                self.writing -= 1


def run(r: Restorer, timeout: float = 30) -> None:
    r.start()
    assert r.finished.wait(timeout), "restorer did not finish"


def test_parallel_fetches_one_writer_each_chunk_once(tmp_path) -> None:
    data = make_data(64, tail=123)
    src = CountingSource(data, delay=0.01)
    f = WriteWatchingFetcher(src, make_dest(tmp_path, len(data)), tmp_path / "map")
    done = threading.Event()
    r = Restorer(f, workers=6, on_complete=done.set, sync_chunks=8)
    t0 = time.monotonic()
    run(r)
    elapsed = time.monotonic() - t0
    assert r.completed.is_set() and done.is_set() and r.error is None
    assert src.peak > 1, "fetches ran one at a time"
    assert src.peak <= 6
    assert f.write_peak == 1, "two restorer writes to DEST overlapped"
    assert sorted(src.reads) == list(range(src.chunk_count)), "a chunk was fetched twice"
    # 65 reads of 10 ms each: serial would take >= 0.65 s.
    assert elapsed < 0.65, elapsed
    assert Bitmap.load(tmp_path / "map").count() == src.chunk_count
    f.close()
    assert (tmp_path / "dest.img").read_bytes()[:len(data)] == data
    assert r.stats()["workers"] == 6 and r.restored_bytes == len(data)


def test_order_is_ascending_and_one_worker_is_serial(tmp_path) -> None:
    data = make_data(20)
    src = CountingSource(data)
    f = Fetcher(src, make_dest(tmp_path, len(data)), tmp_path / "map")
    run(Restorer(f, workers=1))
    assert src.reads == list(range(20)) and src.peak == 1
    # With a pool the chunks are still taken in ascending order (completion order varies).
    src2 = CountingSource(data, delay=0.005)
    (tmp_path / "b").mkdir()
    f2 = Fetcher(src2, make_dest(tmp_path / "b", len(data)), tmp_path / "map2")
    run(Restorer(f2, workers=4))
    assert sorted(src2.reads) == list(range(20))
    first = src2.reads[:4]
    assert max(first) <= 4, first


def test_read_ahead_follows_the_application(tmp_path) -> None:
    """After an on-demand read of chunk i, the pool continues at i+1 (wrapping around)."""
    data = make_data(200)
    src = CountingSource(data)
    f = Fetcher(src, make_dest(tmp_path, len(data)), tmp_path / "map")
    src.gate.clear()  # hold the first background fetches
    r = Restorer(f, workers=4)
    r.start()
    deadline = time.monotonic() + 10
    while src.active < 4 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert src.active == 4
    app = threading.Thread(target=f.ensure, args=(150,))
    app.start()
    # Release the gate only once the application's read is in flight (a fixed sleep was
    # too short on a loaded machine): then the pool has seen the demand before it goes on.
    while src.active < 5 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert src.active == 5
    src.gate.set()
    app.join(10)
    assert r.finished.wait(30) and r.completed.is_set()
    # reads are recorded as they finish: leave out the four held ones and the application's.
    after = [i for i in src.reads if i not in (0, 1, 2, 3, 150)][:8]
    # The next chunks the pool took are those after the application's read.
    assert set(after) <= set(range(151, 165)), src.reads[:16]


def test_on_demand_fetch_does_not_wait_behind_the_pool(tmp_path) -> None:
    delay = 0.05
    data = make_data(300)
    src = MemorySource(data, CS, zero_chunks=set(), delay=delay)
    f = Fetcher(src, make_dest(tmp_path, len(data)), tmp_path / "map")
    r = Restorer(f, workers=8)
    r.start()
    time.sleep(0.15)
    lat = []
    for i in range(8):
        idx = 299 - 5 * i
        t0 = time.monotonic()
        f.ensure(idx)
        lat.append(time.monotonic() - t0)
    r.stop()
    assert r.finished.is_set()
    # One source read each: never the 8 background fetches in flight ahead of it.
    assert max(lat) < 2 * delay + 0.08, lat
    assert f.background_fetches > 8


def test_the_pool_yields_while_on_demand_fetches_run(tmp_path) -> None:
    data = make_data(100)
    src = CountingSource(data, delay=0.002)
    f = Fetcher(src, make_dest(tmp_path, len(data)), tmp_path / "map")
    # An on-demand fetch in flight (held at the gate) before the restorer starts.
    src.gate.clear()
    app = threading.Thread(target=f.ensure, args=(99,))
    app.start()
    deadline = time.monotonic() + 10
    while src.active < 1 and time.monotonic() < deadline:
        time.sleep(0.005)
    r = Restorer(f, workers=4)
    r.start()
    time.sleep(0.3)
    assert src.active == 1, "the pool fetched while an on-demand fetch was in flight"
    src.gate.set()
    app.join(10)
    assert src.reads[0] == 99
    assert r.finished.wait(30) and r.completed.is_set()


def test_corrupt_chunk_ends_with_an_error_after_restoring_the_rest(tmp_path) -> None:
    data = make_data(40)
    src = CountingSource(data)
    src.corrupt = {7, 31}
    f = Fetcher(src, make_dest(tmp_path, len(data)), tmp_path / "map")
    done = threading.Event()
    r = Restorer(f, workers=4, on_complete=done.set)
    run(r)
    assert not r.completed.is_set() and not done.is_set()
    assert r.corrupt == [7, 31]
    assert "2 corrupt chunk(s)" in r.error and "first: 7" in r.error
    assert f.restored_chunks == 38
    assert src.reads.count(7) == 1, "a corrupt chunk is not fetched again and again"


def test_transient_errors_are_retried(tmp_path) -> None:
    data = make_data(30)
    src = CountingSource(data)
    src.transient_failures = 12
    f = Fetcher(src, make_dest(tmp_path, len(data)), tmp_path / "map", backoff_max=0.05)
    r = Restorer(f, workers=4)
    run(r)
    assert r.completed.is_set() and r.error is None
    assert f.retries >= 12
    f.close()
    assert (tmp_path / "dest.img").read_bytes() == data


def test_outage_waits_then_recovers(tmp_path) -> None:
    data = make_data(30)
    src = CountingSource(data)
    src.unavailable = True
    f = Fetcher(src, make_dest(tmp_path, len(data)), tmp_path / "map", deadline=0.2,
                backoff_max=0.05)
    r = Restorer(f, workers=4)
    r.start()
    time.sleep(0.6)
    assert r.running and r.error is None and f.restored_chunks == 0
    assert f.stats()["repository_lost_since"] is not None
    src.unavailable = False
    assert r.finished.wait(30) and r.completed.is_set()
    assert f.stats()["repository_lost_since"] is None


def test_a_dest_write_failure_stops_every_worker(tmp_path) -> None:
    data = make_data(50)
    src = CountingSource(data, delay=0.002)

    class FailingFetcher(Fetcher):
        def write_dest(self, offset: int, data) -> None:
            if offset >= 10 * CS:
                raise DeviceError(f"writing DEST at {offset} failed: Input/output error")
            super().write_dest(offset, data)

    f = FailingFetcher(src, make_dest(tmp_path, len(data)), tmp_path / "map")
    r = Restorer(f, workers=4)
    run(r)
    assert not r.completed.is_set()
    assert "Input/output error" in r.error
    assert len(src.reads) < 20, "workers went on after the failure"


def test_stop_is_prompt_and_keeps_the_map_consistent(tmp_path) -> None:
    data = make_data(200)
    src = CountingSource(data, delay=0.01)
    f = Fetcher(src, make_dest(tmp_path, len(data)), tmp_path / "map")
    r = Restorer(f, workers=4)
    r.start()
    time.sleep(0.1)
    t0 = time.monotonic()
    r.stop()
    assert time.monotonic() - t0 < 1.0 and not r.running
    f.sync()
    on_disk = Bitmap.load(tmp_path / "map")
    dest = (tmp_path / "dest.img").read_bytes()
    assert 0 < on_disk.count() < 200
    for i in on_disk.iter_set():
        assert dest[i * CS:(i + 1) * CS] == data[i * CS:(i + 1) * CS]


@pytest.mark.parametrize("workers", [0, 65])
def test_bad_worker_count(tmp_path, workers: int) -> None:
    data = make_data(2)
    f = Fetcher(MemorySource(data, CS), make_dest(tmp_path, len(data)), tmp_path / "map")
    with pytest.raises(ValueError):
        Restorer(f, workers=workers)


def test_zero_chunks_do_not_bring_syncs_forward(tmp_path) -> None:
    # A mostly empty volume: a sync (two fsyncs) every few zero chunks made the background
    # restore of 32 GiB with 2 GiB of data twice as slow as the offline restore.
    data = bytearray(400 * CS)
    for i in range(0, 400, 50):  # 8 data chunks among 392 zero ones
        data[i * CS:(i + 1) * CS] = os.urandom(CS)
    src = MemorySource(bytes(data), CS)
    f = Fetcher(src, make_dest(tmp_path, len(data)), tmp_path / "map")
    syncs = []
    sync = f.sync

    def counted() -> None:
        syncs.append(f.restored_chunks)
        sync()

    f.sync = counted  # type: ignore[method-assign]
    r = Restorer(f, workers=2, sync_chunks=4, sync_seconds=3600)
    r.start()
    assert r.finished.wait(30) and r.completed.is_set()
    assert len(syncs) <= 8 // 4 + 1, syncs  # by data chunks, and the final one
    f.close()
    assert SlotFile.load_any(tmp_path / "map").count() == 400
    assert (tmp_path / "dest.img").read_bytes()[:len(data)] == bytes(data)


def test_test_hold_stops_the_pool_not_the_application(tmp_path, monkeypatch) -> None:
    """DMRECOVER_TEST_RESTORE_HOLD (test hooks on): while its file exists the pool claims no
    chunk, an on-demand fetch is served at once, and removing the file lets the restore end.
    Without DMRECOVER_TEST_HOOKS=1 the same file holds nothing."""
    hold = tmp_path / "hold"
    hold.touch()
    monkeypatch.setenv(testhooks.RESTORE_HOLD_ENV, str(hold))
    data = make_data(12)
    src = CountingSource(data)
    f = Fetcher(src, make_dest(tmp_path, len(data)), tmp_path / "map")
    monkeypatch.delenv(testhooks.ENABLE_ENV, raising=False)
    run(Restorer(f, workers=3))  # hooks off: the hold file is ignored
    assert sorted(src.reads) == list(range(12))

    monkeypatch.setenv(testhooks.ENABLE_ENV, "1")
    (tmp_path / "b").mkdir()
    src2 = CountingSource(data)
    f2 = Fetcher(src2, make_dest(tmp_path / "b", len(data)), tmp_path / "map2")
    r = Restorer(f2, workers=3)
    r.start()
    assert f2.ensure(7) and src2.reads == [7]  # the application's read, served held or not
    time.sleep(0.3)
    assert src2.reads == [7] and not r.finished.is_set()
    hold.unlink()
    assert r.finished.wait(30) and r.completed.is_set()
    assert sorted(src2.reads) == list(range(12))
