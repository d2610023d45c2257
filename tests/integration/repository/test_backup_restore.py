"""Backup and restore of real ext4/xfs volumes on loop devices (root)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from dmrecover.repository.repo import Repository
from tests.helpers.cli import CliRunner

pytestmark = pytest.mark.root

MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[2]


def sha(path: str | Path, size: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        left = size if size is not None else 1 << 62
        while left > 0 and (block := f.read(min(4 * MiB, left))):
            h.update(block)
            left -= len(block)
    return h.hexdigest()


def blank(path: Path, size: int, fill: bytes = b"\xee") -> Path:
    """A non-sparse file full of `fill` (so zeros in a restore must really be written)."""
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(fill * MiB)
    return path


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    Repository.init(tmp_path / "repo")
    return tmp_path / "repo"


@pytest.mark.parametrize("fstype", ["ext4", "xfs"])
def test_block_device_roundtrip(fstype: str, request: pytest.FixtureRequest, repo: Path,
                                tmp_path: Path, loop_device, fs_tools,
                                cli: CliRunner) -> None:
    image: Path = request.getfixturevalue(f"{fstype}_image")
    src = loop_device(image, read_only=True)
    rc, out, err = cli("backup", src, "--repo", str(repo), "--chunk-size", "1M")
    assert rc == 0, err
    m = Repository.open(repo).manifest(out.strip())
    assert m.fstype == fstype and m.size == image.stat().st_size and m.source == src
    assert None in m.chunks  # the image's free space has all-zero chunks
    # restore to a block device that held other bytes, and to a new file
    dest_file = blank(tmp_path / "dest.img", m.size + 4 * MiB)
    dest = loop_device(dest_file)
    rc, _, err = cli("restore", "--repo", str(repo), m.id, dest)
    assert rc == 0, err
    assert sha(dest, m.size) == sha(image)
    out_file = tmp_path / "restored.img"
    rc, _, err = cli("restore", "--repo", str(repo), m.id, str(out_file))
    assert rc == 0, err
    assert sha(out_file) == sha(image)
    assert out_file.stat().st_blocks * 512 < m.size  # zero chunks became holes
    # the restored filesystem mounts and holds the same files
    opts = "ro,nouuid" if fstype == "xfs" else "ro"  # xfs refuses a second mount of one UUID
    with fs_tools.mounted(out_file, opts) as a, fs_tools.mounted(image, "ro") as b:
        for rel in ("app.db", "sparse-ish.bin", "text/doc000.txt", "random/blob000.bin"):
            assert sha(a / rel) == sha(b / rel)


def test_dedup_between_backups(repo: Path, tmp_path: Path, ext4_image: Path, fs_tools,
                               cli: CliRunner) -> None:
    work = fs_tools.copy_sparse(ext4_image, tmp_path / "vol.img")
    r = Repository.open(repo)
    rc, out, _ = cli("backup", str(work), "--repo", str(repo), "--chunk-size", "256K")
    m1 = r.manifest(out.strip())
    files1 = set(r.chunk_digests())
    assert files1 == {d for d in m1.chunks if d}
    with fs_tools.mounted(work) as mnt:  # a small change: one file rewritten, one added
        (mnt / "text" / "doc000.txt").write_bytes(b"changed\n" * 1000)
        (mnt / "new.txt").write_text("hello\n")
    rc, out, _ = cli("backup", str(work), "--repo", str(repo), "--chunk-size", "256K")
    m2 = r.manifest(out.strip())
    files2 = set(r.chunk_digests())
    new = files2 - files1
    changed = {d for d in m2.chunks if d} - {d for d in m1.chunks if d}
    assert new == changed and 0 < len(new) < 20
    stored = sum(1 for d in m2.chunks if d)
    assert len(new) < stored // 5
    rc, _, _ = cli("verify", "--repo", str(repo))
    assert rc == 0


def test_zero_chunks_zeroed_on_block_device(repo: Path, tmp_path: Path, loop_device,
                                            cli: CliRunner) -> None:
    src = tmp_path / "src.img"
    data = os.urandom(MiB) + bytes(6 * MiB) + os.urandom(MiB)
    src.write_bytes(data)
    rc, out, _ = cli("backup", str(src), "--repo", str(repo), "--chunk-size", "1M")
    m = Repository.open(repo).manifest(out.strip())
    assert m.chunks[1:7] == [None] * 6 and len(Repository.open(repo).chunk_digests()) == 2
    dest = loop_device(blank(tmp_path / "d.img", 8 * MiB))
    rc, _, err = cli("restore", "--repo", str(repo), m.id, dest)
    assert rc == 0, err
    with open(dest, "rb") as f:
        assert f.read() == data  # BLKZEROOUT (or zeros written) replaced the 0xee bytes


def test_destination_too_small(repo: Path, tmp_path: Path, loop_device,
                               cli: CliRunner) -> None:
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(4 * MiB))
    rc, out, _ = cli("backup", str(src), "--repo", str(repo))
    dest = loop_device(blank(tmp_path / "d.img", 2 * MiB))
    rc, _, err = cli("restore", "--repo", str(repo), out.strip(), dest)
    assert rc == 74 and "too small" in cli.error_line(err)
    assert sha(tmp_path / "d.img") == sha(blank(tmp_path / "ref", 2 * MiB))


def test_destination_mounted(repo: Path, tmp_path: Path, ext4_image: Path, fs_tools,
                             loop_device, cli: CliRunner) -> None:
    rc, out, _ = cli("backup", str(ext4_image), "--repo", str(repo))
    work = fs_tools.copy_sparse(ext4_image, tmp_path / "vol.img")
    dev = loop_device(work)
    with fs_tools.mounted(dev) as mnt:
        before = sha(dev)
        rc, _, err = cli("restore", "--repo", str(repo), out.strip(), dev, "--force")
        assert rc == 74 and f"is mounted on {mnt}" in cli.error_line(err)
        # the image file behind that mounted loop device is refused too
        rc, _, err = cli("restore", "--repo", str(repo), out.strip(), str(work),
                         "--force")
        assert rc == 74 and "is mounted on" in cli.error_line(err)
        assert sha(dev) == before


def test_destination_held(repo: Path, tmp_path: Path, loop_device,
                          cli: CliRunner) -> None:
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(2 * MiB))
    rc, out, _ = cli("backup", str(src), "--repo", str(repo))
    bid = out.strip()
    backing = blank(tmp_path / "d.img", 4 * MiB)
    dev = loop_device(backing)
    # a file attached to a loop device is held by it
    rc, _, err = cli("restore", "--repo", str(repo), bid, str(backing))
    assert rc == 74 and f"held by {dev}" in cli.error_line(err)
    # a block device another process has open
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys,time; f=open(sys.argv[1],'rb'); print('open', flush=True); time.sleep(60)",
         dev], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        rc, _, err = cli("restore", "--repo", str(repo), bid, dev)
        line = cli.error_line(err)
        assert rc == 74 and "is open in" in line and f"pid {holder.pid}" in line
    finally:
        holder.kill()
        holder.wait()
    assert sha(backing) == sha(blank(tmp_path / "ref", 4 * MiB))
    rc, _, err = cli("restore", "--repo", str(repo), bid, dev)
    assert rc == 0, err


def test_corrupt_chunk_restore_to_device(repo: Path, tmp_path: Path, loop_device,
                                         cli: CliRunner) -> None:
    src = tmp_path / "src.img"
    data = os.urandom(8 * MiB)
    src.write_bytes(data)
    rc, out, _ = cli("backup", str(src), "--repo", str(repo), "--chunk-size", "1M")
    r = Repository.open(repo)
    m = r.manifest(out.strip())
    chunk = repo / "chunks" / m.chunks[5][:2] / m.chunks[5]
    raw = bytearray(chunk.read_bytes())
    raw[100] ^= 0xFF
    chunk.write_bytes(raw)
    rc, _, err = cli("verify", "--repo", str(repo), m.id)
    assert rc == 1 and f"chunk 5 ({m.chunks[5]})" in err
    dest = loop_device(blank(tmp_path / "d.img", 8 * MiB))
    rc, _, err = cli("restore", "--repo", str(repo), m.id, dest)
    line = cli.error_line(err)
    assert rc == 65 and f"chunk 5 ({m.chunks[5]}) of backup {m.id}" in line
    with open(dest, "rb") as f:
        got = f.read()
    assert got[5 * MiB: 6 * MiB] == b"\xee" * MiB  # the bad chunk was never written
    assert got[:5 * MiB] == data[:5 * MiB]


def test_not_root(repo: Path, tmp_path: Path, loop_device, monkeypatch: pytest.MonkeyPatch,
                  cli: CliRunner) -> None:
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(MiB))
    rc, out, _ = cli("backup", str(src), "--repo", str(repo))
    dev = loop_device(blank(tmp_path / "d.img", 2 * MiB))
    before = sha(dev)
    n_backups = len(os.listdir(repo / "backups"))
    monkeypatch.setattr(os, "geteuid", lambda: 65534)
    rc, _, err = cli("restore", "--repo", str(repo), out.strip(), dev)
    assert rc == 77 and "needs root" in cli.error_line(err)
    rc, _, err = cli("backup", dev, "--repo", str(repo))
    assert rc == 77 and "needs root" in cli.error_line(err)
    monkeypatch.undo()
    assert sha(dev) == before and len(os.listdir(repo / "backups")) == n_backups


def _as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
         sys.executable, "-m", "dmrecover", *argv],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_as_nobody_block_device_and_unreadable_source(loop_device) -> None:
    """The real thing: an unprivileged user gets one line and exit codes 4 and 1."""
    shared = Path(tempfile.mkdtemp(prefix="dmrtest-nobody."))
    try:
        os.chmod(shared, 0o755)
        # root's repository is private to root: nobody cannot even read it
        Repository.init(shared / "rootrepo")
        res = _as_nobody("list", "--repo", str(shared / "rootrepo"))
        assert res.returncode == 75 and "Permission denied" in res.stderr
        os.chown(shared, 65534, 65534)
        # nobody's own repository (made by nobody): used as before
        res = _as_nobody("repo", "init", "--encryption", "none", str(shared / "repo"))
        assert res.returncode == 0, res.stderr
        secret = shared / "secret.img"
        secret.write_bytes(os.urandom(MiB))
        os.chmod(secret, 0o600)
        dev = loop_device(secret, read_only=True)
        res = _as_nobody("backup", dev, "--repo", str(shared / "repo"))
        assert res.returncode == 77 and "needs root" in CliRunner.error_line(res.stderr)
        res = _as_nobody("backup", str(secret), "--repo", str(shared / "repo"))
        assert res.returncode == 74
        assert "cannot read source" in CliRunner.error_line(res.stderr)
        assert "permission denied" in res.stderr
        assert os.listdir(shared / "repo" / "backups") == []
        mine = shared / "mine.img"
        mine.write_bytes(os.urandom(MiB))
        os.chown(mine, 65534, 65534)
        res = _as_nobody("backup", str(mine), "--repo", str(shared / "repo"))
        assert res.returncode == 0, res.stderr
        out = shared / "out.img"
        res = _as_nobody("restore", "--repo", str(shared / "repo"), res.stdout.strip(),
                         str(out))
        assert res.returncode == 0, res.stderr
        assert out.read_bytes() == mine.read_bytes() and out.stat().st_mode & 0o777 == 0o600
    finally:
        subprocess.run(["rm", "-rf", str(shared)], check=False)
