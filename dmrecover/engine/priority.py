"""On-demand fetches before the background restore: the CPU priority of a thread fetching on
demand (`boost`), and the gate that keeps background chunk reads few while on-demand reads
are busy (`ReadGate`).

CPU: a thread fetching on demand runs at the real-time priority SCHED_RR DEMAND_RT_PRIORITY
for the fetch (root; unchanged when not permitted; `realtime=False`: at nice DEMAND_NICE),
then gets its own scheduling back. Measured under bench_scale's load on a busy 2-core host,
an on-demand chunk read spent most of its p99 waiting for a CPU (run queue 253 of 265 ms)
behind the pool's four threads and everything else. Nice -10 took that to 45-65 ms but no
lower: a nice ranks a thread only within its own group (autogroup, cpu cgroups), and a VM in
its own cgroup got its share whatever the nice; SCHED_RR runs before every normal thread
(run queue at p99 0-3 ms). It is bounded: one chunk's read and check per fetching thread,
sleeping (not spinning) in any wait, and the kernel's real-time throttling keeps 5% of the CPU
for the rest. The background restore keeps its normal priority: lowering it instead would slow
it against the offline restore and stall the demand thread behind a descheduled GIL holder. A
background fetch that an on-demand read waits for (the same chunk) gets the demand's priority
until its bytes are read (`boost(tid)`).

Storage: the repository's disk takes many requests at once (virtio: 128), so the I/O
scheduler never holds a background read back for a later on-demand one, and I/O priorities
change nothing: an on-demand read queued behind the pool's four 4 MiB reads waited for all of
them. `ReadGate` admits background reads: any number while the demand is idle, at most
`busy_limit` (default 1) in flight while it is busy, that is while an on-demand fetch is
pending or one ended less than `hold` seconds ago (an application that reads unrestored data
comes back within milliseconds; without the hold, every end of a fetch released the whole
pool at once, just before the application's next read). A background read an on-demand read
waits for (its chunk) is let through at once (`urgent`). The Fetcher leaves the gate open by
default (busy_reads=None): measured, busy_reads=1 took the on-demand p99 from 2.8-14.3x to
2.2-6.0x of a chunk read but the background restore from 0.85-1.2x to 0.72-1.01x of the
offline restore, whose goal is 0.8x (docs/architecture.md, Performance).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

# The CPU priority (nice) of a thread while it fetches on demand.
DEMAND_NICE = -10
# The real-time priority of an on-demand fetch (Fetcher demand_rt): the lowest one, above
# every normal thread.
DEMAND_RT_PRIORITY = 1
# Seconds the demand stays busy after its last on-demand fetch ended (ReadGate).
DEFAULT_HOLD = 0.05


def boost(tid: int | None = None, realtime: bool = False) -> int | None:
    """Raise thread `tid`'s (default: the caller's) CPU priority to DEMAND_NICE, or with
    `realtime` to SCHED_RR DEMAND_RT_PRIORITY (DEMAND_NICE where that is not permitted);
    returns its nice to restore (None: unchanged: already higher or real-time, gone, or not
    permitted)."""
    tid = threading.get_native_id() if tid is None else tid
    try:
        old = os.getpriority(os.PRIO_PROCESS, tid)
        if os.sched_getscheduler(tid) != os.SCHED_OTHER:
            return None
        if realtime:
            try:
                os.sched_setscheduler(tid, os.SCHED_RR, os.sched_param(DEMAND_RT_PRIORITY))
                return old
            except PermissionError:  # e.g. a cpu cgroup without real-time time: the nice
                pass
        if old <= DEMAND_NICE:
            return None
        os.setpriority(os.PRIO_PROCESS, tid, DEMAND_NICE)
    except OSError:  # not root (EACCES, EPERM), or the thread is gone (ESRCH)
        return None
    return old


def unboost(nice: int, tid: int | None = None) -> None:
    """Give thread `tid` (default: the caller) its scheduling back: SCHED_OTHER at `nice`
    (lowering a priority is always permitted)."""
    tid = threading.get_native_id() if tid is None else tid
    try:
        if os.sched_getscheduler(tid) != os.SCHED_OTHER:
            os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
        os.setpriority(os.PRIO_PROCESS, tid, nice)
    except OSError as err:  # pragma: no cover - only a vanished thread could
        log.debug("restoring a thread's priority failed: %s", err)


class ReadGate:
    """Admission of background chunk reads (module doc, Storage). Thread-safe.

    busy_limit: background reads in flight at most while the demand is busy (>= 1, so the
        restore always progresses); None: no gate (every read admitted at once).
    hold: seconds the demand stays busy after its last on-demand fetch ended.
    """

    def __init__(self, busy_limit: int | None = 1, hold: float = DEFAULT_HOLD,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if busy_limit is not None and busy_limit < 1:
            raise ValueError(f"busy_limit must be >= 1 or None, not {busy_limit}")
        self.busy_limit = busy_limit
        self.hold = hold
        self._clock = clock
        self._cond = threading.Condition(threading.Lock())
        self._pending = 0        # on-demand fetches in progress
        self._ended = -1e18      # clock() when the last one ended
        self._active = 0         # background reads admitted and not yet done
        self._waiters: deque[object] = deque()  # background reads waiting, first come first
        self.held = 0            # background reads that had to wait (stats, tests)

    def demand_begin(self) -> None:
        """An on-demand fetch starts (the demand is busy until demand_end + hold)."""
        with self._cond:
            self._pending += 1

    def demand_end(self) -> None:
        """An on-demand fetch is over."""
        with self._cond:
            self._pending -= 1
            self._ended = self._clock()
            self._cond.notify_all()  # their waits now end at the hold's end

    def wake(self) -> None:
        """Re-check the waiting reads (one of them became urgent)."""
        with self._cond:
            self._cond.notify_all()

    @property
    def active(self) -> int:
        """Background reads in flight."""
        return self._active

    def busy_for(self) -> float | None:
        """Seconds the demand stays busy at least (0.0: idle; None: until an on-demand fetch
        ends). Caller holds the condition's lock."""
        if self._pending:
            return None
        return max(0.0, self._ended + self.hold - self._clock())

    @contextmanager
    def background(self, urgent: Callable[[], bool] = lambda: False) -> Iterator[None]:
        """Hold one background read's place: waits while the demand is busy and busy_limit
        reads are in flight, unless urgent() (an on-demand read waits for this one). Waiting
        reads go in the order they came (the pool claims chunks in ascending order)."""
        if self.busy_limit is None:
            yield
            return
        ticket = object()
        with self._cond:
            self._waiters.append(ticket)
            waited = False
            try:
                while not urgent():
                    left = self.busy_for()
                    if left == 0.0 or (self._waiters[0] is ticket
                                       and self._active < self.busy_limit):
                        break
                    waited = True
                    self._cond.wait(left)
            finally:
                self._waiters.remove(ticket)
                self._cond.notify_all()  # the next one may be first now
            self.held += waited
            self._active += 1
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                self._cond.notify_all()
