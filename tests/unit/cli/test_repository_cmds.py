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

from dmrecover.cli.main import main
from dmrecover.repository.repo import Repository, chunk_key

MiB = 1 << 20


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("dmrecover: error: ")
    return lines[0]


@pytest.fixture
def setup(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> dict:
    repo = tmp_path / "repo"
    assert run(capsys, "repo", "init", str(repo))[0] == 0
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(MiB) + bytes(MiB) + b"text " * (MiB // 5) + os.urandom(1000))
    rc, out, _ = run(capsys, "backup", str(src), "--repo", str(repo), "--chunk-size", "256K",
                     "--name", "vol", "--progress", "none")
    assert rc == 0
    return {"repo": repo, "src": src, "id": out.strip(), "tmp": tmp_path}


def manifests(repo: Path) -> list[str]:
    return sorted(os.listdir(repo / "backups"))


def test_cli_roundtrip(setup: dict, capsys: pytest.CaptureFixture[str]) -> None:
    repo, src, bid = setup["repo"], setup["src"], setup["id"]
    assert len(bid) == 16 and manifests(repo) == [f"{bid}.json"]
    rc, out, _ = run(capsys, "list", "--repo", str(repo))
    assert rc == 0 and bid in out and "vol" in out
    rc, out, _ = run(capsys, "list", "--repo", str(repo), "--json")
    [entry] = json.loads(out)
    assert entry["id"] == bid and entry["stored_chunks"] == 9 and entry["chunk_count"] == 13
    assert entry["created_iso"].endswith("Z")
    rc, out, _ = run(capsys, "verify", "--repo", str(repo), "--progress", "none")
    assert rc == 0 and "all chunks good" in out
    dest = setup["tmp"] / "restored.img"
    rc, out, _ = run(capsys, "restore", "--repo", str(repo), "vol", str(dest),
                     "--progress", "none")
    assert rc == 0 and dest.read_bytes() == src.read_bytes()


def test_backup_missing_source(setup: dict, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run(capsys, "backup", str(setup["tmp"] / "nope.img"), "--repo",
                     str(setup["repo"]), "--progress", "none")
    assert rc == 1
    assert "source" in one_line(err) and "does not exist" in err
    assert len(manifests(setup["repo"])) == 1


def test_backup_source_not_a_volume(setup: dict, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run(capsys, "backup", str(setup["tmp"]), "--repo", str(setup["repo"]))
    assert rc == 1 and "neither a block device nor a regular file" in one_line(err)


def test_bad_chunk_size(setup: dict, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run(capsys, "backup", str(setup["src"]), "--repo", str(setup["repo"]),
                     "--chunk-size", "100K")
    assert rc == 2 and "chunk size" in one_line(err)
    assert len(manifests(setup["repo"])) == 1


@pytest.mark.parametrize("verb", ["list", "verify", "backup", "restore"])
def test_repo_missing(verb: str, setup: dict, capsys: pytest.CaptureFixture[str]) -> None:
    missing = str(setup["tmp"] / "norepo")
    dest = setup["tmp"] / "dest.img"
    argv = {"list": ["list", "--repo", missing],
            "verify": ["verify", "--repo", missing],
            "backup": ["backup", str(setup["src"]), "--repo", missing],
            "restore": ["restore", "--repo", missing, "x", str(dest)]}[verb]
    rc, _, err = run(capsys, *argv)
    assert rc == 1 and "does not exist" in one_line(err) and "repo init" in err
    assert not Path(missing).exists() and not dest.exists()


def test_not_a_repository(setup: dict, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run(capsys, "list", "--repo", str(setup["tmp"]))
    assert rc == 1 and "not a dmrecover repository" in one_line(err)


def test_unknown_backup(setup: dict, capsys: pytest.CaptureFixture[str]) -> None:
    dest = setup["tmp"] / "dest.img"
    rc, _, err = run(capsys, "restore", "--repo", str(setup["repo"]), "deadbeef", str(dest))
    assert rc == 1 and "no backup 'deadbeef'" in one_line(err)
    assert not dest.exists()
    rc, _, err = run(capsys, "verify", "--repo", str(setup["repo"]), "deadbeef")
    assert rc == 1 and "no backup" in one_line(err)


def test_corrupt_chunk_verify_and_restore(setup: dict,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    repo = Repository.open(setup["repo"])
    m = repo.manifest(setup["id"])
    bad = m.chunks[2]
    path = setup["repo"] / chunk_key(bad)
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 1
    path.write_bytes(raw)
    rc, _, err = run(capsys, "verify", "--repo", str(setup["repo"]), "--progress", "none")
    assert rc == 1
    assert f"chunk 2 ({bad})" in err and m.id in err and "1 bad chunk" in err
    dest = setup["tmp"] / "dest.img"
    rc, _, err = run(capsys, "restore", "--repo", str(setup["repo"]), m.id, str(dest),
                     "--progress", "none")
    line = one_line(err)
    assert rc == 1 and f"chunk 2 ({bad}) of backup {m.id}" in line and "corrupt" in line
    assert not dest.exists()


def test_second_writer_locked(setup: dict, capsys: pytest.CaptureFixture[str]) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl,sys,time; f=open(sys.argv[1],'a'); fcntl.flock(f, fcntl.LOCK_EX); "
         "print('locked', flush=True); time.sleep(60)", str(setup["repo"] / "lock")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        rc, _, err = run(capsys, "backup", str(setup["src"]), "--repo", str(setup["repo"]),
                         "--progress", "none")
        assert rc == 1 and "locked by another writer" in one_line(err)
        assert len(manifests(setup["repo"])) == 1
    finally:
        holder.kill()
        holder.wait()
    rc, _, _ = run(capsys, "backup", str(setup["src"]), "--repo", str(setup["repo"]),
                   "--progress", "none")
    assert rc == 0 and len(manifests(setup["repo"])) == 2


def test_destination_file_held_open(setup: dict, capsys: pytest.CaptureFixture[str]) -> None:
    dest = setup["tmp"] / "busy.img"
    dest.write_bytes(b"\x01" * 4096)
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys,time; f=open(sys.argv[1],'rb'); print('open', flush=True); time.sleep(60)",
         str(dest)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        rc, _, err = run(capsys, "restore", "--repo", str(setup["repo"]), setup["id"],
                         str(dest), "--progress", "none")
        line = one_line(err)
        assert rc == 1 and "is open in" in line and str(holder.pid) in line
        assert dest.read_bytes() == b"\x01" * 4096
    finally:
        holder.kill()
        holder.wait()


def test_destination_with_filesystem_needs_force(setup: dict,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    dest = setup["tmp"] / "fs.img"
    with open(dest, "wb") as f:
        f.truncate(8 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(dest)], check=True,
                   env={**os.environ, "PATH": os.environ.get("PATH", "") + ":/usr/sbin:/sbin"})
    before = dest.read_bytes()
    rc, _, err = run(capsys, "restore", "--repo", str(setup["repo"]), setup["id"], str(dest),
                     "--progress", "none")
    assert rc == 1 and "holds a ext4 filesystem" in one_line(err) and "--force" in err
    assert dest.read_bytes() == before
    rc, _, _ = run(capsys, "restore", "--repo", str(setup["repo"]), setup["id"], str(dest),
                   "--progress", "none", "--force")
    assert rc == 0 and dest.read_bytes() == setup["src"].read_bytes()


def test_list_empty_and_progress_plain(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    repo = tmp_path / "r"
    run(capsys, "repo", "init", str(repo))
    rc, out, _ = run(capsys, "list", "--repo", str(repo))
    assert rc == 0 and out.strip() == "no backups"
    src = tmp_path / "s.img"
    src.write_bytes(os.urandom(MiB))
    t = time.monotonic()
    rc, out, err = run(capsys, "backup", str(src), "--repo", str(repo), "--progress", "plain")
    assert rc == 0 and time.monotonic() - t < 30
    assert "backup: done" in err
