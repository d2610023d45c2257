"""Real filesystem images for root tests: ext4/xfs filled with real data, loop devices, mounts.

Used by the integration and kernel conftests (fixtures `ext4_image`, `xfs_image`, `fs_tools`,
`loop_device`) and by tests/kernel/powercut.py. Everything a helper creates is removed in a
finally block, even when the test fails: other people run tests on the same machine.
"""

from __future__ import annotations

import os
import random
import sqlite3
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dmrecover.demo import volume
from dmrecover.system import command, loops

MiB = 1 << 20
XFS_SMALL_ENV = volume.XFS_SMALL_ENV


def mkfs(path: str | os.PathLike[str], fstype: str, label: str = "dmrtest") -> None:
    """Make an ext4 or xfs filesystem on a file or device (small sizes allowed)."""
    volume.mkfs(path, fstype, label)


@contextmanager
def attached(path: str | os.PathLike[str], read_only: bool = False) -> Iterator[str]:
    """A loop device over path, detached afterwards."""
    dev = loops.attach(path, read_only=read_only)
    try:
        yield dev
    finally:
        loops.detach(dev)


@contextmanager
def mounted(image_or_dev: str | os.PathLike[str], options: str = "") -> Iterator[Path]:
    """Mount an image file (through a loop device) or a block device on a temp directory."""
    mnt = Path(tempfile.mkdtemp(prefix="dmrtest-mnt."))
    dev = None
    try:
        src = str(image_or_dev)
        if not src.startswith("/dev/"):
            dev = loops.attach(src)
            src = dev
        argv = ["mount"] + (["-o", options] if options else []) + [src, str(mnt)]
        command.run(argv)
        try:
            yield mnt
        finally:
            command.run(["umount", str(mnt)])
    finally:
        if dev:
            loops.detach(dev)
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


def copy_sparse(src: Path, dst: Path) -> Path:
    """cp --sparse=always (keeps images small and fast to copy)."""
    command.run(["cp", "--sparse=always", str(src), str(dst)])
    return dst
