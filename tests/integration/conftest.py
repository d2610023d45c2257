"""Shared fixtures for root tests: real ext4/xfs images filled with real data, loop devices.

Everything a fixture creates (loop devices, mounts) is removed in a finally block, even when the
test fails, because other people run tests on the same machine at the same time.
"""

from __future__ import annotations

import os
import random
import sqlite3
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest

from dmrecover.system import command
from dmrecover.system.loops import attach as loop_attach
from dmrecover.system.loops import detach as loop_detach

MiB = 1 << 20

# mkfs.xfs >= 5.19 refuses filesystems under 300 MB unless it believes it runs under fstests.
XFS_SMALL_ENV = {"TEST_DIR": "1", "TEST_DEV": "1", "QA_CHECK_FS": "1"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (loop devices, mounts)")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


def mkfs(path: str | os.PathLike[str], fstype: str, label: str = "dmrtest") -> None:
    """Make an ext4 or xfs filesystem on a file or device (small sizes allowed)."""
    if fstype == "ext4":
        command.run(["mkfs.ext4", "-q", "-F", "-L", label, str(path)])
    elif fstype == "xfs":
        command.run(["mkfs.xfs", "-q", "-f", "-L", label, str(path)], env=XFS_SMALL_ENV)
    else:
        raise ValueError(fstype)


@contextmanager
def attached(path: str | os.PathLike[str], read_only: bool = False) -> Iterator[str]:
    """A loop device over path, detached afterwards."""
    dev = loop_attach(path, read_only=read_only)
    try:
        yield dev
    finally:
        loop_detach(dev)


@contextmanager
def mounted(image_or_dev: str | os.PathLike[str], options: str = "") -> Iterator[Path]:
    """Mount an image file (through a loop device) or a block device on a temp directory."""
    mnt = Path(tempfile.mkdtemp(prefix="dmrtest-mnt."))
    dev = None
    try:
        src = str(image_or_dev)
        if not src.startswith("/dev/"):
            dev = loop_attach(src)
            src = dev
        argv = ["mount"] + (["-o", options] if options else []) + [src, str(mnt)]
        command.run(argv)
        try:
            yield mnt
        finally:
            command.run(["umount", str(mnt)])
    finally:
        if dev:
            loop_detach(dev)
        mnt.rmdir()


def fill_with_data(mnt: Path, seed: int = 0, budget: int = 24 * MiB) -> dict[str, bytes]:
    """Real mixed data: text files, random (incompressible) files, a SQLite database, a file
    with a zero region. Returns {relative path: content} for the non-database files."""
    rng = random.Random(seed)
    files: dict[str, bytes] = {}
    words = ["backup", "restore", "volume", "chunk", "kernel", "block", "device", "data",
             "application", "overlay", "journal", "sector", "inode", "extent"]
    (mnt / "text").mkdir()
    (mnt / "random").mkdir()
    text_total = budget // 3
    n = 0
    while text_total > 0:
        body = "\n".join(" ".join(rng.choices(words, k=12)) for _ in range(4000)).encode()
        files[f"text/doc{n:03d}.txt"] = body
        text_total -= len(body)
        n += 1
    rand_total = budget // 3
    n = 0
    while rand_total > 0:
        size = rng.randint(256 << 10, 3 * MiB)
        files[f"random/blob{n:03d}.bin"] = rng.randbytes(size)
        rand_total -= size
        n += 1
    files["sparse-ish.bin"] = rng.randbytes(300_000) + bytes(2 * MiB) + rng.randbytes(300_000)
    for rel, content in files.items():
        (mnt / rel).write_bytes(content)
    db = sqlite3.connect(mnt / "app.db")
    try:
        db.execute("create table t (id integer primary key, name text, payload blob)")
        db.executemany("insert into t (name, payload) values (?, ?)",
                       [(f"row {i}", rng.randbytes(200)) for i in range(budget // 3 // 300)])
        db.commit()
    finally:
        db.close()
    os.sync()
    return files


def make_fs_image(path: str | os.PathLike[str], fstype: str = "ext4", size: int = 48 * MiB,
                  seed: int = 0, budget: int | None = None) -> Path:
    """A sparse image file of `size` with a real filesystem filled with mixed data (about half
    of the space; the rest stays zeros)."""
    p = Path(path)
    with open(p, "wb") as f:
        f.truncate(size)
    mkfs(p, fstype)
    with mounted(p) as mnt:
        fill_with_data(mnt, seed=seed, budget=budget or size // 2)
    return p


@pytest.fixture
def loop_device() -> Iterator[Callable[..., str]]:
    """attach(path, read_only=False) -> /dev/loopN; every device is detached at the end."""
    devs: list[str] = []

    def attach(path: str | os.PathLike[str], read_only: bool = False) -> str:
        dev = loop_attach(path, read_only=read_only)
        devs.append(dev)
        return dev

    try:
        yield attach
    finally:
        for dev in reversed(devs):
            try:
                loop_detach(dev)
            except Exception as err:  # keep detaching the others
                print(f"cleanup: {dev}: {err}")


@pytest.fixture(scope="session")
def ext4_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 48 MiB ext4 image with real data (shared: do not modify; copy it first)."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    return make_fs_image(tmp_path_factory.mktemp("img") / "ext4.img", "ext4", seed=1)


@pytest.fixture(scope="session")
def xfs_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 64 MiB xfs image with real data (shared: do not modify; copy it first)."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    return make_fs_image(tmp_path_factory.mktemp("img") / "xfs.img", "xfs", size=64 * MiB,
                         seed=2)


def copy_sparse(src: Path, dst: Path) -> Path:
    """cp --sparse=always (keeps images small and fast to copy)."""
    command.run(["cp", "--sparse=always", str(src), str(dst)])
    return dst


@pytest.fixture(scope="session")
def fs_tools() -> SimpleNamespace:
    """The helpers above for tests (conftest modules cannot be imported reliably):
    make_fs_image, mkfs, fill_with_data, mounted, attached, copy_sparse."""
    return SimpleNamespace(make_fs_image=make_fs_image, mkfs=mkfs, fill_with_data=fill_with_data,
                           mounted=mounted, attached=attached, copy_sparse=copy_sparse)
