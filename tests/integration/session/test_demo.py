"""`dmrecover demo` end to end (small size), with the sample application and with PostgreSQL:
it must pass its own checks and leave nothing behind (mounts, loops, its work directory, the
database server)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = [pytest.mark.root, pytest.mark.slow]


def _loops() -> set[str]:
    out = set()
    for dev in Path("/sys/block").glob("loop*"):
        try:
            out.add((dev / "loop" / "backing_file").read_text().strip())
        except OSError:
            continue
    return out


@pytest.mark.parametrize("fstype", ["ext4", "xfs"])
def test_demo(tmp_path: Path, fstype: str) -> None:
    work = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DMRECOVER_")}
    r = subprocess.run([sys.executable, "-m", "dmrecover", "demo", "--size", "64M",
                        "--fstype", fstype, "--workdir", str(work)],
                       capture_output=True, text=True, timeout=300, env=env, cwd="/")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "demo passed" in r.stdout
    for key in ("time to first query answered", "cutover downtime",
                "acknowledged writes verified"):
        assert key in r.stdout
    assert not work.exists(), "the demo removes its work directory"
    assert not any(b.startswith(str(tmp_path)) for b in _loops())
    with open("/proc/self/mountinfo") as f:
        assert str(tmp_path) not in f.read()


def test_demo_postgres() -> None:
    """`demo --app postgres`: PostgreSQL 15 (installed by scripts/bootstrap.sh) served through
    the live restore, cut over automatically, pg_amcheck clean and every committed insert on
    DEST. Its work directory's parent must be searchable by the postgres user, so not under
    pytest's tmp_path (which other pytest runs chmod back to 0700)."""
    parent = Path(tempfile.mkdtemp(prefix="dmr-demo-pg-", dir="/var/tmp"))
    try:
        os.chmod(parent, 0o711)
        work = parent / "demo"
        env = {k: v for k, v in os.environ.items() if not k.startswith("DMRECOVER_")}
        r = subprocess.run([sys.executable, "-m", "dmrecover", "demo", "--app", "postgres",
                            "--size", "128M", "--workdir", str(work)],
                           capture_output=True, text=True, timeout=900, env=env, cwd="/")
        assert r.returncode == 0, r.stdout + r.stderr
        out = r.stdout
        assert "PostgreSQL 15 cluster" in out and "demo passed" in out
        assert "pg_amcheck --heapallindexed clean" in out
        m = re.search(r"all (\d+) committed inserts present", out)
        assert m and int(m.group(1)) >= 20, out  # 20 inserts at least after the cutover
        assert "cutover downtime" in out
        assert not work.exists(), "the demo removes its work directory"
        assert not any(b.startswith(str(parent)) for b in _loops())
        with open("/proc/self/mountinfo") as f:
            assert str(parent) not in f.read()
        assert not _postgres_running_in(parent), "the demo stops PostgreSQL"
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def test_demo_postgres_refuses_a_small_volume(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "dmrecover", "demo", "--app", "postgres",
                        "--size", "64M", "--workdir", str(tmp_path / "demo")],
                       capture_output=True, text=True, timeout=60, cwd="/")
    assert r.returncode != 0
    assert "--size must be at least 128.0 MiB" in r.stderr
    assert len(r.stderr.strip().splitlines()) <= 2, r.stderr  # the error (and its hint)
    assert not (tmp_path / "demo").exists()


def _postgres_running_in(parent: Path) -> bool:
    for pid in os.listdir("/proc"):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"postgres" in cmdline and str(parent).encode() in cmdline:
            return True
    return False
