"""Repository, backup, restore and verify on regular files (no root, no devices)."""

from __future__ import annotations

import errno
import json
import os
import random
import tempfile
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dmrecover.errors import (
    BackupNotFound,
    CorruptChunk,
    DeviceError,
    RepositoryError,
    RepositoryLocked,
    RepositoryUnavailable,
    UsageError,
)
from dmrecover.repository.backup import backup, check_chunk_size
from dmrecover.repository.manifest import Manifest, chunk_key
from dmrecover.repository.repo import Repository
from dmrecover.repository.restore import restore
from dmrecover.repository.store import LocalStorage, Storage
from dmrecover.repository.verify import verify

KiB = 1 << 10
MiB = 1 << 20
CS = 64 * KiB


def chunk_files(repo: Repository) -> list[str]:
    return repo.chunk_digests()


def make_source(path: Path, layout: str, seed: int = 0, cs: int = CS) -> bytes:
    """A file with one chunk per letter: r = random, z = zeros, t = text, and a short tail."""
    rng = random.Random(seed)
    parts = []
    for c in layout:
        if c == "r":
            parts.append(rng.randbytes(cs))
        elif c == "z":
            parts.append(bytes(cs))
        elif c == "t":
            parts.append(((b"some text line %d\n" % rng.randint(0, 9)) * cs)[:cs])
        elif c == "s":  # short last chunk
            parts.append(rng.randbytes(cs // 3))
    data = b"".join(parts)
    path.write_bytes(data)
    return data


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository.init(tmp_path / "repo")


# ---------------------------------------------------------------- init / open


def test_init_creates_layout(tmp_path: Path) -> None:
    r = Repository.init(tmp_path / "r")
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert cfg["format"] == "dmrecover-repo" and cfg["version"] == 2 and cfg["hash"] == "blake3"
    assert cfg["encryption"] == "none"
    for sub in ("chunks/00", "chunks/ff", "backups", "tmp"):
        assert (tmp_path / "r" / sub).is_dir()
    assert r.backups() == []


def test_open_missing(tmp_path: Path) -> None:
    with pytest.raises(RepositoryError, match="does not exist.*repo init"):
        Repository.open(tmp_path / "nope")


def test_open_not_a_repository(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    with pytest.raises(RepositoryError, match="not a dmrecover repository"):
        Repository.open(tmp_path / "d")
    (tmp_path / "d" / "config.json").write_text('{"format": "other"}')
    with pytest.raises(RepositoryError, match="not a dmrecover repository"):
        Repository.open(tmp_path / "d")
    (tmp_path / "f").write_text("x")
    with pytest.raises(RepositoryError, match="not a repository"):
        Repository.open(tmp_path / "f")


def test_init_refuses_non_empty(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x").write_text("x")
    with pytest.raises(RepositoryError, match="not empty"):
        Repository.init(tmp_path / "d")


# ---------------------------------------------------------------- backup


def test_chunk_size_rules() -> None:
    for ok in (64 * KiB, 1 * MiB, 4 * MiB, 16 * MiB):
        check_chunk_size(ok)
    for bad in (32 * KiB, 32 * MiB, 100 * KiB, 0):
        with pytest.raises(UsageError, match="chunk size"):
            check_chunk_size(bad)


def test_backup_restore_roundtrip_zero_elision(repo: Repository, tmp_path: Path) -> None:
    src = tmp_path / "src.img"
    data = make_source(src, "rzztrrzs")
    m = backup(src, repo, name="vol", chunk_size=CS)
    assert m.size == len(data) and m.chunk_count == 8 and m.chunk_length(7) == CS // 3
    assert [d is None for d in m.chunks] == [False, True, True, False, False, False, True, False]
    # every stored digest is a chunk file, zero chunks are not stored
    assert sorted(chunk_files(repo)) == sorted({d for d in m.chunks if d})
    assert m.stats["zero_chunks"] == 3 and m.stats["new_chunks"] == 5
    out = tmp_path / "out.img"
    restore(repo, m, out)
    assert out.read_bytes() == data
    # the zero chunks are holes: less space allocated than the file's size
    assert os.stat(out).st_blocks * 512 <= len(data) - 3 * CS + 64 * KiB
    # the repository's copy is the same manifest
    assert repo.manifest(m.id) == m
    assert m.fstype is None and m.source == str(src)


def test_dedup_within_and_between_backups(repo: Repository, tmp_path: Path) -> None:
    src = tmp_path / "src.img"
    data = bytearray(make_source(src, "rrrrrrrr", seed=1))
    data[2 * CS: 3 * CS] = data[0:CS]  # a repeated chunk inside one backup
    src.write_bytes(data)
    m1 = backup(src, repo, chunk_size=CS)
    assert len(chunk_files(repo)) == 7
    assert m1.stats["dedup_chunks"] == 1
    # change one chunk: the second backup stores only that one
    data[5 * CS + 100] ^= 0xFF
    src.write_bytes(data)
    m2 = backup(src, repo, chunk_size=CS)
    assert m2.stats["new_chunks"] == 1
    assert len(chunk_files(repo)) == 8
    assert [a == b for a, b in zip(m1.chunks, m2.chunks, strict=True)].count(False) == 1
    assert repo.read_chunk(m2, 5) == bytes(data[5 * CS: 6 * CS])


def test_backup_missing_source(repo: Repository, tmp_path: Path) -> None:
    with pytest.raises(DeviceError, match="does not exist"):
        backup(tmp_path / "nope.img", repo, chunk_size=CS)


def test_backup_is_atomic_no_manifest_on_failure(repo: Repository, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src.img"
    make_source(src, "rrrr")
    calls = {"n": 0}
    real = Repository.put_chunk

    def failing(self, digest, data, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, digest, data, **kw)

    monkeypatch.setattr(Repository, "put_chunk", failing)
    with pytest.raises(RepositoryError, match="cannot write a chunk.*No space"):
        backup(src, repo, chunk_size=CS)
    assert repo.backups() == []
    monkeypatch.undo()
    assert verify(repo) == []
    m = backup(src, repo, chunk_size=CS)
    assert m.stats["dedup_chunks"] >= 1  # chunks from the failed attempt are reused
    assert verify(repo) == []


# ---------------------------------------------------------------- manifests


def test_manifest_lookup(repo: Repository, tmp_path: Path) -> None:
    src = tmp_path / "src.img"
    make_source(src, "r")
    a = backup(src, repo, name="db", chunk_size=CS)
    b = backup(src, repo, name="db", chunk_size=CS)
    c = backup(src, repo, name="web", chunk_size=CS)
    assert [m.id for m in repo.backups()] == [a.id, b.id, c.id]
    assert repo.manifest(a.id).id == a.id
    assert repo.manifest("db").id == b.id  # latest with that name
    assert repo.manifest(c.id[:12]).id == c.id
    with pytest.raises(BackupNotFound, match="no backup 'zzz'"):
        repo.manifest("zzz")
    # the three ids share their time prefix (same second or nearly): ambiguous
    common = os.path.commonprefix([a.id, b.id, c.id])
    if common:
        with pytest.raises(BackupNotFound, match="ambiguous"):
            repo.manifest(common)


def test_manifest_summary_and_json() -> None:
    m = Manifest(id="0123456789abcdef", name="n", created=0.0, size=3 * CS + 5, chunk_size=CS,
                 hash="blake3", fstype="ext4", source="/dev/x",
                 chunks=["a" * 64, None, "a" * 64, "b" * 64])
    s = m.summary()
    assert s["created_iso"] == "1970-01-01T00:00:00Z"
    assert s["stored_chunks"] == 3 and s["unique_chunks"] == 2 and s["chunk_count"] == 4
    assert m.chunk_length(3) == 5
    with pytest.raises(IndexError):
        m.chunk_length(4)
    assert Manifest.from_json(m.to_json()) == m
    bad = json.loads(m.to_json())
    bad["chunks"].pop()
    with pytest.raises(ValueError):
        Manifest.from_json(json.dumps(bad).encode())


def test_unreadable_manifest_is_skipped_and_reported(repo: Repository, tmp_path: Path) -> None:
    src = tmp_path / "src.img"
    make_source(src, "r")
    m = backup(src, repo, chunk_size=CS)
    (repo.path / "backups" / "broken.json").write_text("{not json")
    assert [x.id for x in repo.backups()] == [m.id]
    problems = verify(repo)
    assert len(problems) == 1 and "broken.json" in problems[0]


# ---------------------------------------------------------------- read_chunk


def test_read_chunk_zero_short_and_threads(repo: Repository, tmp_path: Path) -> None:
    src = tmp_path / "src.img"
    data = make_source(src, "rzrtrrrrrrrs", seed=3)
    m = backup(src, repo, chunk_size=CS)
    assert repo.read_chunk(m, 1) == bytes(CS)
    assert repo.read_chunk(m, 11) == data[11 * CS:]
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(200):
                i = rng.randrange(m.chunk_count)
                got = repo.read_chunk(m, i)
                assert got == data[i * CS: i * CS + m.chunk_length(i)]
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def _corrupt_one(repo: Repository, m: Manifest, index: int) -> Path:
    path = repo.path / chunk_key(m.chunks[index])
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x55
    path.write_bytes(raw)
    return path


def test_read_chunk_corrupt_and_missing(repo: Repository, tmp_path: Path) -> None:
    src = tmp_path / "src.img"
    make_source(src, "rrrt")
    m = backup(src, repo, chunk_size=CS)
    _corrupt_one(repo, m, 1)
    with pytest.raises(CorruptChunk) as exc:
        repo.read_chunk(m, 1)
    assert exc.value.index == 1 and exc.value.digest == m.chunks[1] and exc.value.backup == m.id
    assert f"chunk 1 ({m.chunks[1]}) of backup {m.id}" in str(exc.value)
    os.unlink(repo.path / chunk_key(m.chunks[2]))
    with pytest.raises(CorruptChunk, match="chunk 2 .* is missing"):
        repo.read_chunk(m, 2)
    # a chunk file whose content was replaced by another valid frame: digest mismatch
    (repo.path / chunk_key(m.chunks[0])).write_bytes(
        (repo.path / chunk_key(m.chunks[3])).read_bytes())
    with pytest.raises(CorruptChunk, match="does not match its digest"):
        repo.read_chunk(m, 0)
    problems = verify(repo, m.id)
    assert len(problems) == 3
    assert any(f"chunk 1 ({m.chunks[1]})" in p and m.id in p for p in problems)
    assert any(f"chunk 2 ({m.chunks[2]})" in p and "missing" in p for p in problems)


def test_read_chunk_unavailable(repo: Repository, tmp_path: Path) -> None:
    src = tmp_path / "src.img"
    make_source(src, "rr")
    m = backup(src, repo, chunk_size=CS)

    class FailingStorage(LocalStorage):
        def get(self, key: str, max_size: int | None = None) -> bytes:
            raise OSError(errno.EIO, "Input/output error")

    flaky = Repository(repo.path, FailingStorage(repo.path))
    with pytest.raises(RepositoryUnavailable, match="errno 5"):
        flaky.read_chunk(m, 0)
    # the repository root gone (share unmounted): unavailable, not "corrupt"
    os.rename(repo.path, tmp_path / "moved")
    with pytest.raises(RepositoryUnavailable, match="not reachable"):
        repo.read_chunk(m, 0)
    os.rename(tmp_path / "moved", repo.path)
    assert repo.read_chunk(m, 0) == src.read_bytes()[:CS]


def test_read_chunk_repository_back_during_the_miss(repo: Repository, tmp_path: Path) -> None:
    """The outage ends between the failed open of a chunk and the reachability check (seen in
    the VM: the dm-snapshot invalidated by a "missing" chunk at the end of a 30 s outage):
    the chunk is read, not reported missing; a chunk really missing still is."""
    src = tmp_path / "src.img"
    make_source(src, "rr")
    m = backup(src, repo, chunk_size=CS)
    moved = tmp_path / "moved"
    os.rename(repo.path, moved)  # the outage

    class BackRightAfterTheMiss(LocalStorage):
        def _open_object(self, key: str) -> int:
            try:
                return super()._open_object(key)
            except FileNotFoundError:
                if moved.exists():
                    os.rename(moved, repo.path)  # the share is back, just after the miss
                raise

    racy = Repository(repo.path, BackRightAfterTheMiss(repo.path))
    assert racy.read_chunk(m, 1) == src.read_bytes()[CS:2 * CS]
    os.unlink(repo.path / chunk_key(m.chunks[0]))
    with pytest.raises(CorruptChunk, match="missing"):
        racy.read_chunk(m, 0)


# ---------------------------------------------------------------- lock


def test_second_writer_is_locked_out(repo: Repository, tmp_path: Path) -> None:
    src = tmp_path / "src.img"
    make_source(src, "r")
    other = Repository.open(repo.path)
    with repo.lock():
        with pytest.raises(RepositoryLocked, match="locked by another writer"):
            backup(src, other, chunk_size=CS)
    assert backup(src, other, chunk_size=CS).chunk_count == 1


def test_lock_cleans_stale_tmp(repo: Repository) -> None:
    stale = repo.path / "tmp" / "abc.123.dead"
    stale.write_bytes(b"half a chunk")
    with repo.lock():
        pass
    assert not stale.exists()


# ---------------------------------------------------------------- restore


def test_restore_resizes_existing_file(repo: Repository, tmp_path: Path) -> None:
    src = tmp_path / "src.img"
    data = make_source(src, "rzrs")
    m = backup(src, repo, chunk_size=CS)
    big = tmp_path / "big.img"
    big.write_bytes(b"\xff" * (10 * CS))  # no filesystem signature: no --force needed
    restore(repo, m, big)
    assert big.read_bytes() == data  # truncated, old bytes of the zero chunk gone
    small = tmp_path / "small.img"
    small.write_bytes(b"\x01" * 10)
    restore(repo, m, small)
    assert small.read_bytes() == data


def test_restore_corrupt_chunk_writes_nothing_bad(repo: Repository, tmp_path: Path) -> None:
    src = tmp_path / "src.img"
    data = make_source(src, "rrrrrr")
    m = backup(src, repo, chunk_size=CS)
    _corrupt_one(repo, m, 4)
    new = tmp_path / "new.img"
    with pytest.raises(CorruptChunk, match=f"chunk 4 .* of backup {m.id}.*partial file was "
                       "removed"):
        restore(repo, m, new, workers=2)
    assert not new.exists()
    old = tmp_path / "old.img"
    old.write_bytes(b"\xee" * len(data))
    with pytest.raises(CorruptChunk, match="chunk 4"):
        restore(repo, m, old, workers=2)
    got = old.read_bytes()
    # chunks are written in order: 0-3 are good, the writer stopped at 4, nothing of the bad
    # chunk (nor anything after it) reached the file, which was emptied (holes) first
    assert len(got) == len(data)
    assert got[: 4 * CS] == data[: 4 * CS]
    assert got[4 * CS:] == bytes(2 * CS)


def test_restore_missing_chunk_checked_before_writing(repo: Repository, tmp_path: Path) -> None:
    src = tmp_path / "src.img"
    make_source(src, "rrrr")
    m = backup(src, repo, chunk_size=CS)
    os.unlink(repo.path / chunk_key(m.chunks[3]))
    old = tmp_path / "old.img"
    old.write_bytes(b"\xee" * 100)
    with pytest.raises(CorruptChunk, match="chunk 3 .* missing.*nothing was written"):
        restore(repo, m, old)
    assert old.read_bytes() == b"\xee" * 100


def test_storage_interface_is_enough(tmp_path: Path) -> None:
    """Backup, read_chunk, verify and restore work on any Storage (here: a dict), so an
    HTTP-range or S3 backend only implements the six methods."""

    class MemStorage(Storage):
        def __init__(self) -> None:
            self.objects: dict[str, bytes] = {}

        def get(self, key: str, max_size: int | None = None) -> bytes:
            try:
                return self.objects[key][: None if max_size is None else max_size + 1]
            except KeyError:
                raise FileNotFoundError(key) from None

        def put_atomic(self, key: str, data: bytes, *, sync_dir: bool = True) -> None:
            self.objects[key] = bytes(data)

        def exists(self, key: str) -> bool:
            return key in self.objects

        def list(self, prefix: str) -> list[str]:
            names = {k[len(prefix) + 1:].split("/")[0] for k in self.objects
                     if k.startswith(prefix + "/")}
            return sorted(names)

        def delete(self, key: str) -> None:
            self.objects.pop(key, None)

        def sync(self) -> None:
            pass

    store = MemStorage()
    r = Repository(tmp_path, store)
    src = tmp_path / "src.img"
    data = make_source(src, "rztrs", seed=5)
    m = backup(src, r, chunk_size=CS)
    assert sum(k.startswith("chunks/") for k in store.objects) == 4
    assert f"backups/{m.id}.json" in store.objects
    assert r.manifest(m.id) == m and verify(r) == []
    out = tmp_path / "out.img"
    restore(r, m, out)
    assert out.read_bytes() == data
    store.objects[f"chunks/{m.chunks[3][:2]}/{m.chunks[3]}"] = b"junk"
    with pytest.raises(CorruptChunk, match="chunk 3"):
        r.read_chunk(m, 3)


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layout=st.lists(st.sampled_from("rzd"), min_size=1, max_size=12),
       tail=st.integers(min_value=0, max_value=CS - 1), seed=st.integers(0, 1000))
def test_roundtrip_property(tmp_path: Path, layout: list[str], tail: int, seed: int) -> None:
    """Any mix of random, zero and duplicate chunks and any tail length restores exactly."""
    rng = random.Random(seed)
    work = Path(tempfile.mkdtemp(dir=tmp_path))
    parts: list[bytes] = []
    for c in layout:
        if c == "r" or (c == "d" and not parts):
            parts.append(rng.randbytes(CS))
        elif c == "z":
            parts.append(bytes(CS))
        else:
            parts.append(rng.choice(parts))
    data = b"".join(parts) + rng.randbytes(tail)
    (work / "src").write_bytes(data)
    r = Repository.init(work / "repo")
    m = backup(work / "src", r, chunk_size=CS)
    assert len(r.chunk_digests()) == len({d for d in m.chunks if d})
    assert all((d is None) == (data[i * CS:(i + 1) * CS].count(0) == m.chunk_length(i))
               for i, d in enumerate(m.chunks))
    restore(r, m, work / "out")
    assert (work / "out").read_bytes() == data
