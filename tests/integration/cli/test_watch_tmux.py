"""`status --watch` once through a real terminal: tmux 120x40, capture-pane. A session whose
process was killed shows as dead (no rate, no ETA) and the display ends with its summary."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers.required import needs

pytestmark = needs(shutil.which("tmux") is not None, "tmux")


def test_watch_in_tmux(tmp_path: Path) -> None:
    d = tmp_path / "state" / "db"
    d.mkdir(parents=True)
    (d / "session.json").write_text(json.dumps({
        "format": "dmrecover-session", "version": 2, "name": "db", "state": "restoring",
        "dest": "/dev/vdb", "mountpoint": "/srv/db", "size": 100 << 20, "pid": 999999,
        "backend": "fuse", "fstype": "ext4"}))
    (d / "status.json").write_text(json.dumps({"time": time.time(), "stats": {
        "total_bytes": 100 << 20, "restored_bytes": 40 << 20, "rate": 9 << 20,
        "demand_fetches": 1}}))
    name = f"p13-{os.getpid()}"
    out = tmp_path / "screen.txt"
    cmd = (f"DMRECOVER_STATE_ROOT={tmp_path / 'state'} {sys.executable} -m dmrecover status "
           f"--watch; echo EXIT=$?; sleep 60")
    subprocess.run(["tmux", "new-session", "-d", "-s", name, "-x", "120", "-y", "40", cmd],
                   check=True, timeout=30)
    try:
        deadline = time.monotonic() + 60
        screen = ""
        while time.monotonic() < deadline and "EXIT=" not in screen:
            time.sleep(0.3)
            screen = subprocess.run(["tmux", "capture-pane", "-p", "-t", name],
                                    capture_output=True, text=True, timeout=30).stdout
        out.write_text(screen)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", name], capture_output=True, timeout=30)
    assert "EXIT=0" in screen, screen
    assert "RESTORING  DEAD: session process not running" in screen, screen
    assert "40.0 MiB of 100.0 MiB (40.0%)" in screen and "1 fetch," in screen
    assert "MiB/s" not in screen and "ETA" not in screen
    assert "session db: restoring; its process is not running: dmrecover resume db" in screen
    assert all(len(line) <= 120 for line in screen.splitlines())
