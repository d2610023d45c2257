"""An XFS on the pseudo-volume whose server dies while XFS waits for its metadata writes.

XFS retries a failed metadata write for ever. Found by the randomized kill test: a session
killed while its resumed stack mounted an XFS left the mount in D state (log recovery done, the
pushes of what it recovered failing: the FUSE server was gone), and every later sync(2) on
the host waited behind its superblock lock. Here the same wait is made on purpose: metadata
writes fail (the log's still succeed, so XFS does not shut down by itself) and a remount
read-only waits for them (it pushes all metadata out, as the mount did); then the server is
killed and the teardown of a dead session's stack must end the wait and leave no mount or
loop. Without the fix the remount waits for good and the unmount is only a lazy one.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from dmrecover.backends.fuse.stack import FUSE_FILE, FUSE_SUBDIR, teardown_leftovers
from dmrecover.system import command, loops
from dmrecover.system.mounts import mount_at
from tests.helpers import images
from tests.helpers.waiting import wait_for

pytestmark = pytest.mark.root

MiB = 1 << 20
SIZE = 320 * MiB  # four 80 MiB allocation groups; the log sits in a middle one
FAIL_BELOW = 64 * MiB  # inside allocation group 0: its headers and the root directory


def _serve(data: bytes, dest: Path, state: Path, fail_flag: Path, ready: Path) -> None:
    """The child: a session's FUSE server whose writes below FAIL_BELOW fail once fail_flag
    exists."""
    from dmrecover.backends.fuse.server import FuseServer
    from dmrecover.engine.fetcher import MemorySource
    from dmrecover.engine.pseudovolume import PseudoVolume

    pv = PseudoVolume(MemorySource(data, 4 * MiB), dest, state / "engine")
    write = pv.write

    def failing_write(off: int, buf: bytes) -> int:
        if off < FAIL_BELOW and fail_flag.exists():
            raise OSError(errno.EIO, "metadata writes fail (test)")
        return write(off, buf)

    pv.write = failing_write  # type: ignore[method-assign]
    FuseServer(pv, state / FUSE_SUBDIR).start()
    ready.touch()
    while True:
        time.sleep(1)


def test_teardown_ends_an_xfs_waiting_on_a_dead_server(tmp_path: Path) -> None:
    image = tmp_path / "image.img"
    with open(image, "wb") as f:
        f.truncate(SIZE)
    images.mkfs(image, "xfs")
    data = image.read_bytes()
    image.unlink()
    dest = tmp_path / "dest.img"
    with open(dest, "wb") as f:
        f.truncate(SIZE)
    state, fail_flag, ready = tmp_path / "state", tmp_path / "fail", tmp_path / "ready"
    state.mkdir()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child never returns
        try:
            _serve(data, dest, state, fail_flag, ready)
        finally:
            os._exit(1)
    waiter = None
    try:
        assert wait_for(ready.exists, 30), "the FUSE server did not start"
        loop = loops.attach(str(state / FUSE_SUBDIR / FUSE_FILE), direct_io=True)
        command.run(["mount", "-t", "xfs", "-o", "nouuid", loop, str(mnt)])
        fail_flag.touch()
        for i in range(64):
            (mnt / f"file{i}").write_bytes(b"x" * 100)
        os.sync()  # the log is written (it succeeds); the metadata is left to XFS's pushes
        waiter = subprocess.Popen(["mount", "-o", "remount,ro", str(mnt)])
        time.sleep(3)
        assert waiter.poll() is None, "the remount should wait for the failing metadata writes"
        os.kill(pid, signal.SIGKILL)  # the session process dies
        os.waitpid(pid, 0)
        pid = 0
        done = teardown_leftovers(str(state))
        assert f"made the XFS on {loop} give up its failed writes" in done
        waiter.wait(30)  # ended: XFS gave up (and shut down) instead of waiting for ever
        assert mount_at(str(mnt)) is None
        assert wait_for(lambda: loops.backing_file(loop) is None, 30), f"{loop} still attached"
    finally:
        if waiter is not None and waiter.poll() is None:
            waiter.kill()
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        teardown_leftovers(str(state))
