"""How `dmrecover status` shows a session: plain text, a table of sessions, a rich panel, and
the `--watch` loop. The data is the status model (`dmrecover.session.status.model`), a
JSON-ready dict; this module only formats it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table

from dmrecover.session.record import ACTIVE_STATES
from dmrecover.units import format_rate, format_size, plural


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


def _dead(m: dict) -> bool:
    """An active session whose process is gone (resume brings it back)."""
    return not m["alive"] and m["state"] in ACTIVE_STATES


def _app(m: dict) -> str:
    return f"{m['app'] or '-'}" + (f" (pid {m['app_pid']})" if m.get("app_pid") else "")


def _since(t: float) -> str:
    return f"{time.strftime('%H:%M:%S', time.localtime(t))} ({_duration(time.time() - t)})"


def _repository(m: dict) -> str:
    """Reachable, retrying, or lost past the fetch deadline (reads then wait, or fail)."""
    retries = plural(m.get("retries") or 0, "retry", "retries")
    lost = m.get("repository_lost_since")
    if lost:
        reads = "reads fail" if m.get("on_repository_lost") == "error" else "reads wait"
        return f"waiting for repository since {_since(lost)}: {reads}, the restore goes " \
               f"on when it returns; {retries}"
    waiting = m.get("waiting_for_repository_since")
    if waiting:
        return f"UNREACHABLE for {_duration(time.time() - waiting)}, {retries}"
    return retries


def _tracking(m: dict) -> str | None:
    """How the application is tracked: its cgroup, or the weaker fallback's warning."""
    if m.get("app_tracking_warning"):
        return f"WARNING: {m['app_tracking_warning']}"
    return m.get("app_tracking")


def _retry(m: dict) -> str | None:
    """A refused automatic cutover that is tried again ('refused: held by X; retrying in
    N s (attempt K)', after the label 'cutover')."""
    r = m.get("cutover_retry")
    if not r:
        return None
    reason = f": {r['reason']}" if r.get("reason") else ""
    return (f"refused{reason}; retrying in {max(0.0, r.get('in') or 0.0):.0f} s "
            f"(attempt {r.get('attempt')})")


def _where(m: dict) -> str:
    """Where the application's volume is: mounted only while the session holds it (or the
    application runs on DEST after the cutover); not after abort, failure or a crash."""
    if m["state"] == "done" or (m["state"] in ACTIVE_STATES and m["alive"]):
        return f"mounted at {m['mountpoint']}"
    if m["state"] in ACTIVE_STATES:
        return f"for {m['mountpoint']} (the session process is not running)"
    return f"not mounted (mount point {m['mountpoint']})"


def _fetches(m: dict) -> str:
    return plural(m.get("demand_fetches") or 0, "fetch", "fetches")


def render_text(m: dict) -> str:
    """One session in plain text, one fact per line."""
    lines = [f"session {m['session']}: {m['state']}"
             + (f" ({m['phase']})" if m.get("phase") else "")
             + (" [process not running]" if _dead(m) else "")]
    if m.get("note"):
        lines.append(f"  note:        {m['note']}")
    if m.get("error"):
        lines.append(f"  error:       {m['error']}")
    lines.append(f"  backup:      {m.get('backup_name') or ''} {m['backup']} from {m['repo']}")
    lines.append(f"  destination: {m['dest']}  {_where(m)} ({m['fstype']}, "
                 f"{m['backend']} backend, cutover {m['cutover']})")
    if m.get("dest_state"):
        lines.append(f"  DEST:        {m['dest_state']}")
    if m["restored_bytes"] is not None:
        lines.append(f"  restored:    {format_size(m['restored_bytes'])} of "
                     f"{format_size(m['total_bytes'])} ({m['percent']:.1f}%)")
    if m["state"] in ("starting", "restoring"):
        lines.append(f"  throughput:  {format_rate(m['rate'])}   ETA {_duration(m['eta'])}")
    if m["demand_fetches"] is not None:
        lines.append(f"  on demand:   {_fetches(m)}, latency mean "
                     f"{_ms(m['demand_latency_mean'])}, p99 {_ms(m['demand_latency_p99'])}, "
                     f"max {_ms(m['demand_latency_max'])}")
    if m["overlay_bytes"] is not None:
        lines.append(f"  overlay:     {format_size(m['overlay_bytes'])} of application writes")
    lines.append(f"  repository:  {_repository(m)}")
    lines.append(f"  application: {_app(m)}")
    if _tracking(m):
        lines.append(f"  tracking:    {_tracking(m)}")
    for i, step in enumerate(m.get("app_stop_log") or []):
        lines.append(f"  {'last stop:' if i == 0 else '':<12} {step}")
    if _retry(m):
        lines.append(f"  cutover:     {_retry(m)}")
    t = m["timings"]
    if t.get("cutover_downtime") is not None:
        lines.append(f"  cutover:     downtime {t['cutover_downtime']:.2f} s, "
                     f"{format_size(t.get('merged_bytes') or 0)} merged")
    for w in m["warnings"]:
        lines.append(f"  warning:     {w}")
    for e in m["engine_errors"][-3:]:
        lines.append(f"  engine:      {e}")
    return "\n".join(lines)


def _finished_line(m: dict) -> str:
    """A finished session in one line: what it left and what to do with it."""
    name, state = m["session"], m["state"]
    if state == "done":
        what = f"the application runs on {m['dest']} at {m['mountpoint']}"
    elif state == "aborted":
        what = (f"overlay kept: `dmrecover resume {name}`, or `dmrecover forget {name} "
                "--discard-overlay`")
    else:
        what = (m.get("error") or "see its log").splitlines()[0][:70]
    when = m["timings"].get("done") if state == "done" else None
    at = time.strftime(" %Y-%m-%d %H:%M", time.localtime(when)) if when else ""
    return f"  {name:<20} {state + at:<24} {what}"


def render_list(models: Sequence[dict]) -> str:
    """Running sessions one line each ('!' after the state: see its note), then the
    finished ones (done, failed, aborted) briefly, with what `forget` does to them."""
    if not models:
        return "no sessions"
    active = [m for m in models if m["state"] in ACTIVE_STATES]
    finished = [m for m in models if m["state"] not in ACTIVE_STATES]
    lines = []
    if active:
        lines.append(f"{'SESSION':<20} {'STATE':<14} {'RESTORED':>8} {'APP':<12} MOUNTPOINT")
    for m in active:
        pct = f"{m['percent']:.1f}%" if m["percent"] is not None else "-"
        state = m["state"] + ("!" if m["note"] else "")
        lines.append(f"{m['session']:<20} {state:<14} {pct:>8} {str(m['app'] or '-'):<12} "
                     f"{m['mountpoint']}")
    if finished:
        if lines:
            lines.append("")
        lines.append("finished (`dmrecover forget SESSION` closes one and frees its name):")
        lines += [_finished_line(m) for m in finished]
    return "\n".join(lines)


def render_rich(m: dict) -> RenderableType:
    """One session as a rich panel with a progress bar."""
    t = Table.grid(padding=(0, 2))
    t.add_column(style="bold")
    t.add_column()
    state = m["state"] + (f" ({m['phase']})" if m.get("phase") else "")
    color = {"done": "green", "failed": "red", "aborted": "yellow"}.get(m["state"], "cyan")
    t.add_row("state", f"[{color}]{state}[/]" + (" [red](not running)[/]" if _dead(m) else ""))
    if m.get("error"):
        t.add_row("error", f"[red]{m['error']}[/]")
    if m["restored_bytes"] is not None:
        t.add_row("restored", f"{format_size(m['restored_bytes'])} / "
                  f"{format_size(m['total_bytes'])}  ({m['percent']:.1f}%)")
    t.add_row("throughput", f"{format_size(m['rate'] or 0)}/s   ETA {_duration(m['eta'])}")
    t.add_row("on demand", f"{m['demand_fetches'] or 0} fetches, mean "
              f"{_ms(m['demand_latency_mean'])}, p99 {_ms(m['demand_latency_p99'])}")
    t.add_row("overlay", format_size(m["overlay_bytes"] or 0))
    waiting = m.get("repository_lost_since") or m.get("waiting_for_repository_since")
    t.add_row("repository", f"[red]{_repository(m)}[/]" if waiting
              else f"ok ({m.get('retries') or 0} retries)")
    t.add_row("application", _app(m))
    if m.get("app_tracking_warning"):
        t.add_row("tracking", f"[yellow]{escape(_tracking(m) or '')}[/]")
    elif m.get("app_tracking"):
        t.add_row("tracking", escape(m["app_tracking"]))
    if m.get("app_stop_log"):
        t.add_row("last stop", escape("\n".join(m["app_stop_log"])))
    if _retry(m):
        t.add_row("cutover", f"[yellow]{escape(_retry(m) or '')}[/]")
    t.add_row("mount", f"{m['mountpoint']}  ->  {m['dest']}")
    down = m["timings"].get("cutover_downtime")
    if down is not None:
        t.add_row("cutover", f"downtime {down:.2f} s")
    bar = ProgressBar(total=100.0, completed=m["percent"] or 0.0, width=60)
    return Panel(Group(bar, t), title=f"dmrecover session {m['session']}", expand=False)


def _frame(models: Sequence[dict]) -> RenderableType:
    return Group(*(render_rich(m) for m in models)) if models else "no sessions"


class LiveStatus:
    """A rich display redrawn with each `update(models)`; a context manager."""

    def __init__(self, console: Console | None = None) -> None:
        self._live = Live("", console=console, refresh_per_second=4, transient=False)

    def __enter__(self) -> LiveStatus:
        self._live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._live.stop()

    def update(self, models: Sequence[dict]) -> None:
        self._live.update(_frame(models))


def watch(models: Callable[[], list[dict]], interval: float = 0.5,
          console: Console | None = None) -> int:
    """`status --watch`: redraw `models()` every `interval` seconds until Ctrl-C."""
    try:
        with LiveStatus(console) as live:
            while True:
                live.update(models())
                time.sleep(interval)
    except KeyboardInterrupt:
        pass  # Ctrl-C leaves the display; the session runs on
    return 0
