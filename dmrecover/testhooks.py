"""Test-only hooks, all in one place.

The test suites need to make a set-up step fail, slow the background restore down so that an
application really runs during it, and hold the dm merge open long enough to cut the power in
the middle of it. Each hook is an environment variable, and every one of them is ignored unless
`DMRECOVER_TEST_HOOKS=1` is set as well, so a stray variable in a unit file or a shell profile
can never slow down or break a real recovery. The session's boot unit never sets it.

| variable                          | effect                                                   |
| --------------------------------- | -------------------------------------------------------- |
| DMRECOVER_FAIL_AT=<step>          | `fault_point(step)` raises StackError before the step    |
| DMRECOVER_TEST_RESTORE_DELAY=<s>  | the background restorer sleeps s seconds per chunk;     |
|                                   | dm-clone hydrates one region at a time under it          |
| DMRECOVER_TEST_RESTORE_HOLD=<path> | the background restorer claims no chunk while the file  |
|                                   | exists (on-demand fetches go on): the test releases it   |
| DMRECOVER_TEST_MERGE_PAUSE=<s>    | the dm merge waits s seconds before it starts; dm-clone  |
|                                   | holds its swap with the linear table loaded              |
| DMRECOVER_TEST_CHECKPOINT_LOG_BYTES=<n> | the overlay checkpoints once its log holds n bytes |
| DMRECOVER_TEST_PAUSE_AT=<step>    | `pause_point(step)` writes its pid to the file that     |
| DMRECOVER_TEST_PAUSE_FILE=<path>  | PAUSE_FILE names, then waits until that file is removed |

Steps named by `fault_point`: fuse, loop, mount, app, cutover-unmount, cutover-merge (both
backends), dm-probe, origin, cow, snapshot (dm backend). Steps named by `pause_point`:
lvs-created (live-restore: its LVs exist, its record is not written yet).
"""

from __future__ import annotations

import logging
import os
import threading
import time

from dmrecover.errors import StackError

log = logging.getLogger(__name__)

ENABLE_ENV = "DMRECOVER_TEST_HOOKS"
FAIL_AT_ENV = "DMRECOVER_FAIL_AT"
RESTORE_DELAY_ENV = "DMRECOVER_TEST_RESTORE_DELAY"
MERGE_PAUSE_ENV = "DMRECOVER_TEST_MERGE_PAUSE"
CHECKPOINT_LOG_ENV = "DMRECOVER_TEST_CHECKPOINT_LOG_BYTES"
PAUSE_AT_ENV = "DMRECOVER_TEST_PAUSE_AT"
PAUSE_FILE_ENV = "DMRECOVER_TEST_PAUSE_FILE"
RESTORE_HOLD_ENV = "DMRECOVER_TEST_RESTORE_HOLD"
#: The longest a pause_point waits for the test to release it (a test that died).
PAUSE_LIMIT = 600.0

#: Every variable a test may set; test harnesses pass exactly these to the session process.
HOOK_ENVS = (ENABLE_ENV, FAIL_AT_ENV, RESTORE_DELAY_ENV, MERGE_PAUSE_ENV, CHECKPOINT_LOG_ENV,
             PAUSE_AT_ENV, PAUSE_FILE_ENV, RESTORE_HOLD_ENV)


def enabled() -> bool:
    """True only when the test hooks were switched on explicitly."""
    return os.environ.get(ENABLE_ENV) == "1"


def _seconds(name: str) -> float:
    if not enabled():
        return 0.0
    try:
        value = float(os.environ.get(name) or 0)
    except ValueError:
        log.warning("ignoring %s=%r: not a number", name, os.environ.get(name))
        return 0.0
    return max(value, 0.0)


def _wait_removed(path: str, stop: threading.Event | None = None) -> None:
    """Wait until the test removes `path`, stop is set, or PAUSE_LIMIT has passed (a test
    that died)."""
    stop = stop or threading.Event()
    deadline = time.monotonic() + PAUSE_LIMIT
    while os.path.exists(path) and time.monotonic() < deadline and not stop.is_set():
        stop.wait(0.05)


def fault_point(step: str) -> None:
    """Raise StackError when the test hooks are on and DMRECOVER_FAIL_AT names this step."""
    if enabled() and os.environ.get(FAIL_AT_ENV) == step:
        raise StackError(f"injected failure at step {step} ({FAIL_AT_ENV})")


def restore_delay() -> float:
    """Seconds the background restorer sleeps per chunk (0 unless a test asked)."""
    return _seconds(RESTORE_DELAY_ENV)


def restore_hold(stop: threading.Event) -> None:
    """While the hooks are on and the file DMRECOVER_TEST_RESTORE_HOLD names exists, wait
    (PAUSE_LIMIT at most, or until stop is set): the background restore stays where it is for
    as long as a test needs, however fast or slow the machine, while the application's
    on-demand fetches go on. Called before a chunk is claimed, never while one is in flight,
    so no read of the application ever waits on the hold."""
    path = os.environ.get(RESTORE_HOLD_ENV)
    if not (path and enabled() and os.path.exists(path)):
        return
    log.info("background restore held until %s is removed (%s)", path, RESTORE_HOLD_ENV)
    _wait_removed(path, stop)


def merge_pause() -> float:
    """Seconds the dm merge waits before it starts (0 unless a test asked)."""
    return _seconds(MERGE_PAUSE_ENV)


def checkpoint_log_bytes() -> int | None:
    """The overlay's checkpoint threshold a test asked for (small: the kill test lands in a
    checkpoint), or None for the engine's own."""
    if not enabled():
        return None
    try:
        value = int(os.environ.get(CHECKPOINT_LOG_ENV) or 0)
    except ValueError:
        log.warning("ignoring %s=%r: not a number", CHECKPOINT_LOG_ENV,
                    os.environ.get(CHECKPOINT_LOG_ENV))
        return None
    return value if value > 0 else None


def pause_point(step: str) -> None:
    """When the test hooks are on and DMRECOVER_TEST_PAUSE_AT names this step: write this
    process's pid to DMRECOVER_TEST_PAUSE_FILE, then wait until the test removes that file
    (or kills this process: the window a crash test needs), PAUSE_LIMIT at most."""
    path = os.environ.get(PAUSE_FILE_ENV)
    if not (enabled() and path and os.environ.get(PAUSE_AT_ENV) == step):
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:  # test-only: the test polls for the whole file
        f.write(f"{os.getpid()}\n")
    os.rename(tmp, path)
    log.info("paused at step %s until %s is removed (%s)", step, path, PAUSE_AT_ENV)
    _wait_removed(path)
