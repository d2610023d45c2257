"""The status model: what a live-restore session is doing, from its record and status.json.

The session process rewrites status.json every ~0.5 s; this module only reads it (and
session.json), so it works for any user who can read the state dir and never disturbs the
session. The CLI renders the model (dmrecover/cli/status_display.py).
"""

from __future__ import annotations

import os
import re

from dmrecover.session.record import ACTIVE_STATES, SessionRecord
from dmrecover.session.volume import dest_head_path
from dmrecover.units import format_size

OVERLAY_WARN = (95.0, 80.0)  # percent of the overlay's room: status warns from here


def _num(v: object) -> float | None:
    return float(v) if isinstance(v, (int, float)) else None


def _refusal(error: str | None) -> str | None:
    """Why the last cutover was refused, shortly ('held by 123 (sleep)'), from the error."""
    if not error:
        return None
    m = re.search(r"is held by (.+?), not by the application", error)
    if m:
        return f"held by {m.group(1)}"
    return error.split(";")[0].removeprefix("cutover refused: ").strip() or None


def _app_details(st: dict, handle: dict | None, alive: bool) -> dict:
    """How the application is tracked and how its last stop went: from status.json while the
    session process runs, else from the record's handle."""
    app = st.get("app") or {}
    handle = handle or {}
    cg = handle.get("cgroup") if isinstance(handle.get("cgroup"), dict) else {}
    tracking = app.get("tracking") if alive else None
    if tracking is None and cg.get("kind"):
        tracking = f"{cg['kind']} {cg.get('unit') or cg.get('path') or ''}".strip()
    warning = app.get("tracking_warning") if alive else None
    stop_log = app.get("stop_log") if alive and "stop_log" in app else handle.get("stop_log")
    return {"app_tracking": tracking,
            "app_tracking_warning": warning or cg.get("warning"),
            "app_stop_log": list(stop_log) if isinstance(stop_log, list) else []}


def model(record: SessionRecord) -> dict:
    """One JSON-ready view of a session: persisted record + last status + liveness."""
    r = record
    st = r.status() or {}
    stats = st.get("stats") or {}
    alive = r.alive()
    state = str(r.state)
    total = stats.get("total_bytes") or r.size or 0
    restored = stats.get("restored_bytes")
    if state == "done":
        restored = total
    rate = _num(stats.get("rate_recent")) or _num(stats.get("rate"))
    remaining = (total - restored) if restored is not None else None
    eta = (remaining / rate) if rate and remaining else (0.0 if remaining == 0 else None)
    note = None
    if state in ACTIVE_STATES and not alive:
        note = f"the session process is not running: dmrecover resume {r.name}"
    warnings = list(r.warnings)
    room, used = _num(stats.get("overlay_room")), _num(stats.get("overlay_allocated"))
    if room and used is not None and state in ACTIVE_STATES:
        pct = 100.0 * used / room
        for level in OVERLAY_WARN:
            if pct >= level:
                warnings.append(f"the overlay uses {pct:.0f}% of its room ({format_size(used)} "
                                f"of {format_size(room)}): free space in {r.engine_path}, or "
                                "writes that do not fit will fail")
                break
    if state == "done":
        dest_state = "complete"
    elif os.path.exists(dest_head_path(r.state_dir)):
        dest_state = ("incomplete, marked: its first 4 KiB are kept in "
                      f"{dest_head_path(r.state_dir)} until the restore completes")
    elif restored is not None and restored == total:
        dest_state = "restored (the application's writes join it at the cutover)"
    else:
        dest_state = "incomplete"
    app_state = (st.get("app") or {}).get("state")
    if not alive:
        try:
            app_state = r.application().state()
        except Exception:  # status must show what it can
            app_state = app_state or "unknown"
    return {
        "session": r.name,
        "state": state,
        "phase": r.phase and str(r.phase),
        "alive": alive,
        "pid": r.pid if alive else None,
        "note": note,
        "error": r.error or st.get("error"),
        "state_dir": r.state_dir,
        "repo": r.repo,
        "backup": r.backup,
        "backup_name": r.backup_name,
        "dest": r.dest,
        "dest_state": dest_state,
        "mountpoint": r.mountpoint,
        "fstype": r.fstype,
        "backend": r.backend,
        "cutover": str(r.cutover_mode),
        "total_bytes": total,
        "restored_bytes": restored,
        "percent": (100.0 * restored / total) if total and restored is not None else None,
        "rate": rate,
        "eta": eta,
        "demand_fetches": stats.get("demand_fetches"),
        "demand_latency_mean": stats.get("demand_latency_mean"),
        "demand_latency_p99": stats.get("demand_latency_p99"),
        "demand_latency_max": stats.get("demand_latency_max"),
        "background_fetches": stats.get("background_fetches"),
        "overlay_bytes": stats.get("overlay_bytes"),
        "retries": stats.get("retries"),
        "waiting_for_repository_since": stats.get("waiting_for_repository_since"),
        "repository_lost_since": stats.get("repository_lost_since"),
        "on_repository_lost": stats.get("on_repository_lost"),
        "engine_errors": stats.get("errors") or [],
        "app": app_state,
        "app_pid": (st.get("app") or {}).get("pid"),
        **_app_details(st, r.app_handle, alive),
        "cutover_retry": ({**st["cutover_retry"], "reason": _refusal(r.error)}
                          if alive and isinstance(st.get("cutover_retry"), dict) else None),
        "timings": r.timings,
        "warnings": warnings,
        "overlay_allocated": used,
        "overlay_room": room,
        "updated": st.get("time"),
    }
