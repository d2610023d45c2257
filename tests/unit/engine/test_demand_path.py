"""The on-demand read path: served from the fetched bytes without waiting for any DEST write
(its own, handed to the writer thread, or a background fetch's), and still safe: the restored
map names a chunk only once its write is on DEST, a chunk is fetched once, a kill with writes
pending loses nothing."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from dmrecover.engine import fetcher as fetcher_module
from dmrecover.engine.bitmap import SlotFile
from dmrecover.engine.fetcher import Fetcher, MemorySource
from dmrecover.engine.pseudovolume import PseudoVolume

CS = 64 * 1024


def make_dest(tmp_path: Path, size: int) -> Path:
    p = tmp_path / "dest.img"
    p.write_bytes(b"\xee" * size)
    return p


def gate_writes(f: Fetcher) -> threading.Event:
    """Hold every DEST write of `f` until the returned event is set (a slow DEST)."""
    gate = threading.Event()
    write = f.write_dest

    def held(offset: int, data: bytes | memoryview) -> None:
        assert gate.wait(30), "test gate never opened"
        write(offset, data)

    f.write_dest = held  # type: ignore[method-assign]
    return gate


def run(fn, *args):  # noqa: ANN001, ANN202 - a call in a thread, its result or error
    out: dict = {}

    def target() -> None:
        try:
            out["value"] = fn(*args)
        except BaseException as err:  # noqa: BLE001
            out["error"] = err

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), f"{fn.__name__} is still blocked"
    if "error" in out:
        raise out["error"]
    return out["value"]


def test_an_on_demand_read_does_not_wait_for_its_dest_write(tmp_path) -> None:
    data = os.urandom(8 * CS)
    src = MemorySource(data, CS, zero_chunks=set())
    dest = make_dest(tmp_path, len(data))
    with PseudoVolume(src, dest, tmp_path / "state") as pv:
        gate = gate_writes(pv.fetcher)
        # DEST's writes are held, yet the read returns the chunk's bytes.
        assert run(pv.read, 3 * CS + 100, 5000) == data[3 * CS + 100:3 * CS + 5100]
        assert not pv.fetcher.is_restored(3)  # not on DEST yet: not restored
        pv.sync_restored_map()
        assert 3 not in set(SlotFile.load_any(tmp_path / "state" / "restored.map").iter_set())
        # Reads of it meanwhile: from the fetched bytes, no refetch.
        assert run(pv.read, 3 * CS, CS) == data[3 * CS:4 * CS]
        assert run(pv.read, 3 * CS + 10, 100) == data[3 * CS + 10:3 * CS + 110]
        assert src.reads == [3]
        gate.set()
        assert pv.fetcher.wait_writes(30)
        assert pv.fetcher.is_restored(3)
        pv.sync_restored_map()
        assert 3 in set(SlotFile.load_any(tmp_path / "state" / "restored.map").iter_set())
    assert dest.read_bytes()[3 * CS:4 * CS] == data[3 * CS:4 * CS]


def test_a_read_of_a_chunk_the_background_is_writing_does_not_wait_for_it(tmp_path) -> None:
    data = os.urandom(8 * CS)
    src = MemorySource(data, CS, zero_chunks=set())
    with PseudoVolume(src, make_dest(tmp_path, len(data)), tmp_path / "state") as pv:
        f = pv.fetcher
        gate = threading.Event()
        writing = threading.Event()

        def slow_write(offset: int, chunk: bytes) -> None:  # the pool's writer, held
            writing.set()
            assert gate.wait(30)
            f.write_dest(offset, chunk)

        bg = threading.Thread(target=f.ensure, args=(5,),
                              kwargs={"background": True, "write": slow_write})
        bg.start()
        assert writing.wait(10)
        assert run(pv.read, 5 * CS, 4096) == data[5 * CS:5 * CS + 4096]
        assert src.reads == [5]  # the background's fetch, shared
        gate.set()
        bg.join(10)
        assert f.is_restored(5) and f.background_fetches == 1


def test_a_kill_with_dest_writes_pending_loses_nothing(tmp_path) -> None:
    data = os.urandom(8 * CS)
    src = MemorySource(data, CS, zero_chunks=set())
    dest = make_dest(tmp_path, len(data))
    pv = PseudoVolume(src, dest, tmp_path / "state")
    gate = gate_writes(pv.fetcher)
    for i in (1, 2, 6):  # three writes queued, the first one in progress
        assert run(pv.read, i * CS, 10) == data[i * CS:i * CS + 10]
    pv.write(2 * CS, b"\x05" * 4096)  # an acknowledged application write
    pv.sync_restored_map()  # names none of them: none is on DEST
    threading.Timer(0.2, gate.set).start()  # the write in progress finishes during the kill
    pv.abandon()
    pv = PseudoVolume(src, dest, tmp_path / "state")
    try:
        assert not any(pv.fetcher.is_restored(i) for i in range(8))
        model = bytearray(data)
        model[2 * CS:2 * CS + 4096] = b"\x05" * 4096
        assert pv.read(0, len(data)) == bytes(model)
        pv.start_restore()
        assert pv.wait_restored(30)
    finally:
        pv.close()
    assert dest.read_bytes() == data  # DEST: the backup only, every chunk once written


def test_a_failed_dest_write_leaves_the_chunk_unrestored(tmp_path) -> None:
    data = os.urandom(4 * CS)
    src = MemorySource(data, CS, zero_chunks=set())
    with PseudoVolume(src, make_dest(tmp_path, len(data)), tmp_path / "state") as pv:
        f = pv.fetcher
        write = f.write_dest
        fail = [True]

        def failing(offset: int, chunk: bytes | memoryview) -> None:
            if fail[0]:
                raise OSError(5, "Input/output error (test)")
            write(offset, chunk)

        f.write_dest = failing  # type: ignore[method-assign]
        assert pv.read(CS, 100) == data[CS:CS + 100]  # the reader has good bytes
        assert f.wait_writes(30)
        assert not f.is_restored(1)
        assert any("chunk 1" in e for e in f.stats()["errors"])
        fail[0] = False
        assert pv.read(CS, 100) == data[CS:CS + 100]  # fetched again, written this time
        assert f.wait_writes(30) and f.is_restored(1)
        assert src.reads == [1, 1]


class PrioritySource(MemorySource):
    """Records the nice of the thread reading each chunk."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data, CS, zero_chunks=set())
        self.nice: dict[int, int] = {}

    def read_chunk(self, index: int) -> bytes:
        self.nice[index] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        return super().read_chunk(index)


def test_an_on_demand_fetch_runs_at_a_raised_cpu_priority(tmp_path) -> None:
    # Under load, an on-demand read's p99 went to waiting for a CPU behind the pool.
    data = os.urandom(4 * CS)
    src = PrioritySource(data)
    f = Fetcher(src, make_dest(tmp_path, len(data)), tmp_path / "map", demand_rt=False)
    try:
        def mine() -> int:
            return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

        def demand() -> tuple[int, int, bytes]:
            before = mine()
            out = f.read(CS, 10)
            return before, mine(), out

        before, after, out = run(demand)
        assert out == data[CS:CS + 10]
        assert after == before, "the thread's own priority is given back"
        expected = fetcher_module.DEMAND_NICE if os.geteuid() == 0 else before
        assert src.nice[1] == min(before, expected)
        f.ensure(2, background=True)
        assert src.nice[2] == mine(), "the background restore keeps its priority"
    finally:
        f.close()


def test_a_zero_chunk_reads_as_zeros_before_and_after_its_dest_write(tmp_path) -> None:
    data = os.urandom(CS) + bytes(CS) + os.urandom(CS)
    src = MemorySource(data, CS)  # chunk 1: a zero chunk, never read
    dest = make_dest(tmp_path, len(data))  # garbage (0xee) where nothing is restored
    with PseudoVolume(src, dest, tmp_path / "state") as pv:
        gate = gate_writes(pv.fetcher)
        assert run(pv.read, CS - 10, 30) == data[CS - 10:CS + 20]
        assert run(pv.read, CS + 100, 50) == bytes(50)
        gate.set()
        assert pv.fetcher.wait_writes(30)
        assert pv.fetcher.is_restored(1) and pv.read(CS, CS) == bytes(CS)
        assert src.reads == [0]
    assert dest.read_bytes()[CS:2 * CS] == bytes(CS)
