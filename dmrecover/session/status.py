"""`dmrecover status`: what a live-restore session is doing, from its status.json.

The session process rewrites status.json every ~0.5 s; this module only reads it (and
session.json), so it works for any user who can read the state dir and never disturbs the
session. Plain text by default, JSON with --json, a rich Live display with --watch.
"""

from __future__ import annotations

import json
import time

from dmrecover.session.session import ACTIVE_STATES, Session, list_sessions
from dmrecover.units import format_size


def _num(v: object) -> float | None:
    return float(v) if isinstance(v, (int, float)) else None


def _duration(sec: float | None) -> str:
    if sec is None:
        return "-"
    sec = max(0.0, sec)
    if sec < 60:
        return f"{sec:.1f} s"
    m, s = divmod(int(sec), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _ms(sec: float | None) -> str:
    return "-" if sec is None else f"{sec * 1000:.1f} ms"


def model(sess: Session) -> dict:
    """One JSON-ready view of a session: persisted record + last status + liveness."""
    d = sess.data
    st = sess.status() or {}
    stats = st.get("stats") or {}
    alive = sess.alive()
    state = d.get("state")
    total = stats.get("total_bytes") or d.get("size") or 0
    restored = stats.get("restored_bytes")
    if state == "done":
        restored = total
    rate = _num(stats.get("rate_recent")) or _num(stats.get("rate"))
    remaining = (total - restored) if restored is not None else None
    eta = (remaining / rate) if rate and remaining else (0.0 if remaining == 0 else None)
    note = None
    if state in ACTIVE_STATES and not alive:
        note = f"the session process is not running: dmrecover resume {sess.name}"
    app_state = (st.get("app") or {}).get("state")
    if not alive:
        try:
            app_state = sess.application().state()
        except Exception:  # status must show what it can
            app_state = app_state or "unknown"
    return {
        "session": sess.name,
        "state": state,
        "phase": d.get("cutover_phase"),
        "alive": alive,
        "pid": d.get("pid") if alive else None,
        "note": note,
        "error": d.get("error") or st.get("error"),
        "state_dir": sess.state_dir,
        "repo": d.get("repo"),
        "backup": d.get("backup"),
        "backup_name": d.get("backup_name"),
        "dest": d.get("dest"),
        "mountpoint": d.get("mountpoint"),
        "fstype": d.get("fstype"),
        "backend": d.get("backend"),
        "cutover": d.get("cutover"),
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
        "engine_errors": stats.get("errors") or [],
        "app": app_state,
        "app_pid": (st.get("app") or {}).get("pid"),
        "timings": d.get("timings") or {},
        "warnings": d.get("warnings") or [],
        "updated": st.get("time"),
    }


def render_text(m: dict) -> str:
    """Plain text, one fact per line."""
    lines = [f"session {m['session']}: {m['state']}"
             + (f" ({m['phase']})" if m.get("phase") else "")
             + ("" if m["alive"] or m["state"] not in ACTIVE_STATES else " [process not running]")]
    if m.get("note"):
        lines.append(f"  note:        {m['note']}")
    if m.get("error"):
        lines.append(f"  error:       {m['error']}")
    lines.append(f"  backup:      {m.get('backup_name') or ''} {m['backup']} from {m['repo']}")
    lines.append(f"  destination: {m['dest']}  mounted at {m['mountpoint']} ({m['fstype']}, "
                 f"{m['backend']} backend, cutover {m['cutover']})")
    if m["restored_bytes"] is not None:
        lines.append(f"  restored:    {format_size(m['restored_bytes'])} of "
                     f"{format_size(m['total_bytes'])} ({m['percent']:.1f}%)")
    if m["state"] in ("starting", "restoring"):
        lines.append(f"  throughput:  {format_size(m['rate'] or 0)}/s   ETA {_duration(m['eta'])}")
    if m["demand_fetches"] is not None:
        lines.append(f"  on demand:   {m['demand_fetches']} fetches, latency mean "
                     f"{_ms(m['demand_latency_mean'])}, p99 {_ms(m['demand_latency_p99'])}, "
                     f"max {_ms(m['demand_latency_max'])}")
    if m["overlay_bytes"] is not None:
        lines.append(f"  overlay:     {format_size(m['overlay_bytes'])} of application writes")
    waiting = m.get("waiting_for_repository_since")
    repo_line = f"{m.get('retries') or 0} retries"
    if waiting:
        repo_line = f"UNREACHABLE for {_duration(time.time() - waiting)}, " + repo_line
    lines.append(f"  repository:  {repo_line}")
    lines.append(f"  application: {m['app'] or '-'}"
                 + (f" (pid {m['app_pid']})" if m.get("app_pid") else ""))
    t = m["timings"]
    if t.get("cutover_downtime") is not None:
        lines.append(f"  cutover:     downtime {t['cutover_downtime']:.2f} s, "
                     f"{format_size(t.get('merged_bytes') or 0)} merged")
    for w in m["warnings"]:
        lines.append(f"  warning:     {w}")
    for e in m["engine_errors"][-3:]:
        lines.append(f"  engine:      {e}")
    return "\n".join(lines)


def render_rich(m: dict):
    """A rich renderable for --watch."""
    from rich.console import Group
    from rich.panel import Panel
    from rich.progress_bar import ProgressBar
    from rich.table import Table

    t = Table.grid(padding=(0, 2))
    t.add_column(style="bold")
    t.add_column()
    state = m["state"] + (f" ({m['phase']})" if m.get("phase") else "")
    color = {"done": "green", "failed": "red", "aborted": "yellow"}.get(m["state"], "cyan")
    t.add_row("state", f"[{color}]{state}[/]" + ("" if m["alive"] or m["state"] not in
                                                  ACTIVE_STATES else " [red](not running)[/]"))
    if m.get("error"):
        t.add_row("error", f"[red]{m['error']}[/]")
    if m["restored_bytes"] is not None:
        t.add_row("restored", f"{format_size(m['restored_bytes'])} / "
                  f"{format_size(m['total_bytes'])}  ({m['percent']:.1f}%)")
    t.add_row("throughput", f"{format_size(m['rate'] or 0)}/s   ETA {_duration(m['eta'])}")
    t.add_row("on demand", f"{m['demand_fetches'] or 0} fetches, mean "
              f"{_ms(m['demand_latency_mean'])}, p99 {_ms(m['demand_latency_p99'])}")
    t.add_row("overlay", format_size(m["overlay_bytes"] or 0))
    waiting = m.get("waiting_for_repository_since")
    t.add_row("repository", f"[red]unreachable for {_duration(time.time() - waiting)}[/]"
              if waiting else f"ok ({m.get('retries') or 0} retries)")
    t.add_row("application", f"{m['app'] or '-'}"
              + (f" (pid {m['app_pid']})" if m.get("app_pid") else ""))
    t.add_row("mount", f"{m['mountpoint']}  ->  {m['dest']}")
    down = m["timings"].get("cutover_downtime")
    if down is not None:
        t.add_row("cutover", f"downtime {down:.2f} s")
    bar = ProgressBar(total=100.0, completed=m["percent"] or 0.0, width=60)
    return Panel(Group(bar, t), title=f"dmrecover session {m['session']}", expand=False)


def _sessions(args) -> list[Session]:
    if args.session or args.state_dir:
        return [Session.load(args.session, args.state_dir)]
    return list_sessions()


def status_command(args) -> int:
    """`dmrecover status [SESSION] [--json] [--watch]`."""
    if args.watch:
        return _watch(args)
    sessions = _sessions(args)
    models = [model(s) for s in sessions]
    single = bool(args.session or args.state_dir)
    if args.json:
        print(json.dumps(models[0] if single else models, indent=2))
        return 0
    if not models:
        print("no sessions")
        return 0
    if single:
        print(render_text(models[0]))
        return 0
    print(f"{'SESSION':<20} {'STATE':<14} {'RESTORED':>8} {'APP':<12} MOUNTPOINT")
    for m in models:
        pct = f"{m['percent']:.1f}%" if m["percent"] is not None else "-"
        state = m["state"] + ("!" if m["note"] else "")
        print(f"{m['session']:<20} {state:<14} {pct:>8} {str(m['app'] or '-'):<12} "
              f"{m['mountpoint']}")
    return 0


def _watch(args, interval: float = 0.5) -> int:
    from rich.console import Console, Group
    from rich.live import Live

    console = Console()

    def frame():
        sessions = _sessions(args)
        if not sessions:
            return "no sessions"
        return Group(*(render_rich(model(s)) for s in sessions))

    try:
        with Live(frame(), console=console, refresh_per_second=4, transient=False) as live:
            while True:
                time.sleep(interval)
                live.update(frame())
    except KeyboardInterrupt:
        pass  # Ctrl-C leaves the display; the session runs on
    return 0
