"""The portable presentation end to end (root): a backed-up ext4/xfs volume served through
PseudoVolume + FUSE + loop, mounted, read and written while the restore runs, then merged into
DEST, which must then hold every original file and every write."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import sqlite3
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from dmrecover.backends.fuse.server import FuseServer
from dmrecover.engine.fetcher import MemorySource
from dmrecover.engine.pseudovolume import PseudoVolume
from dmrecover.repository.backup import backup
from dmrecover.repository.repo import Repository
from dmrecover.repository.source import RepositorySource
from dmrecover.system import command, loops
from dmrecover.system.loops import attach as loop_attach
from dmrecover.system.loops import detach as loop_detach

pytestmark = pytest.mark.root

MiB = 1 << 20


def tree_digests(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if rel.startswith("lost+found"):
                continue
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@contextmanager
def mount_dev(dev: str, fstype: str, options: str = "") -> Iterator[Path]:
    mnt = Path(tempfile.mkdtemp(prefix="dmrtest-fuse-mnt."))
    opts = [o for o in (options, "nouuid" if fstype == "xfs" else "") if o]
    try:
        command.run(["mount", "-t", fstype, *(["-o", ",".join(opts)] if opts else []), dev,
                     str(mnt)])
        try:
            yield mnt
        finally:
            command.run(["umount", str(mnt)])
    finally:
        mnt.rmdir()


@contextmanager
def served(volume: PseudoVolume, where: Path, *, read_only: bool = False
           ) -> Iterator[tuple[FuseServer, str]]:
    """FUSE server + loop device over its file; both torn down in order, even on failure."""
    srv = FuseServer(volume, where, read_only=read_only)
    srv.start()
    dev = None
    try:
        dev = loop_attach(srv.path, read_only=read_only)
        yield srv, dev
    finally:
        try:
            if dev:
                loop_detach(dev)
        finally:
            srv.stop()


def blank(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(b"\xee" * MiB)
        f.write(b"\xee" * (size % MiB))
    return path


@pytest.mark.parametrize("fstype", ["ext4", "xfs"])
def test_live_restore_through_fuse_and_loop(request, tmp_path: Path, fstype: str) -> None:
    image: Path = request.getfixturevalue(f"{fstype}_image")
    with mount_dev(str(image), fstype, "ro,loop") as mnt:
        original = tree_digests(mnt)
    assert len(original) > 10
    repo = Repository.init(tmp_path / "repo")
    manifest = backup(image, repo, chunk_size=1 * MiB)
    source = RepositorySource(repo, manifest)
    dest = blank(tmp_path / "dest.img", manifest.size)
    pv = PseudoVolume(source, dest, tmp_path / "state")
    flushes: list[float] = []
    engine_flush = pv.flush

    def counting_flush() -> None:  # a spy: the real flush runs
        engine_flush()
        flushes.append(time.monotonic())

    pv.flush = counting_flush  # type: ignore[method-assign]
    rng = random.Random(7)
    new_files = {f"new/f{i}.bin": rng.randbytes(rng.randint(1, 700_000)) for i in range(8)}
    try:
        with served(pv, tmp_path / "fuse") as (srv, dev), mount_dev(dev, fstype) as live:
            assert loops.loop_of(srv.path) == [dev]
            # reads of data not restored yet: everything is fetched on demand
            assert tree_digests(live) == original
            assert pv.stats()["demand_fetches"] > 0
            pv.start_restore()  # background restore while the application writes
            (live / "new").mkdir()
            for rel, content in new_files.items():
                with open(live / rel, "wb") as f:
                    f.write(content)
                    f.flush()
                    os.fsync(f.fileno())
            # an fsync inside the filesystem reaches the engine (ext4/xfs -> loop flush ->
            # FUSE fsync -> PseudoVolume.flush) before it returns
            assert flushes
            victim = sorted(k for k in original if k.startswith("random/"))[0]
            (live / victim).unlink()
            db = sqlite3.connect(live / "app.db")
            db.execute("insert into t (name, payload) values ('live', x'00ff')")
            db.commit()
            db.close()
            with pytest.raises(OSError):  # the volume file refuses to change size
                os.truncate(srv.path, 10)
            assert pv.wait_restored(60)
            os.sync()
        assert pv.stats()["overlay_bytes"] > 0
        pv.merge_overlay_into_dest()
        pv.discard_overlay()
    finally:
        pv.close()
    expected = {k: v for k, v in original.items() if k != victim and k != "app.db"}
    expected.update({k: hashlib.sha256(v).hexdigest() for k, v in new_files.items()})
    with mount_dev(str(dest), fstype, "loop") as final:
        got = tree_digests(final)
        db = sqlite3.connect(final / "app.db")
        rows = db.execute("select count(*) from t where name = 'live'").fetchone()[0]
        db.close()
    got.pop("app.db")
    assert got == expected
    assert rows == 1


def test_read_only_origin_serves_the_backup(ext4_image: Path, tmp_path: Path) -> None:
    data = ext4_image.read_bytes()
    source = MemorySource(data, 4 * MiB)
    dest = blank(tmp_path / "dest.img", len(data))
    with mount_dev(str(ext4_image), "ext4", "ro,loop") as mnt:
        original = tree_digests(mnt)
    with PseudoVolume(source, dest, tmp_path / "state", read_only=True) as pv:
        with served(pv, tmp_path / "fuse", read_only=True) as (srv, dev):
            with pytest.raises(OSError) as e:
                open(srv.path, "r+b")
            assert e.value.errno in (errno.EROFS, errno.EACCES)
            with mount_dev(dev, "ext4", "ro,noload") as live:
                assert tree_digests(live) == original
        assert 0 < pv.stats()["restored_chunks"]
    assert not (tmp_path / "state" / "overlay.img").exists()
    # what was fetched is on DEST, byte for byte
    got = dest.read_bytes()
    cs = source.chunk_size
    for i in range(source.chunk_count):
        if pv.fetcher.is_restored(i):
            assert got[i * cs:(i + 1) * cs] == data[i * cs:(i + 1) * cs]


def test_stop_refuses_while_a_loop_device_holds_the_file(tmp_path: Path) -> None:
    data = random.Random(1).randbytes(8 * MiB)
    pv = PseudoVolume(MemorySource(data, MiB), blank(tmp_path / "d", len(data)),
                      tmp_path / "state")
    srv = FuseServer(pv, tmp_path / "fuse")
    srv.start()
    try:
        dev = loop_attach(srv.path)
        try:
            with pytest.raises(Exception, match="still attached"):
                srv.stop()
            with open(dev, "rb") as f:  # still served after the refused stop
                assert f.read(4096) == data[:4096]
        finally:
            loop_detach(dev)
    finally:
        srv.stop()
        pv.close()
    assert not any(tmp_path.joinpath("fuse").iterdir())


def test_fuse_read_errors_and_repository_outage(tmp_path: Path) -> None:
    """A corrupt chunk is EIO for its reads only; an outage shorter than the deadline is no
    error at all (the read waits), which the dm origin relies on."""
    data = random.Random(2).randbytes(8 * MiB)
    src = MemorySource(data, MiB)
    src.corrupt = {2}
    pv = PseudoVolume(src, blank(tmp_path / "d", len(data)), tmp_path / "state",
                      fetch_deadline=30)
    srv = FuseServer(pv, tmp_path / "fuse")
    srv.start()
    try:
        fd = os.open(srv.path, os.O_RDONLY)
        try:
            with pytest.raises(OSError) as e:
                os.pread(fd, 4096, 2 * MiB)
            assert e.value.errno == errno.EIO
            assert os.pread(fd, 4096, 0) == data[:4096]  # the server goes on
            src.unavailable = True
            threading.Timer(1.0, lambda: setattr(src, "unavailable", False)).start()
            t0 = time.monotonic()
            assert os.pread(fd, 4096, 5 * MiB) == data[5 * MiB:5 * MiB + 4096]
            assert time.monotonic() - t0 >= 0.9
            assert pv.stats()["retries"] > 0
        finally:
            os.close(fd)
    finally:
        srv.stop()
        pv.close()


def test_block_device_dest_gets_zero_chunks_and_data(tmp_path: Path) -> None:
    """DEST as a real block device: zero chunks via BLKZEROOUT, data chunks written, and the
    restored map synced; the device then holds the backup exactly."""
    rnd = random.Random(4)
    data = bytearray(rnd.randbytes(16 * MiB))
    for z in (1, 2, 7, 15):
        data[z * MiB:(z + 1) * MiB] = bytes(MiB)
    src = MemorySource(bytes(data), MiB)
    backing = blank(tmp_path / "backing", len(data))
    dev = loop_attach(backing)
    try:
        with PseudoVolume(src, dev, tmp_path / "state") as pv:
            assert pv.fetcher._is_blockdev
            pv.start_restore()
            assert pv.wait_restored(30)
            assert pv.read(0, len(data)) == bytes(data)
        assert sorted(set(src.reads)) == [i for i in range(16) if i not in (1, 2, 7, 15)]
        with open(dev, "rb") as f:
            assert f.read() == bytes(data)
    finally:
        loop_detach(dev)


class GatedSource(MemorySource):
    """A MemorySource whose chunk `slow` is read only once the test opens the gate."""

    def __init__(self, data: bytes, chunk_size: int, slow: int) -> None:
        super().__init__(data, chunk_size)
        self.slow = slow
        self.gate = threading.Event()
        self.waiting = threading.Event()

    def read_chunk(self, index: int) -> bytes:
        if index == self.slow:
            self.waiting.set()
            assert self.gate.wait(30), "the test never opened the gate"
        return super().read_chunk(index)


def test_a_blocked_fetch_holds_one_thread_the_others_serve(tmp_path: Path) -> None:
    """The pool: while one request waits for its chunk, reads of restored data, overlay
    writes and flushes still get answers; the blocked read then gets the right bytes."""
    data = random.Random(3).randbytes(8 * MiB)
    model = bytearray(data)
    src = GatedSource(data, MiB, slow=5)
    dest = blank(tmp_path / "d", len(data))
    pv = PseudoVolume(src, dest, tmp_path / "state")
    srv = FuseServer(pv, tmp_path / "fuse", threads=4)
    srv.start()
    try:
        fd = os.open(srv.path, os.O_RDWR)
        try:
            assert os.pread(fd, 4096, 2 * MiB) == data[2 * MiB:2 * MiB + 4096]  # restores 2
            blocked: list[bytes] = []
            t = threading.Thread(target=lambda: blocked.append(os.pread(fd, 4096, 5 * MiB)))
            t.start()
            assert src.waiting.wait(10)
            t0 = time.monotonic()
            for k in range(50):
                off = 2 * MiB + k * 8192
                assert os.pread(fd, 4096, off) == bytes(model[off:off + 4096])
            os.pwrite(fd, b"\x07" * 8192, 2 * MiB + 4096)
            model[2 * MiB + 4096:2 * MiB + 12288] = b"\x07" * 8192
            os.fsync(fd)
            assert os.pread(fd, 65536, 2 * MiB) == bytes(model[2 * MiB:2 * MiB + 65536])
            assert time.monotonic() - t0 < 10
            assert t.is_alive() and not blocked  # still waiting for its chunk
            src.gate.set()
            t.join(30)
            assert blocked == [data[5 * MiB:5 * MiB + 4096]]
        finally:
            os.close(fd)
    finally:
        src.gate.set()
        srv.stop()
        pv.close()
    assert not srv.running


def test_the_file_s_metadata_and_refusals(tmp_path: Path) -> None:
    """What the kernel asks besides reads and writes: the directory lists one file of the
    volume's size, mode 0600 root's; the size, mode and owner cannot change; a name that is
    not there is ENOENT; a large write and read go whole (1 MiB requests)."""
    data = random.Random(4).randbytes(4 * MiB + 4096)  # a short last chunk
    pv = PseudoVolume(MemorySource(data, MiB), blank(tmp_path / "d", len(data)),
                      tmp_path / "state")
    with FuseServer(pv, tmp_path / "fuse") as srv:
        assert os.listdir(srv.mountdir) == ["volume"]
        st = os.stat(srv.path)
        assert st.st_size == len(data) and st.st_uid == 0
        assert st.st_mode & 0o777 == 0o600
        with pytest.raises(FileNotFoundError):
            os.stat(srv.mountdir / "other")
        with pytest.raises(PermissionError):
            os.chmod(srv.path, 0o644)
        with pytest.raises(PermissionError):
            os.truncate(srv.path, 4096)
        os.truncate(srv.path, len(data))  # the same size: a no-op, accepted
        assert os.statvfs(srv.mountdir).f_blocks == (len(data) + 4095) // 4096
        fd = os.open(srv.path, os.O_RDWR)
        try:
            blob = random.Random(5).randbytes(MiB)
            assert os.pwrite(fd, blob, MiB) == MiB
            assert os.pread(fd, 3 * MiB, 0) == data[:MiB] + blob + data[2 * MiB:3 * MiB]
            assert os.pread(fd, 8192, len(data) - 4096) == data[-4096:]  # short at the end
            with pytest.raises(OSError) as err:
                os.pwrite(fd, b"x" * 8192, len(data) - 4096)  # beyond the end
            assert err.value.errno == errno.ENOSPC
        finally:
            os.close(fd)
    pv.close()
