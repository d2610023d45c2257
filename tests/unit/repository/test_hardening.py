"""Issue 9, repository side: destinations apart from the repository, manifests validated on
load, chunk reads bounded, backup references never silently ambiguous, private files."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from dmrecover.errors import (
    BackupNotFound,
    CorruptChunk,
    RepositoryError,
    UsageError,
)
from dmrecover.repository.backup import backup
from dmrecover.repository.manifest import Manifest, chunk_key
from dmrecover.repository.repo import Repository
from dmrecover.repository.restore import restore
from tests.unit.repository.test_repo import CS, make_source

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository.init(tmp_path / "repo")


@pytest.fixture
def one(repo: Repository, tmp_path: Path) -> Manifest:
    src = tmp_path / "src.img"
    make_source(src, "rzts")
    return backup(src, repo, name="vol", chunk_size=CS)


def snapshot(repo: Repository) -> dict[str, bytes]:
    """Every file of the repository with its content (to prove nothing changed)."""
    out = {}
    for d, _, files in os.walk(repo.path):
        for f in files:
            p = Path(d) / f
            out[str(p.relative_to(repo.path))] = p.read_bytes()
    return out


# ---------------------------------------------------------------- item 3: destination apart


def test_contains_and_is_within(repo: Repository, one: Manifest, tmp_path: Path) -> None:
    p = repo.path
    assert repo.contains(p) and repo.contains(p / "config.json")
    assert repo.contains(p / "chunks" / "ab" / "new.img")  # not there yet, inside all the same
    assert repo.contains(p / "backups" / f"{one.id}.json")
    assert not repo.contains(tmp_path / "elsewhere.img")
    assert not repo.contains(tmp_path)
    assert repo.is_within(tmp_path) and repo.is_within(p)
    assert not repo.is_within(p / "chunks") and not repo.is_within(tmp_path / "x")
    with pytest.raises(UsageError, match="inside repository"):
        repo.check_apart(p / "tmp" / "x", "destination")
    with pytest.raises(UsageError, match="holds repository"):
        repo.check_apart(tmp_path, "state dir")
    repo.check_apart(tmp_path / "x.img", "destination")


@pytest.mark.parametrize("where", ["config.json", "lock", "backups/MANIFEST", "chunks/ab/x.img",
                                   "tmp/new.img", "."])
def test_restore_into_repository_refused(repo: Repository, one: Manifest,
                                          where: str) -> None:
    dest = repo.path / where.replace("MANIFEST", f"{one.id}.json")
    before = snapshot(repo)
    with pytest.raises(UsageError, match="inside repository"):
        restore(repo, one, dest)
    assert snapshot(repo) == before


def test_restore_through_symlink_or_hard_link_refused(repo: Repository, one: Manifest,
                                                       tmp_path: Path) -> None:
    before = snapshot(repo)
    link = tmp_path / "link.img"
    link.symlink_to(repo.path / "config.json")
    dangling = tmp_path / "dangling.img"
    dangling.symlink_to(repo.path / "tmp" / "new.img")
    dirlink = tmp_path / "dirlink"
    dirlink.symlink_to(repo.path / "chunks")
    hard = tmp_path / "hard.img"
    os.link(repo.path / "backups" / f"{one.id}.json", hard)
    chunk = repo.path / chunk_key(next(d for d in one.chunks if d))
    hard_chunk = tmp_path / "hard_chunk.img"
    os.link(chunk, hard_chunk)
    for dest in (link, dangling, dirlink / "x.img", hard, hard_chunk):
        with pytest.raises(UsageError, match="inside repository"):
            restore(repo, one, dest)
    assert snapshot(repo) == before
    assert not (repo.path / "tmp" / "new.img").exists()


# ---------------------------------------------------------------- item 4: manifests validated


def _rewrite(repo: Repository, m: Manifest, **changes) -> Path:
    path = repo.path / "backups" / f"{m.id}.json"
    d = json.loads(path.read_bytes())
    d.update(changes)
    path.write_text(json.dumps(d))
    return path


@pytest.mark.parametrize("digest", ["../../../dev/zero", 12345, "A" * 64, "a" * 63, "a" * 65,
                                    "g" * 64, ["x"], True])
def test_bad_digest_is_one_clear_error(repo: Repository, one: Manifest, tmp_path: Path,
                                       digest) -> None:
    chunks = list(one.chunks)
    chunks[0] = digest
    _rewrite(repo, one, chunks=chunks)
    with pytest.raises(RepositoryError, match=rf"manifest backups/{one.id}.json is corrupt: "
                                              r"chunk 0 .*digest"):
        repo.manifest(one.id)
    dest = tmp_path / "out.img"
    assert [m.id for m in repo.backups()] == []
    _, problems = repo.load_all()
    assert len(problems) == 1 and "chunk 0" in problems[0]
    assert not dest.exists()


@pytest.mark.parametrize("changes, words", [
    ({"size": "100"}, "size"),
    ({"size": -1}, "size"),
    ({"size": True}, "size"),
    ({"chunk_size": 0}, "chunk size"),
    ({"chunk_size": 3 * CS}, "chunk size"),
    ({"chunk_size": 1 << 30}, "chunk size"),
    ({"chunk_size": 1.5}, "chunk size"),
    ({"size": 10 * CS}, "digests for"),
    ({"chunks": "abc"}, "chunks"),
    ({"id": "../../etc/x"}, "id"),
    ({"id": 17}, "id"),
    ({"name": None}, "name"),
    ({"created": "yesterday"}, "created"),
    ({"hash": "sha1"}, "hash"),
    ({"fstype": 3}, "fstype"),
])
def test_bad_fields_are_one_clear_error(repo: Repository, one: Manifest, changes: dict,
                                        words: str) -> None:
    _rewrite(repo, one, **changes)
    with pytest.raises(RepositoryError, match=f"is corrupt: .*{words}") as info:
        repo.manifest(one.id)
    assert "\n" not in str(info.value)


def test_manifest_not_an_object_or_missing_keys(repo: Repository, one: Manifest) -> None:
    path = repo.path / "backups" / f"{one.id}.json"
    for text in ("[1, 2]", "{}", '{"id": "' + one.id + '"}', "null", "\xff"):
        path.write_bytes(text.encode("latin-1"))
        with pytest.raises(RepositoryError, match="is corrupt"):
            repo.manifest(one.id)


def test_manifest_id_must_match_file_name(repo: Repository, one: Manifest) -> None:
    src = repo.path / "backups" / f"{one.id}.json"
    other = "0" * 16
    os.rename(src, repo.path / "backups" / f"{other}.json")
    with pytest.raises(RepositoryError, match="does not match its file name"):
        repo.manifest(other)
    _, problems = repo.load_all()
    assert len(problems) == 1 and "file name" in problems[0]


def test_chunk_key_refuses_what_is_not_a_digest() -> None:
    for bad in ("../../../dev/zero", "", "A" * 64, 12345, None):
        with pytest.raises(ValueError):
            chunk_key(bad)  # type: ignore[arg-type]
    assert chunk_key("ab" * 32) == f"chunks/ab/{'ab' * 32}"


def test_oversized_chunk_file_is_corrupt(repo: Repository, one: Manifest) -> None:
    index = next(i for i, d in enumerate(one.chunks) if d)
    path = repo.path / chunk_key(one.chunks[index])
    os.chmod(path, 0o600)
    with open(path, "r+b") as f:
        f.truncate(64 << 20)  # a sparse 64 MiB "frame" for a 64 KiB chunk
    with pytest.raises(CorruptChunk, match="larger than"):
        repo.read_chunk(one, index)


def test_chunk_symlinked_to_dev_zero_is_read_bounded(repo: Repository, one: Manifest) -> None:
    """A chunk file replaced by a symlink to /dev/zero: one bounded read, then CorruptChunk
    (in a child process with a 1 GiB address-space limit, so an unbounded read fails fast)."""
    index = next(i for i, d in enumerate(one.chunks) if d)
    path = repo.path / chunk_key(one.chunks[index])
    path.unlink()
    path.symlink_to("/dev/zero")
    code = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))\n"
        "from dmrecover.errors import CorruptChunk\n"
        "from dmrecover.repository.repo import Repository\n"
        "r = Repository.open(sys.argv[1]); m = r.manifest(sys.argv[2])\n"
        "try:\n    r.read_chunk(m, int(sys.argv[3]))\n"
        "except CorruptChunk as e:\n    print('CORRUPT', e)\n"
    )
    res = subprocess.run([sys.executable, "-c", code, str(repo.path), one.id, str(index)],
                         capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0 and res.stdout.startswith("CORRUPT"), res.stderr[-2000:]
    assert "not a regular file" in res.stdout


# ---------------------------------------------------------------- item 5: references


def test_name_that_is_an_id_prefix_is_ambiguous(repo: Repository, tmp_path: Path) -> None:
    src = tmp_path / "src.img"
    make_source(src, "r")
    a = backup(src, repo, name="first", chunk_size=CS)
    b = backup(src, repo, name=a.id[:6], chunk_size=CS)
    with pytest.raises(BackupNotFound, match="ambiguous") as info:
        repo.manifest(a.id[:6])
    assert a.id in str(info.value) and b.id in str(info.value)
    assert repo.manifest(a.id).id == a.id and repo.manifest(b.id).id == b.id
    assert repo.manifest("first").id == a.id


def test_name_before_prefix_and_ambiguous_prefix_names_all(repo: Repository,
                                                            tmp_path: Path) -> None:
    src = tmp_path / "src.img"
    make_source(src, "r")
    ms = [backup(src, repo, name=n, chunk_size=CS) for n in ("x", "x", "y")]
    assert repo.manifest("x").id == ms[1].id
    common = os.path.commonprefix([m.id for m in ms])
    if common:
        with pytest.raises(BackupNotFound, match="ambiguous") as info:
            repo.manifest(common)
        assert all(m.id in str(info.value) for m in ms)


# ---------------------------------------------------------------- item 10: private files


def _modes(root: Path) -> tuple[set[int], set[int]]:
    dirs, files = {stat.S_IMODE(root.stat().st_mode)}, set()
    for d, dn, fn in os.walk(root):
        dirs.update(stat.S_IMODE((Path(d) / x).stat().st_mode) for x in dn)
        files.update(stat.S_IMODE((Path(d) / x).stat().st_mode) for x in fn)
    return dirs, files


def test_repository_is_private_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        r = Repository.init(tmp_path / "repo")
        src = tmp_path / "src.img"
        make_source(src, "rts")
        os.chmod(src, 0o644)
        m = backup(src, r, chunk_size=CS)
        with r.lock():
            pass
        dest = tmp_path / "out.img"
        restore(r, m, dest)
    finally:
        os.umask(old)
    dirs, files = _modes(r.path)
    assert dirs == {0o700} and files == {0o600}
    assert stat.S_IMODE(dest.stat().st_mode) == 0o600


@pytest.mark.skipif(os.geteuid() != 0, reason="root's distrust of other users' repositories")
@pytest.mark.parametrize("how", ["owner", "group-writable", "world-writable", "subdir-owner",
                                 "config-owner", "chunk-dir-writable"])
def test_root_refuses_a_repository_others_could_write(repo: Repository, one: Manifest,
                                                       how: str) -> None:
    p = repo.path
    if how == "owner":
        os.chown(p, 65534, 65534)
    elif how == "group-writable":
        os.chmod(p, 0o770)
    elif how == "world-writable":
        os.chmod(p, 0o707)
    elif how == "subdir-owner":
        os.chown(p / "backups", 65534, -1)
    elif how == "config-owner":
        os.chown(p / "config.json", 65534, -1)
    else:
        os.chmod(p / "chunks" / "7f", 0o777)
    with pytest.raises(RepositoryError, match="could have been written by") as info:
        Repository.open(p)
    assert "chown" in str(info.value) or "chmod" in str(info.value)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")
def test_root_refuses_a_repository_under_another_users_directory(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    Repository.init(home / "repo")
    os.chown(home, 65534, 65534)
    with pytest.raises(RepositoryError, match="could have been written by"):
        Repository.open(home / "repo")
