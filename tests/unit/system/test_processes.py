"""Process lookups: holders of a mount, users of a file."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from dmrecover.system import processes


def test_holders_and_users(tmp_path: Path) -> None:
    inside = tmp_path / "mnt"
    inside.mkdir()
    f = inside / "held"
    f.write_bytes(b"x")
    proc = subprocess.Popen([sys.executable, "-c",
                             "import sys, time; f = open(sys.argv[1]); time.sleep(30)", str(f)])
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not processes.processes_using(f):
            time.sleep(0.05)
        assert [pid for pid, _ in processes.processes_using(f)] == [proc.pid]
        held = processes.processes_holding(str(inside))
        assert [p.pid for p in held] == [proc.pid]
        assert processes.describe(held).startswith(f"{proc.pid} (")
        assert not processes.processes_holding(str(tmp_path / "mn"))
    finally:
        proc.kill()
        proc.wait()
