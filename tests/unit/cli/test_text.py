"""The words and units every display uses: IEC sizes and rates (rich and plain alike), "1 fetch"
and "2 fetches", "an ext4", no "mounted at" once nothing is mounted, and `status --json | head
-1` without a traceback."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from dmrecover.cli import status_display as sd
from dmrecover.cli.progress_display import PlainRenderer, RateColumn
from dmrecover.progress import Progress
from dmrecover.units import MiB, article, format_rate, format_size, plural
from tests.unit.cli.test_status_display import a_model


def test_iec_units_and_grammar() -> None:
    assert format_size(1536) == "1.5 KiB" and format_size(3 << 30) == "3.0 GiB"
    assert format_rate(5 * MiB) == "5.0 MiB/s" and format_rate(None) == "0 B/s"
    assert [plural(n, "fetch", "fetches") for n in (0, 1, 2)] == \
        ["0 fetches", "1 fetch", "2 fetches"]
    assert plural(1, "retry", "retries") == "1 retry"
    assert [article(f) for f in ("ext4", "xfs", "btrfs", "vfat")] == \
        ["an ext4", "an xfs", "a btrfs", "a vfat"]


def test_rich_and_plain_progress_say_the_same_rate() -> None:
    out = io.StringIO()
    p = Progress("restore", total_bytes=100 * MiB, renderer=PlainRenderer(out, 0))
    p.update(10 * MiB)
    p.finish()
    assert "MiB/s" in out.getvalue() or "KiB/s" in out.getvalue() or "GiB/s" in out.getvalue()
    assert "MB/s" not in out.getvalue()
    col = RateColumn()
    assert col.render(SimpleNamespace(speed=5 * MiB)).plain == "5.0 MiB/s"  # type: ignore
    assert col.render(SimpleNamespace(speed=None)).plain == "?"  # type: ignore


def test_status_text_counts_and_mounts() -> None:
    one = sd.render_text(a_model(demand_fetches=1, retries=1))
    assert "1 fetch," in one and "1 retry" in one
    assert "mounted at /srv/data" in one
    for state in ("aborted", "failed"):
        text = sd.render_text(a_model(state=state, alive=False))
        assert "mounted at" not in text and "not mounted (mount point /srv/data)" in text
    dead = sd.render_text(a_model(alive=False))
    assert "mounted at" not in dead and "the session process is not running" in dead
    assert "mounted at /srv/data" in sd.render_text(a_model(state="done", alive=False))
    for m in (a_model(), a_model(state="done")):
        assert "MB/s" not in sd.render_text(m)


def test_status_json_into_a_closed_pipe(tmp_path: Path) -> None:
    """`dmrecover status --json | head -1` with more sessions than a pipe holds."""
    for i in range(400):
        d = tmp_path / f"s{i:03d}"
        d.mkdir()
        (d / "session.json").write_text(json.dumps({
            "format": "dmrecover-session", "version": 2, "name": d.name, "state": "done",
            "dest": "/dev/x", "mountpoint": "/srv/x"}))
    env = {**os.environ, "DMRECOVER_STATE_ROOT": str(tmp_path)}
    r = subprocess.run(f"{sys.executable} -m dmrecover status --json | head -1; "
                       "echo rc=${PIPESTATUS[0]} >&2", shell=True, executable="/bin/bash",
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.stdout == "[\n"
    assert r.stderr.strip() == "rc=141", r.stderr  # like any tool killed by SIGPIPE: no traceback
