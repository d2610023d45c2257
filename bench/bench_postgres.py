#!/usr/bin/env python3
"""PostgreSQL 15 through live-restore on this host (portable backend), one run:

    sudo .venv/bin/python bench/bench_postgres.py [--size 4G] [--scale 50] [--seconds 10]
                                                  [--json FILE]

Builds an ext4 volume (a sparse image of --size) holding a cluster filled with
`pgbench -i -s SCALE`, backs it up with `dmrecover backup`, wipes DEST and live-restores it
with pg_ctl as --app-start/--app-stop (no restore throttling: real speed; --cutover manual,
`dmrecover cutover` once restored), then measures:

- time from the `live-restore` command to the first successful query;
- pgbench TPS while the restore runs, against TPS on DEST directly after the cutover (same
  run, same pgbench), and their ratio;
- the cutover downtime split into stop (pg_ctl stop), merge (unmount, overlay into DEST) and
  start (mount DEST, pg_ctl start, until the first query answers).

Prints a Markdown table; --json FILE also writes the figures.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dmrecover.units import format_size, parse_size  # noqa: E402
from tests.apps import databases  # noqa: E402
from tests.apps.databases import Postgres  # noqa: E402
from tests.integration.apps.appkit import (  # noqa: E402
    AppSandbox,
    backup_with_cli,
    build_db_volume,
)


def _first_query(pg: Postgres, timeout: float = 600) -> float:
    """Poll until `SELECT 1` answers; the monotonic time it did."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            conn = pg.connect()
            try:
                with conn.cursor() as cur:
                    cur.execute("SELECT 1")
                    cur.fetchone()
                return time.monotonic()
            finally:
                conn.close()
        except Exception:  # noqa: S112 - not up yet
            time.sleep(0.02)
    raise SystemExit("PostgreSQL never answered")


def run(size: int, scale: int, seconds: int) -> dict:
    scratch = Path(databases.scratch_dir("dmr-bench-pg-"))
    box = AppSandbox(scratch / "box")
    out: dict = {"size": size, "scale": scale, "pgbench_seconds": seconds}
    try:
        t = time.monotonic()
        image, src = build_db_volume(scratch, "postgres", size,
                                     lambda db: db.pgbench_init(scale=scale))
        out["build_s"] = time.monotonic() - t
        pg = Postgres(str(box.mnt / "pgdata"), src.rundir, port=src.port)
        t = time.monotonic()
        box.backup_id = backup_with_cli(box, image, chunk_size="4M")
        out["backup_s"] = time.monotonic() - t
        image.unlink()
        with open(box.dest, "wb") as f:
            f.truncate(size)

        t0 = time.monotonic()
        answered: list[float] = []
        poller = threading.Thread(target=lambda: answered.append(_first_query(pg)))
        poller.start()
        # manual cutover: the restore may end during the pgbench run; the cutover waits for it
        r = box.live_restore_app("bench", pg.start_command(), pg.stop_command(),
                                 "--cutover", "manual")
        if r.returncode != 0:
            raise SystemExit(f"live-restore failed: {r.stderr}")
        poller.join()
        out["first_query_s"] = answered[0] - t0
        before = box.status("bench")
        out["tps_during_restore"] = pg.pgbench(seconds, clients=2)
        after = box.status("bench")
        out["restore_percent_at_pgbench"] = [before["percent"], after["percent"]]
        out["restore_still_running"] = after["state"] == "restoring"

        box.wait_state("bench", ("ready", "failed"), timeout=3600)
        r = box.cli("cutover", "bench", timeout=3600)
        if r.returncode != 0:
            raise SystemExit(f"cutover failed: {r.stderr}")
        done = box.session("bench")
        if done["state"] != "done":
            raise SystemExit(f"session failed: {done.get('error')}")
        up = _first_query(pg)
        tm = done["timings"]
        out["restore_s"] = tm["restored"] - tm["app_started"]
        out["stop_s"] = tm["app_stopped"] - tm["cutover_started"]
        out["merge_s"] = tm["merged"] - tm["app_stopped"]
        # start: from the merge's end to the first query answered on DEST (wall clock)
        out["start_s"] = (time.time() - (time.monotonic() - up)) - tm["merged"]
        out["downtime_s"] = out["stop_s"] + out["merge_s"] + out["start_s"]
        out["merged_bytes"] = tm.get("merged_bytes")
        out["tps_on_dest"] = pg.pgbench(seconds, clients=2)
        out["tps_ratio"] = out["tps_during_restore"] / out["tps_on_dest"]
        databases._run(pg.stop_argv(), what="pg_ctl stop", timeout=120)
    finally:
        box.teardown()
        shutil.rmtree(scratch, ignore_errors=True)
    return out


def table(r: dict) -> str:
    rows = [
        ("volume", f"{format_size(r['size'])} ext4, pgbench scale {r['scale']}"),
        ("live-restore to first successful query", f"{r['first_query_s']:.2f} s"),
        ("pgbench TPS during the restore", f"{r['tps_during_restore']:.0f}"
         + ("" if r["restore_still_running"] else " (restore ended during the run)")),
        ("pgbench TPS on DEST directly", f"{r['tps_on_dest']:.0f}"),
        ("ratio during restore / DEST", f"{r['tps_ratio']:.2f}"),
        ("restore (background, whole volume)", f"{r['restore_s']:.1f} s"),
        ("cutover: stop (pg_ctl stop -m fast)", f"{r['stop_s']:.2f} s"),
        ("cutover: merge (unmount, overlay into DEST)",
         f"{r['merge_s']:.2f} s ({format_size(r['merged_bytes'] or 0)})"),
        ("cutover: start (mount DEST, pg_ctl start, first query)", f"{r['start_s']:.2f} s"),
        ("cutover downtime (stop + merge + start)", f"{r['downtime_s']:.2f} s"),
    ]
    lines = ["| measure | value |", "|---|---|"]
    lines += [f"| {a} | {b} |" for a, b in rows]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="4G", help="volume size (default 4G)")
    p.add_argument("--scale", type=int, default=50, help="pgbench -i scale (default 50)")
    p.add_argument("--seconds", type=int, default=10, help="each pgbench run (default 10)")
    p.add_argument("--json", metavar="FILE")
    a = p.parse_args()
    r = run(parse_size(a.size), a.scale, a.seconds)
    print(table(r))
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
