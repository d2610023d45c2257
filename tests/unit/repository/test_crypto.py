"""Format 2 on a local repository: encryption, authentication, keys (no root needed).

Each attack is made on the stored objects themselves and must be detected and named, never
served: wrong password, tampered chunk, swapped chunk, tampered/renamed/foreign manifest, a
deleted older manifest, a downgraded config.json.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from dmrecover.errors import CorruptChunk, RepositoryError, UsageError
from dmrecover.repository import keys
from dmrecover.repository.backup import backup
from dmrecover.repository.crypto import KEYED_HASH, AeadCodec, MasterKey, Tampered
from dmrecover.repository.manifest import chunk_key
from dmrecover.repository.repo import Repository
from dmrecover.repository.restore import restore
from dmrecover.repository.verify import verify
from tests.helpers.cli import CliRunner

MiB = 1 << 20
FAST = {"kdf": "scrypt", "n": 1 << 10, "r": 8, "p": 1}  # cheap KDF: tests only
CS = 256 << 10


@pytest.fixture
def enc(tmp_path: Path) -> dict:
    path = tmp_path / "repo"
    repo = Repository.init(path, encryption="aes-256-gcm", password="s3cret", kdf=FAST)
    src = tmp_path / "src.img"
    data = os.urandom(MiB) + bytes(CS) + b"plain text that must not show " * 20000
    src.write_bytes(data)
    m = backup(src, repo, name="vol", chunk_size=CS)
    return {"path": path, "repo": repo, "src": src, "data": data, "m": m, "tmp": tmp_path}


def _chunk_file(path: Path, digest: str) -> Path:
    return path / chunk_key(digest)


def _reopen(enc: dict) -> Repository:
    return Repository.open(enc["path"], password="s3cret")


def test_round_trip_and_nothing_in_clear(enc: dict) -> None:
    repo = _reopen(enc)
    assert repo.encryption == "aes-256-gcm" and repo.config["hash"] == KEYED_HASH
    assert verify(repo) == []
    out = enc["tmp"] / "out.img"
    restore(repo, repo.manifest("vol"), out)
    assert out.read_bytes() == enc["data"]
    # Neither chunk contents, nor manifest fields, nor unkeyed digests are readable.
    import blake3
    for f in enc["path"].rglob("*"):
        if f.is_file() and f.parent.name not in ("keys",) and f.name != "config.json":
            blob = f.read_bytes()
            # (needles long enough not to occur by chance in random ciphertext)
            assert b"plain text that" not in blob and b"src.img" not in blob
    plain_ids = {blake3.blake3(enc["data"][i:i + CS]).hexdigest()
                 for i in range(0, len(enc["data"]), CS)}
    assert not plain_ids & {d for d in enc["m"].chunks if d}


def test_wrong_or_missing_password(enc: dict, monkeypatch) -> None:
    monkeypatch.delenv("DMRECOVER_PASSWORD", raising=False)
    monkeypatch.delenv("DMRECOVER_PASSWORD_FILE", raising=False)
    with pytest.raises(RepositoryError, match="wrong password for repository"):
        Repository.open(enc["path"], password="nope")
    with pytest.raises(RepositoryError, match="is encrypted: its password is needed"):
        Repository.open(enc["path"])
    monkeypatch.setenv("DMRECOVER_PASSWORD", "s3cret")
    assert Repository.open(enc["path"]).backups()[0].id == enc["m"].id
    monkeypatch.delenv("DMRECOVER_PASSWORD")
    pw = enc["tmp"] / "pw"
    pw.write_text("s3cret\n")
    monkeypatch.setenv("DMRECOVER_PASSWORD_FILE", str(pw))
    assert Repository.open(enc["path"]).backups()[0].id == enc["m"].id


def test_tampered_chunk_is_named_never_served(enc: dict) -> None:
    digest = enc["m"].chunks[0]
    f = _chunk_file(enc["path"], digest)
    blob = bytearray(f.read_bytes())
    blob[40] ^= 1
    f.write_bytes(bytes(blob))
    repo = _reopen(enc)
    problems = verify(repo)
    assert problems and all("tampered with or swapped" in p for p in problems)
    with pytest.raises(CorruptChunk, match=r"chunk 0 .* is tampered with or swapped"):
        repo.read_chunk(repo.manifest("vol"), 0)
    out = enc["tmp"] / "out.img"
    with pytest.raises(CorruptChunk):
        restore(repo, repo.manifest("vol"), out)
    assert not out.exists()


def test_swapped_chunk_fails(enc: dict) -> None:
    """Chunk B's (valid, sealed) object stored under chunk A's name."""
    a, b = enc["m"].chunks[0], enc["m"].chunks[1]
    assert a and b and a != b
    shutil.copyfile(_chunk_file(enc["path"], b), _chunk_file(enc["path"], a))
    repo = _reopen(enc)
    with pytest.raises(CorruptChunk, match="tampered with or swapped"):
        repo.read_chunk(repo.manifest("vol"), 0)
    assert repo.read_chunk(repo.manifest("vol"), 1) == enc["data"][CS:2 * CS]


def test_chunk_from_another_repository_fails(enc: dict) -> None:
    """Same plain bytes, same password, another repository: other keys, other repo id."""
    other = Repository.init(enc["tmp"] / "other", password="s3cret", kdf=FAST)
    m2 = backup(enc["src"], other, name="vol", chunk_size=CS)
    assert m2.chunks[0] != enc["m"].chunks[0], "ids are keyed per repository"
    shutil.copyfile(_chunk_file(enc["tmp"] / "other", m2.chunks[0]),
                    _chunk_file(enc["path"], enc["m"].chunks[0]))
    assert any("tampered" in p for p in verify(_reopen(enc)))


def test_tampered_renamed_and_foreign_manifest(enc: dict) -> None:
    path, mid = enc["path"], enc["m"].id
    mf = path / "backups" / f"{mid}.json"
    good = mf.read_bytes()
    # Tampered.
    bad = bytearray(good)
    bad[-3] ^= 0x40
    mf.write_bytes(bytes(bad))
    manifests, problems = _reopen(enc).load_all()
    assert manifests == [] and problems == [
        f"manifest backups/{mid}.json is tampered with: authentication failed (altered, "
        "swapped or foreign); it is ignored"]
    # Renamed (replayed under another id).
    mf.write_bytes(good)
    renamed = path / "backups" / "00000001aaaaaaaa.json"
    os.rename(mf, renamed)
    manifests, problems = _reopen(enc).load_all()
    assert manifests == [] and "00000001aaaaaaaa.json is tampered with" in problems[0]
    # A manifest sealed by another repository under the same password.
    os.unlink(renamed)
    other = Repository.init(enc["tmp"] / "other", password="s3cret", kdf=FAST)
    m2 = backup(enc["src"], other, name="vol", chunk_size=CS)
    shutil.copyfile(enc["tmp"] / "other" / "backups" / f"{m2.id}.json",
                    path / "backups" / f"{m2.id}.json")
    manifests, problems = _reopen(enc).load_all()
    assert manifests == [] and f"{m2.id}.json is tampered with" in problems[0]


def test_deleted_older_manifest_is_reported(enc: dict) -> None:
    repo = _reopen(enc)
    m2 = backup(enc["src"], repo, name="vol", chunk_size=CS)
    os.unlink(enc["path"] / "backups" / f"{enc['m'].id}.json")
    manifests, problems = _reopen(enc).load_all()
    assert [m.id for m in manifests] == [m2.id]
    assert problems == [f"backup {enc['m'].id} is missing or unreadable but the later backup "
                        f"{m2.id} names it: a manifest was deleted or the repository rolled "
                        "back"]


def test_downgraded_config_is_refused(enc: dict) -> None:
    cfg_path = enc["path"] / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(encryption="none", hash="blake3")
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(RepositoryError, match="config.json was tampered with"):
        Repository.open(enc["path"], password="s3cret")


def test_key_add_remove_passwd(enc: dict) -> None:
    repo = _reopen(enc)
    first = repo.key_id
    second = keys.add_key(repo.storage, repo.codec.master, "other pw", FAST)
    by_second = Repository.open(enc["path"], password="other pw")
    assert by_second.key_id == second and by_second.backups()[0].id == enc["m"].id
    with pytest.raises(UsageError, match="cannot remove itself"):
        keys.remove_key(repo.storage, str(repo.path), first, repo.key_id)
    keys.remove_key(by_second.storage, str(repo.path), first, by_second.key_id)
    with pytest.raises(RepositoryError, match="wrong password"):
        Repository.open(enc["path"], password="s3cret")
    with pytest.raises(UsageError, match="last key"):
        keys.remove_key(by_second.storage, str(repo.path), second, None)
    assert verify(Repository.open(enc["path"], password="other pw")) == []


def test_cli_key_verbs_and_list(enc: dict, cli: CliRunner, tmp_path: Path) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    old.write_text("s3cret\n")
    new.write_text("brand new\n")
    r = str(enc["path"])
    rc, out, err = cli("list", "--repo", r, "--password-file", str(old))
    assert rc == 0 and "encryption aes-256-gcm" in out and enc["m"].id in out
    rc, out, err = cli("list", "--repo", r, "--password-file", str(new))
    assert rc == 66 and cli.error_line(err).startswith("dmrecover: error: wrong password")
    rc, out, err = cli("repo", "key", "passwd", "--repo", r, "--password-file", str(old),
                       "--new-password-file", str(new))
    assert rc == 0 and "password changed" in out
    assert cli("list", "--repo", r, "--password-file", str(old))[0] == 66
    rc, out, _ = cli("repo", "key", "list", "--repo", r, "--password-file", str(new))
    assert rc == 0 and len(out.strip().splitlines()) == 1 and out.startswith("*")


def test_cli_init_needs_a_password_unless_none(tmp_path: Path, cli: CliRunner,
                                               monkeypatch) -> None:
    monkeypatch.delenv("DMRECOVER_PASSWORD", raising=False)
    monkeypatch.delenv("DMRECOVER_PASSWORD_FILE", raising=False)
    rc, _, err = cli("repo", "init", str(tmp_path / "r"))
    assert rc == 66 and "needs a password" in cli.error_line(err)
    assert not (tmp_path / "r" / "config.json").exists()
    rc, out, _ = cli("repo", "init", str(tmp_path / "p"), "--encryption", "none")
    assert rc == 0 and "encryption: none" in out


def test_format_1_repository_still_opens(enc: dict, tmp_path: Path) -> None:
    """A repository written by the format-1 code: plain ids, plain manifests, version 1."""
    r1 = Repository.init(tmp_path / "v1")  # no password: plain chunks and manifests
    m = backup(enc["src"], r1, name="old", chunk_size=CS)
    cfg_path = tmp_path / "v1" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    for k in ("id", "encryption"):
        cfg.pop(k)
    cfg["version"] = 1
    cfg_path.write_text(json.dumps(cfg))
    shutil.rmtree(tmp_path / "v1" / "keys")
    repo = Repository.open(tmp_path / "v1")
    assert repo.encryption == "none" and verify(repo) == []
    assert repo.read_chunk(repo.manifest(m.id), 0) == enc["data"][:CS]


def test_codec_rejects_short_and_foreign_blobs() -> None:
    codec = AeadCodec(MasterKey.generate("r1"), "r1")
    sealed = codec.seal_chunk("d", b"frame")
    assert codec.open_chunk("d", sealed) == b"frame"
    for blob, digest in ((b"short", "d"), (sealed, "e"), (sealed[:-1], "d")):
        with pytest.raises(Tampered):
            codec.open_chunk(digest, blob)
    other = AeadCodec(MasterKey.generate("r1"), "r1")
    with pytest.raises(Tampered):
        other.open_chunk("d", sealed)
