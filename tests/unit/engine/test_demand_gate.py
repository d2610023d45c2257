"""Background reads give way to on-demand reads (engine/priority.py): at most `busy_reads`
background chunk reads in flight while on-demand reads are busy (and `hold` seconds after),
first come first served; a background fetch an on-demand read waits for is let through the
gate and runs at the demand's CPU priority."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from dmrecover.engine import priority
from dmrecover.engine.fetcher import DEMAND_NICE, Fetcher, MemorySource
from dmrecover.engine.priority import ReadGate

CS = 64 * 1024
WAIT = 10.0  # generous: the host is shared


class HeldSource(MemorySource):
    """Reads of the chunks in `held` block until their event is set; counts the reads in
    progress per kind of caller and records each reading thread's id."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data, CS, zero_chunks=set())
        self.held: dict[int, threading.Event] = {}
        self.active: set[int] = set()
        self.peak = 0
        self.tids: dict[int, int] = {}
        self.nice_after: dict[int, int] = {}
        self._c = threading.Condition()

    def hold(self, *indexes: int) -> None:
        for i in indexes:
            self.held[i] = threading.Event()

    def read_chunk(self, index: int) -> bytes:
        with self._c:
            self.active.add(index)
            self.peak = max(self.peak, len(self.active))
            self.tids[index] = threading.get_native_id()
            self._c.notify_all()
        try:
            ev = self.held.get(index)
            if ev is not None:
                assert ev.wait(30), f"chunk {index} never released"
            return super().read_chunk(index)
        finally:
            with self._c:
                self.active.discard(index)
                self._c.notify_all()

    def wait_active(self, pred, timeout: float = WAIT) -> bool:  # noqa: ANN001
        with self._c:
            return self._c.wait_for(lambda: pred(self.active), timeout)


def make_fetcher(tmp_path: Path, nchunks: int, **kw) -> tuple[Fetcher, HeldSource, bytes]:
    data = os.urandom(nchunks * CS)
    src = HeldSource(data)
    dest = tmp_path / "dest.img"
    dest.write_bytes(b"\xee" * len(data))
    return Fetcher(src, dest, tmp_path / "map", **kw), src, data


def start(fn, *args, **kw) -> threading.Thread:  # noqa: ANN001
    t = threading.Thread(target=fn, args=args, kwargs=kw, daemon=True)
    t.start()
    return t


def wait_until(pred, timeout: float = WAIT) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.005)
    return pred()


@pytest.mark.parametrize("busy_reads, peak", [(1, 2), (None, 5)])
def test_background_reads_are_few_while_an_on_demand_read_is_pending(
        tmp_path, busy_reads: int | None, peak: int) -> None:
    # Four background fetches against one pending on-demand read: with the gate one of
    # them reads at a time (the demand read queued behind four 4 MiB reads before); without
    # it (None, the benchmarks' "before") all four read at once.
    f, src, data = make_fetcher(tmp_path, 8, busy_reads=busy_reads)
    try:
        src.hold(0, 1, 2, 3, 4)
        demand = start(f.read, 0, 10)
        assert src.wait_active(lambda a: 0 in a)
        pool = [start(f.ensure, i, background=True) for i in (1, 2, 3, 4)]
        assert src.wait_active(lambda a: len(a) >= 2)
        time.sleep(0.3)  # room for more reads to start, if the gate let them
        assert src.peak == peak, sorted(src.active)
        for ev in src.held.values():
            ev.set()
        for t in [demand, *pool]:
            t.join(WAIT)
            assert not t.is_alive()
        assert sorted(src.reads) == [0, 1, 2, 3, 4], "each chunk read once"
        assert all(f.is_restored(i) or i == 0 for i in range(5))
    finally:
        f.close()
    assert (tmp_path / "dest.img").read_bytes()[CS:5 * CS] == data[CS:5 * CS]


def test_the_gate_stays_shut_for_hold_seconds_after_the_demand() -> None:
    # The application's next read comes within milliseconds of its last: a gate that opened
    # the moment a fetch ended let the whole pool start reads just ahead of it.
    gate = ReadGate(1, hold=0.3)
    release = threading.Event()
    inside = threading.Event()

    def first() -> None:
        with gate.background():
            inside.set()
            release.wait(WAIT)

    t1 = start(first)
    assert inside.wait(WAIT)
    gate.demand_begin()
    gate.demand_end()
    ended = time.monotonic()
    admitted: list[float] = []

    def second() -> None:
        with gate.background():
            admitted.append(time.monotonic())

    t2 = start(second)
    t2.join(WAIT)
    assert admitted, "the second read was never admitted once the hold was over"
    assert admitted[0] - ended >= 0.29, admitted[0] - ended
    release.set()
    t1.join(WAIT)
    assert gate.held == 1 and gate.active == 0


def test_an_idle_gate_admits_every_read_at_once() -> None:
    gate = ReadGate(1, hold=10.0)  # no on-demand fetch yet: idle, whatever the hold
    with gate.background(), gate.background(), gate.background():
        assert gate.active == 3
    assert gate.held == 0


def test_waiting_background_reads_go_first_come_first_served() -> None:
    # The pool claims chunks in ascending order; admitted in another order, DEST's writes
    # and the read-ahead after the application's position went out of order.
    gate = ReadGate(1, hold=0.05)
    gate.demand_begin()  # busy until demand_end
    release = threading.Event()
    order: list[int] = []

    def reader(n: int, hold_first: bool = False) -> None:
        with gate.background():
            order.append(n)
            if hold_first:
                release.wait(WAIT)

    threads = [start(reader, 0, True)]
    assert wait_until(lambda: order == [0])
    for n in (1, 2, 3):
        threads.append(start(reader, n))
        assert wait_until(lambda n=n: len(gate._waiters) == n)
    release.set()
    for t in threads:
        t.join(WAIT)
    gate.demand_end()
    assert order == [0, 1, 2, 3]


def test_a_background_read_an_on_demand_read_waits_for_goes_first(tmp_path) -> None:
    # Chunk 2's background fetch waits at the gate (another on-demand read pending, one
    # background read in flight); an application read of chunk 2 must not wait for both.
    f, src, data = make_fetcher(tmp_path, 4, busy_reads=1, busy_hold=60.0)
    try:
        src.hold(0, 1)
        a = start(f.read, 0, 10)
        assert src.wait_active(lambda s: 0 in s)
        b1 = start(f.ensure, 1, background=True)
        assert src.wait_active(lambda s: 1 in s)
        b2 = start(f.ensure, 2, background=True)
        assert wait_until(lambda: len(f.gate._waiters) == 1)
        out: list[bytes] = []
        reader = start(lambda: out.append(f.read(2 * CS + 5, 10)))
        reader.join(WAIT)
        assert out == [data[2 * CS + 5:2 * CS + 15]], "the read waited behind the gate"
        assert src.active == {0, 1}, "the others are still held"
        assert src.reads.count(2) == 1, "chunk 2 read once: the background's fetch, shared"
        for ev in src.held.values():
            ev.set()
        for t in (a, b1, b2):
            t.join(WAIT)
            assert not t.is_alive()
    finally:
        f.close()


def sched(tid: int) -> tuple[int, int]:
    return os.sched_getscheduler(tid), os.getpriority(os.PRIO_PROCESS, tid)


@pytest.mark.parametrize("rt", [True, False])
def test_a_background_fetch_an_on_demand_read_waits_for_runs_at_its_priority(
        tmp_path, rt: bool) -> None:
    f, src, data = make_fetcher(tmp_path, 4, demand_rt=rt)
    try:
        src.hold(3)
        seen: dict[str, tuple[int, int]] = {}

        def background() -> None:
            seen["before"] = sched(threading.get_native_id())
            f.ensure(3, background=True)
            seen["after"] = sched(threading.get_native_id())

        bg = start(background)
        assert src.wait_active(lambda s: 3 in s)
        tid = src.tids[3]
        assert sched(tid) == seen["before"]
        out: list[bytes] = []
        reader = start(lambda: out.append(f.read(3 * CS, 10)))
        policy, nice = seen["before"]
        if os.geteuid() != 0:
            expected = seen["before"]  # not permitted: unchanged
        elif rt:
            expected = (os.SCHED_RR, nice)
        else:
            expected = (policy, min(nice, DEMAND_NICE))
        assert wait_until(lambda: sched(tid) == expected), sched(tid)
        src.held[3].set()
        reader.join(WAIT)
        bg.join(WAIT)
        assert out == [data[3 * CS:3 * CS + 10]]
        assert seen["after"] == seen["before"], "the background thread's priority is back"
        assert src.reads == [3]
    finally:
        f.close()


def test_busy_limit_must_be_positive() -> None:
    with pytest.raises(ValueError):
        ReadGate(0)


class PolicySource(MemorySource):
    """Records the scheduling policy of the thread reading each chunk."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data, CS, zero_chunks=set())
        self.policy: dict[int, int] = {}

    def read_chunk(self, index: int) -> bytes:
        self.policy[index] = os.sched_getscheduler(threading.get_native_id())
        return super().read_chunk(index)


def test_with_demand_rt_an_on_demand_fetch_runs_real_time_then_gets_its_policy_back(
        tmp_path) -> None:
    data = os.urandom(4 * CS)
    src = PolicySource(data)
    dest = tmp_path / "dest.img"
    dest.write_bytes(bytes(len(data)))
    f = Fetcher(src, dest, tmp_path / "map", demand_rt=True)
    try:
        out: dict[str, object] = {}

        def demand() -> None:
            tid = threading.get_native_id()
            nice = os.getpriority(os.PRIO_PROCESS, tid)
            out["data"] = f.read(CS, 10)
            out["after"] = (os.sched_getscheduler(tid), os.getpriority(os.PRIO_PROCESS, tid))
            out["before"] = (os.SCHED_OTHER, nice)

        t = start(demand)
        t.join(WAIT)
        assert out["data"] == data[CS:CS + 10]
        expected = os.SCHED_RR if os.geteuid() == 0 else os.SCHED_OTHER
        assert src.policy[1] == expected
        assert out["after"] == out["before"], "the thread's own scheduling is given back"
        f.ensure(2, background=True)
        assert src.policy[2] == os.SCHED_OTHER, "the background restore stays normal"
    finally:
        f.close()


def test_where_real_time_is_refused_an_on_demand_fetch_still_gets_the_nice(
        monkeypatch) -> None:
    # A cpu cgroup without real-time runtime refuses SCHED_RR (EPERM): the fetch must not
    # lose its raised priority altogether.
    def refuse(*_args) -> None:  # noqa: ANN002
        raise PermissionError(1, "Operation not permitted (test)")

    monkeypatch.setattr(priority.os, "sched_setscheduler", refuse)
    out: dict[str, object] = {}

    def fetch() -> None:
        tid = threading.get_native_id()
        before = os.getpriority(os.PRIO_PROCESS, tid)
        old = priority.boost(realtime=True)
        out["during"] = os.getpriority(os.PRIO_PROCESS, tid)
        if old is not None:
            priority.unboost(old)
        out["before"], out["after"] = before, os.getpriority(os.PRIO_PROCESS, tid)

    t = start(fetch)
    t.join(WAIT)
    expected = min(out["before"], DEMAND_NICE) if os.geteuid() == 0 else out["before"]
    assert out["during"] == expected
    assert out["after"] == out["before"]
