"""The repository verbs through the CLI entry point, on image files (no root needed).

Every error: the exit code, exactly one line on stderr naming the problem, nothing written.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dmrecover.errors import (
    BackupNotFound,
    CorruptChunk,
    DeviceError,
    RepositoryError,
    RepositoryLocked,
)
from dmrecover.repository.manifest import chunk_key
from dmrecover.repository.repo import Repository
from tests.helpers.cli import CliRunner

MiB = 1 << 20


@pytest.fixture
def setup(tmp_path: Path, cli: CliRunner) -> dict:
    repo = tmp_path / "repo"
    assert cli("repo", "init", str(repo), "--encryption", "none")[0] == 0
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(MiB) + bytes(MiB) + b"text " * (MiB // 5) + os.urandom(1000))
    rc, out, _ = cli("backup", str(src), "--repo", str(repo), "--chunk-size", "256K",
                     "--name", "vol", "--progress", "none")
    assert rc == 0
    return {"repo": repo, "src": src, "id": out.strip(), "tmp": tmp_path}


def manifests(repo: Path) -> list[str]:
    return sorted(os.listdir(repo / "backups"))


def test_cli_roundtrip(setup: dict, cli: CliRunner) -> None:
    repo, src, bid = setup["repo"], setup["src"], setup["id"]
    assert len(bid) == 16 and manifests(repo) == [f"{bid}.json"]
    rc, out, _ = cli("list", "--repo", str(repo))
    assert rc == 0 and bid in out and "vol" in out
    rc, out, _ = cli("list", "--repo", str(repo), "--json")
    [entry] = json.loads(out)
    assert entry["id"] == bid and entry["stored_chunks"] == 9 and entry["chunk_count"] == 13
    assert entry["created_iso"].endswith("Z")
    rc, out, _ = cli("verify", "--repo", str(repo), "--progress", "none")
    assert rc == 0 and "all chunks good" in out
    dest = setup["tmp"] / "restored.img"
    rc, out, _ = cli("restore", "--repo", str(repo), "vol", str(dest),
                     "--progress", "none")
    assert rc == 0 and dest.read_bytes() == src.read_bytes()


def test_backup_missing_source(setup: dict, cli: CliRunner) -> None:
    rc, _, err = cli("backup", str(setup["tmp"] / "nope.img"), "--repo",
                     str(setup["repo"]), "--progress", "none")
    assert rc == DeviceError.exit_code
    assert "source" in cli.error_line(err) and "does not exist" in err
    assert len(manifests(setup["repo"])) == 1


def test_backup_source_not_a_volume(setup: dict, cli: CliRunner) -> None:
    rc, _, err = cli("backup", str(setup["tmp"]), "--repo", str(setup["repo"]))
    assert rc == DeviceError.exit_code
    assert "neither a block device nor a regular file" in cli.error_line(err)


def test_bad_chunk_size(setup: dict, cli: CliRunner) -> None:
    rc, _, err = cli("backup", str(setup["src"]), "--repo", str(setup["repo"]),
                     "--chunk-size", "100K")
    assert rc == 2 and "chunk size" in cli.error_line(err)
    assert len(manifests(setup["repo"])) == 1


@pytest.mark.parametrize("verb", ["list", "verify", "backup", "restore"])
def test_repo_missing(verb: str, setup: dict, cli: CliRunner) -> None:
    missing = str(setup["tmp"] / "norepo")
    dest = setup["tmp"] / "dest.img"
    argv = {"list": ["list", "--repo", missing],
            "verify": ["verify", "--repo", missing],
            "backup": ["backup", str(setup["src"]), "--repo", missing],
            "restore": ["restore", "--repo", missing, "x", str(dest)]}[verb]
    rc, _, err = cli(*argv)
    assert rc == RepositoryError.exit_code
    assert "does not exist" in cli.error_line(err) and "repo init" in err
    assert not Path(missing).exists() and not dest.exists()


def test_not_a_repository(setup: dict, cli: CliRunner) -> None:
    rc, _, err = cli("list", "--repo", str(setup["tmp"]))
    assert rc == RepositoryError.exit_code and "not a dmrecover repository" in cli.error_line(err)


def test_unknown_backup(setup: dict, cli: CliRunner) -> None:
    dest = setup["tmp"] / "dest.img"
    rc, _, err = cli("restore", "--repo", str(setup["repo"]), "deadbeef", str(dest))
    assert rc == BackupNotFound.exit_code and "no backup 'deadbeef'" in cli.error_line(err)
    assert not dest.exists()
    rc, _, err = cli("verify", "--repo", str(setup["repo"]), "deadbeef")
    assert rc == BackupNotFound.exit_code and "no backup" in cli.error_line(err)


def test_corrupt_chunk_verify_and_restore(setup: dict,
                                          cli: CliRunner) -> None:
    repo = Repository.open(setup["repo"])
    m = repo.manifest(setup["id"])
    bad = m.chunks[2]
    path = setup["repo"] / chunk_key(bad)
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 1
    path.write_bytes(raw)
    rc, _, err = cli("verify", "--repo", str(setup["repo"]), "--progress", "none")
    assert rc == 1
    assert f"chunk 2 ({bad})" in err and m.id in err and "1 bad chunk" in err
    dest = setup["tmp"] / "dest.img"
    rc, _, err = cli("restore", "--repo", str(setup["repo"]), m.id, str(dest),
                     "--progress", "none")
    line = cli.error_line(err)
    assert rc == CorruptChunk.exit_code
    assert f"chunk 2 ({bad}) of backup {m.id}" in line and "corrupt" in line
    assert not dest.exists()


def test_second_writer_locked(setup: dict, cli: CliRunner) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl,sys,time; f=open(sys.argv[1],'a'); fcntl.flock(f, fcntl.LOCK_EX); "
         "print('locked', flush=True); time.sleep(60)", str(setup["repo"] / "lock")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        rc, _, err = cli("backup", str(setup["src"]), "--repo", str(setup["repo"]),
                         "--progress", "none")
        assert rc == RepositoryLocked.exit_code
        assert "locked by another writer" in cli.error_line(err)
        assert len(manifests(setup["repo"])) == 1
    finally:
        holder.kill()
        holder.wait()
    rc, _, _ = cli("backup", str(setup["src"]), "--repo", str(setup["repo"]),
                   "--progress", "none")
    assert rc == 0 and len(manifests(setup["repo"])) == 2


def test_destination_file_held_open(setup: dict, cli: CliRunner) -> None:
    dest = setup["tmp"] / "busy.img"
    dest.write_bytes(b"\x01" * 4096)
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys,time; f=open(sys.argv[1],'rb'); print('open', flush=True); time.sleep(60)",
         str(dest)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        rc, _, err = cli("restore", "--repo", str(setup["repo"]), setup["id"],
                         str(dest), "--progress", "none")
        line = cli.error_line(err)
        assert rc == DeviceError.exit_code and "is open in" in line and str(holder.pid) in line
        assert dest.read_bytes() == b"\x01" * 4096
    finally:
        holder.kill()
        holder.wait()


def test_destination_with_filesystem_needs_force(setup: dict,
                                                 cli: CliRunner) -> None:
    dest = setup["tmp"] / "fs.img"
    with open(dest, "wb") as f:
        f.truncate(8 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(dest)], check=True,
                   env={**os.environ, "PATH": os.environ.get("PATH", "") + ":/usr/sbin:/sbin"})
    before = dest.read_bytes()
    rc, _, err = cli("restore", "--repo", str(setup["repo"]), setup["id"], str(dest),
                     "--progress", "none")
    assert rc == DeviceError.exit_code
    assert "holds an ext4 filesystem" in cli.error_line(err) and "--force" in err
    assert dest.read_bytes() == before
    rc, _, _ = cli("restore", "--repo", str(setup["repo"]), setup["id"], str(dest),
                   "--progress", "none", "--force")
    assert rc == 0 and dest.read_bytes() == setup["src"].read_bytes()


def test_list_empty_and_progress_plain(tmp_path: Path, cli: CliRunner) -> None:
    repo = tmp_path / "r"
    cli("repo", "init", str(repo), "--encryption", "none")
    rc, out, _ = cli("list", "--repo", str(repo))
    assert rc == 0 and out.strip() == "no backups"
    src = tmp_path / "s.img"
    src.write_bytes(os.urandom(MiB))
    t = time.monotonic()
    rc, out, err = cli("backup", str(src), "--repo", str(repo), "--progress", "plain")
    assert rc == 0 and time.monotonic() - t < 30
    assert "backup: done" in err
