"""A backup killed mid-way (SIGKILL) leaves a valid repository; two writers are locked out."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from dmrecover.cli.main import main
from dmrecover.repository.repo import Repository

MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[2]


def cli(*argv: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "dmrecover", *argv], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})


def count_chunks(repo: Path) -> int:
    return sum(len(os.listdir(repo / "chunks" / d)) for d in os.listdir(repo / "chunks"))


def write_random(path: Path, mib: int) -> None:
    """An incompressible image of mib MiB."""
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(MiB))


def wait_for_chunks(repo: Path, proc: subprocess.Popen[str], n: int) -> None:
    """Until the backup proc has written n chunk files, ends, or 60 s have passed."""
    deadline = time.monotonic() + 60
    while count_chunks(repo) < n and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)


def test_kill_backup_midway(tmp_path: Path, capsys) -> None:
    repo = tmp_path / "repo"
    Repository.init(repo)
    src = tmp_path / "src.img"
    write_random(src, 96)  # incompressible, 64 KiB chunks: ~1500 chunk files to write
    proc = cli("backup", str(src), "--repo", str(repo), "--chunk-size", "64K",
               "--progress", "none")
    try:
        wait_for_chunks(repo, proc, 50)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the backup finished before it could be killed"
    written = count_chunks(repo)
    assert 50 <= written < 96 * 16
    assert os.listdir(repo / "backups") == []  # no manifest: nothing names a missing chunk

    assert main(["verify", "--repo", str(repo), "--progress", "none"]) == 0
    # every chunk file that exists is whole (verify hashes them by name)
    r = Repository.open(repo)
    for digest in r.chunk_digests():
        assert r.chunk_problem(digest, 64 << 10) is None
    # a new backup succeeds, reuses the chunks already there and cleans the temp files
    assert main(["backup", str(src), "--repo", str(repo), "--chunk-size", "64K",
                 "--progress", "none"]) == 0
    bid = capsys.readouterr().out.strip().splitlines()[-1]
    m = r.manifest(bid)
    assert os.listdir(repo / "tmp") == []
    assert count_chunks(repo) == 96 * 16 == m.chunk_count
    assert main(["verify", "--repo", str(repo), "--progress", "none"]) == 0
    out = tmp_path / "out.img"
    assert main(["restore", "--repo", str(repo), bid, str(out), "--progress", "none"]) == 0
    assert out.read_bytes() == src.read_bytes()


def test_two_writers_at_once(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    Repository.init(repo)
    src = tmp_path / "src.img"
    write_random(src, 256)  # big enough that the first backup runs for seconds
    first = cli("backup", str(src), "--repo", str(repo), "--chunk-size", "64K",
                "--progress", "none")
    try:
        wait_for_chunks(repo, first, 5)
        assert first.poll() is None, "the first backup finished too soon"
        second = cli("backup", str(src), "--repo", str(repo), "--progress", "none")
        out, err = second.communicate(timeout=60)
        assert second.returncode == 75
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "locked by another writer" in lines[0]
    finally:
        fout, ferr = first.communicate(timeout=120)
    assert first.returncode == 0, ferr
    assert os.listdir(repo / "backups") == [f"{fout.strip()}.json"]
