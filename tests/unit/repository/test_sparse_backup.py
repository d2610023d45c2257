"""Backup of a sparse source: its holes are not read (SEEK_DATA/SEEK_HOLE), and the backup
still holds every byte (holes as zero chunks)."""

from __future__ import annotations

import os
import random

import dmrecover.repository.backup as backup_mod
from dmrecover.repository.backup import backup
from dmrecover.repository.repo import Repository
from dmrecover.repository.source import RepositorySource

MiB = 1 << 20
CS = 1 * MiB


def test_holes_of_a_sparse_source_are_not_read(tmp_path, monkeypatch) -> None:
    size = 1 << 30  # 1 GiB, three small pieces of data in it
    src = tmp_path / "sparse.img"
    rnd = random.Random(5)
    pieces = {0: rnd.randbytes(4096), 300 * MiB + 5000: rnd.randbytes(70000),
              size - 10: rnd.randbytes(10)}
    with open(src, "wb") as f:
        f.truncate(size)
        for off, data in pieces.items():
            f.seek(off)
            f.write(data)
    read: list[int] = []
    real = backup_mod._pread_full

    def counting(fd: int, length: int, offset: int, source: str) -> bytes:
        read.append(length)
        return real(fd, length, offset, source)

    monkeypatch.setattr(backup_mod, "_pread_full", counting)
    repo = Repository.init(tmp_path / "repo")
    m = backup(src, repo, chunk_size=CS, workers=2)
    # Only the chunks holding data are read (a piece may straddle two chunks).
    assert sum(read) <= 5 * CS
    present = [i for i, d in enumerate(m.chunks) if d is not None]
    assert present == [0, 300, 1023]
    assert m.stats["zero_chunks"] == 1024 - 3
    rs = RepositorySource(Repository.open(tmp_path / "repo"), m)
    for off, data in pieces.items():
        i = off // CS
        chunk = rs.read_chunk(i)
        assert chunk[off - i * CS:off - i * CS + len(data)] == data
    assert rs.is_zero(1) and rs.is_zero(1022)


def test_a_source_without_holes_is_read_whole(tmp_path, monkeypatch) -> None:
    src = tmp_path / "full.img"
    data = os.urandom(8 * CS + 123)
    src.write_bytes(data)
    read: list[int] = []
    real = backup_mod._pread_full
    monkeypatch.setattr(backup_mod, "_pread_full",
                        lambda fd, n, off, s: read.append(n) or real(fd, n, off, s))
    repo = Repository.init(tmp_path / "repo")
    m = backup(src, repo, chunk_size=CS, workers=2)
    assert sum(read) == len(data) and None not in m.chunks
    rs = RepositorySource(Repository.open(tmp_path / "repo"), m)
    assert b"".join(rs.read_chunk(i) for i in range(9)) == data
