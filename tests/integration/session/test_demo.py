"""`dmrecover demo` end to end (small size): it must pass its own checks and leave nothing
behind (mounts, loops, its work directory)."""

from __future__ import annotations

import os
import subprocess
import sys
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
