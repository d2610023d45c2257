"""SIGKILL of the process serving the pseudo-volume (root): every write the filesystem saw
acknowledged by fsync is there after the engine is reopened on the same state dir.

For the filesystem above the loop device, killing the engine is a power cut of its disk:
whatever it had not flushed is gone, whatever an fsync returned for must survive.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dmrecover.backends.fuse.server import FuseServer
from dmrecover.engine.fetcher import MemorySource
from dmrecover.engine.pseudovolume import PseudoVolume
from dmrecover.errors import StackError
from dmrecover.system import command
from dmrecover.system.loops import attach as loop_attach
from dmrecover.system.loops import detach as loop_detach

pytestmark = pytest.mark.root

MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[2]

SERVER = """
import sys, time
from pathlib import Path
from dmrecover.engine.fetcher import MemorySource
from dmrecover.backends.fuse.server import FuseServer
from dmrecover.engine.pseudovolume import PseudoVolume

image, dest, state, mnt, ready = sys.argv[1:6]
src = MemorySource(Path(image).read_bytes(), 1 << 20, delay=0.02)  # a slow repository
pv = PseudoVolume(src, dest, state)
srv = FuseServer(pv, mnt)
srv.start()
pv.start_restore()
Path(ready).write_text("ok")
while True:
    time.sleep(1)
"""


def start_server(image: Path, dest: Path, state: Path, mnt: Path) -> subprocess.Popen:
    ready = state.parent / "ready"
    ready.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(image), str(dest), str(state),
                             str(mnt), str(ready)], env=env)
    for _ in range(200):
        if ready.exists():
            return proc
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("server did not start")


class CrashStack:
    """ext4 on a loop device over the FUSE volume of an engine server in a child process.

    `up()` starts it (again, on the same state dir), `kill()` is the power cut (SIGKILL),
    `clear()` is what an operator's cleanup does after it (lazy unmounts, loop detached);
    `close()` removes whatever is left, whatever happened.
    """

    def __init__(self, image: Path, dest: Path, state: Path, fuse_mnt: Path) -> None:
        self.image, self.dest, self.state, self.fuse_mnt = image, dest, state, fuse_mnt
        self.fs_mnt = Path(tempfile.mkdtemp(prefix="dmrtest-crash-mnt."))
        self.procs: list[subprocess.Popen] = []
        self.loops: list[str] = []
        self.mounted: list[Path] = []

    def up(self) -> Path:
        self.procs.append(start_server(self.image, self.dest, self.state, self.fuse_mnt))
        self.loops.append(loop_attach(self.fuse_mnt / "volume"))
        command.run(["mount", "-t", "ext4", self.loops[-1], str(self.fs_mnt)])
        self.mounted.append(self.fs_mnt)
        return self.fs_mnt

    def kill(self) -> None:
        self.procs[-1].send_signal(signal.SIGKILL)
        self.procs[-1].wait(10)

    def clear(self) -> None:
        command.run(["umount", "-l", str(self.mounted.pop())])
        loop_detach(self.loops.pop())
        command.run(["umount", "-l", str(self.fuse_mnt)])

    def close(self) -> None:
        for m in reversed(self.mounted):
            command.run(["umount", str(m)], check=False)
        for dev in reversed(self.loops):
            try:
                loop_detach(dev)
            except Exception as err:  # keep cleaning up
                print(f"cleanup: {dev}: {err}")
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
        command.run(["umount", "-l", str(self.fuse_mnt)], check=False)
        self.fs_mnt.rmdir()


MakeStack = Callable[[Path, Path], CrashStack]


@pytest.fixture
def crash_stack(tmp_path: Path) -> Iterator[MakeStack]:
    """make(image, dest) -> a CrashStack with its state dir and FUSE mount in tmp_path."""
    made: list[CrashStack] = []

    def make(image: Path, dest: Path) -> CrashStack:
        made.append(CrashStack(image, dest, tmp_path / "state", tmp_path / "fuse"))
        return made[-1]

    try:
        yield make
    finally:
        for stack in made:
            stack.close()


def test_sigkill_of_the_engine_loses_no_fsynced_write(ext4_image: Path, tmp_path: Path,
                                                      crash_stack: MakeStack) -> None:
    dest = tmp_path / "dest.img"
    with open(dest, "wb") as f:
        f.truncate(ext4_image.stat().st_size)
    stack = crash_stack(ext4_image, dest)
    acked: dict[str, str] = {}
    rng = random.Random(11)
    fs_mnt = stack.up()
    (fs_mnt / "acked").mkdir()
    dfd = os.open(fs_mnt / "acked", os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i in range(60):
            body = rng.randbytes(rng.randint(100, 200_000))
            name = f"acked/f{i:03d}"
            with open(fs_mnt / name, "wb") as f:
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
            os.fsync(dfd)  # the new name is durable too
            acked[name] = hashlib.sha256(body).hexdigest()
        # unacknowledged work in flight when the engine dies
        with open(fs_mnt / "acked" / "unsynced", "wb") as f:
            f.write(b"x" * 300_000)
    finally:
        os.close(dfd)
    stack.kill()
    stack.clear()
    assert (stack.state / "overlay.log").stat().st_size > 0  # recovery has work to do
    # resume on the same state dir
    fs_mnt = stack.up()
    for name, digest in acked.items():
        assert hashlib.sha256((fs_mnt / name).read_bytes()).hexdigest() == digest, name
    r = command.run(["cat", "/proc/mounts"])
    assert str(fs_mnt) in r.stdout


def test_sigkill_of_the_engine_keeps_every_sqlite_commit(tmp_path: Path,
                                                         crash_stack: MakeStack) -> None:
    """A real database committing through the stack. Note synchronous=EXTRA: in DELETE journal
    mode, FULL does not sync the directory after the journal unlink that commits, and the
    last commit is lost on a power cut (measured here: 199 of 200 after a kill with FULL,
    200 of 200 with EXTRA). The engine kills are power cuts for the filesystem above."""
    image = tmp_path / "fs.img"
    with open(image, "wb") as f:
        f.truncate(32 * MiB)
    command.run(["mkfs.ext4", "-q", "-F", str(image)])
    dest = tmp_path / "dest.img"
    with open(dest, "wb") as f:
        f.truncate(32 * MiB)
    stack = crash_stack(image, dest)
    fs_mnt = stack.up()
    db = sqlite3.connect(fs_mnt / "app.db", isolation_level=None)
    db.execute("PRAGMA journal_mode=DELETE")
    db.execute("PRAGMA synchronous=EXTRA")
    db.execute("create table r (k integer primary key, v blob)")
    acked = 0
    for i in range(150):
        db.execute("insert into r values (?, ?)", (i, os.urandom(500)))
        acked = i + 1
    stack.kill()
    try:
        db.close()
    except sqlite3.Error:
        pass
    stack.clear()
    fs_mnt = stack.up()
    db = sqlite3.connect(fs_mnt / "app.db")
    try:
        assert db.execute("select count(*) from r").fetchone()[0] == acked
        assert db.execute("pragma integrity_check").fetchone()[0] == "ok"
    finally:
        db.close()


def test_start_on_a_stale_mount_is_a_clear_error(tmp_path: Path) -> None:
    image = tmp_path / "img"
    image.write_bytes(os.urandom(2 * MiB))
    dest = tmp_path / "dest"
    dest.write_bytes(bytes(2 * MiB))
    fuse_mnt = tmp_path / "fuse"
    proc = start_server(image, dest, tmp_path / "state", fuse_mnt)
    try:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        pv = PseudoVolume(MemorySource(image.read_bytes(), MiB), dest, tmp_path / "state2")
        try:
            with pytest.raises(StackError, match="mount point"):
                FuseServer(pv, fuse_mnt).start()
        finally:
            pv.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        command.run(["umount", "-l", str(fuse_mnt)], check=False)
