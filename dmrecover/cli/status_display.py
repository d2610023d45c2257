"""How `dmrecover status` shows a session: plain text, a table of sessions, a rich panel, and
the `--watch` loop. The data is the status model (`dmrecover.session.status.model`), a
JSON-ready dict; this module only formats it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

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


def health(m: dict) -> tuple[str, str]:
    """(word, colour) for the top line: healthy green, waiting for the repository yellow,
    failed or dead red, aborted yellow."""
    if _dead(m):
        return "DEAD: session process not running", "red"
    if m["state"] == "failed":
        return "needs the operator (see error)", "red"
    if m["state"] == "aborted":
        return "aborted", "yellow"
    if m.get("repository_lost_since") or m.get("waiting_for_repository_since"):
        return "waiting for repository", "yellow"
    if m["warnings"] or _retry(m):
        return "healthy, with warnings", "yellow"
    return ("finished: the application runs on DEST" if m["state"] == "done"
            else "healthy"), "green"


def _restored(m: dict) -> bool:
    return m["restored_bytes"] is not None and m["restored_bytes"] >= (m["total_bytes"] or 0)


def _rate_eta(m: dict) -> str:
    """Rate and ETA while bytes are still coming; "restored" once they all are; nothing for
    a dead or finished session (no stale rate)."""
    if _restored(m):
        return "restored"
    if _dead(m) or m["state"] not in ACTIVE_STATES:
        return "-"
    return f"{format_rate(m['rate'])}   ETA {_duration(m['eta'])}"


CUTOVER_STEPS = (("stop app", "cutover_started", "app_stopped"),
                 ("merge", "app_stopped", "merged"),
                 ("restart app", "merged", "app_restarted"))


def _cutover_steps(m: dict) -> str | None:
    """The cutover's phases as they happen: each finished one with its time, the current
    one running."""
    t = m["timings"]
    if "cutover_started" not in t:
        return None
    parts = []
    for name, start, end in CUTOVER_STEPS:
        if isinstance(t.get(end), (int, float)) and isinstance(t.get(start), (int, float)):
            parts.append(f"{name} {t[end] - t[start]:.2f} s")
        elif isinstance(t.get(start), (int, float)):
            running = "" if _dead(m) or m["state"] != "cutting-over" else " ..."
            parts.append(f"[bold]{name}{running}[/]")
            break
    down = t.get("cutover_downtime")
    if isinstance(down, (int, float)):
        parts.append(f"downtime {down:.2f} s")
    return " > ".join(parts)


def render_rich(m: dict, width: int = 100) -> RenderableType:
    """One session for a wall screen: state and phase on top in the health colour, the
    progress bar with restored bytes, rate and ETA, on-demand latency, overlay against its
    room, repository, application, cutover steps, warnings."""
    word, colour = health(m)
    state = m["state"] + (f" ({m['phase']})" if m.get("phase") else "")
    top = Text.from_markup(f"[bold {colour}]{escape(state.upper())}[/]  [{colour}]"
                           f"{escape(word)}[/]")
    t = Table.grid(padding=(0, 2))
    t.add_column(style="bold", no_wrap=True)
    t.add_column()
    if m.get("error"):
        t.add_row("error", f"[red]{escape(m['error'])}[/]")
    if m.get("note"):
        t.add_row("note", f"[red]{escape(m['note'])}[/]")
    bar = ProgressBar(total=100.0, completed=m["percent"] or 0.0, width=max(20, width - 20),
                      complete_style=colour, finished_style=colour)
    t.add_row("progress", bar)
    if m["restored_bytes"] is not None:
        t.add_row("restored", f"{format_size(m['restored_bytes'])} of "
                  f"{format_size(m['total_bytes'])} ({m['percent'] or 0:.1f}%)")
    t.add_row("rate", _rate_eta(m))
    t.add_row("on demand", f"{_fetches(m)}, mean {_ms(m['demand_latency_mean'])}, "
              f"p99 {_ms(m['demand_latency_p99'])}, max {_ms(m['demand_latency_max'])}")
    room, used = m.get("overlay_room"), m.get("overlay_allocated")
    overlay = format_size(m["overlay_bytes"] or 0) + " of application writes"
    if room and used is not None:
        overlay += f"; {format_size(used)} used of {format_size(room)} room " \
                   f"({100.0 * used / room:.0f}%)"
    t.add_row("overlay", overlay)
    waiting = m.get("repository_lost_since") or m.get("waiting_for_repository_since")
    t.add_row("repository", f"[yellow]{escape(_repository(m))}[/]" if waiting
              else f"ok ({_repository(m)})")
    t.add_row("application", escape(_app(m)))
    if m.get("app_tracking_warning"):
        t.add_row("tracking", f"[yellow]{escape(_tracking(m) or '')}[/]")
    elif m.get("app_tracking"):
        t.add_row("tracking", escape(m["app_tracking"]))
    if m.get("app_stop_log"):
        t.add_row("last stop", escape("\n".join(m["app_stop_log"])))
    steps = _cutover_steps(m)
    if steps:
        t.add_row("cutover", steps)
    if _retry(m):
        t.add_row("cutover", f"[yellow]{escape(_retry(m) or '')}[/]")
    t.add_row("volume", escape(f"{m['dest']}  {_where(m)}"))
    for w in m["warnings"]:
        t.add_row("warning", f"[yellow]{escape(w)}[/]")
    return Panel(Group(top, t), title=f"dmrecover session {m['session']}",
                 border_style=colour, width=width)


def render_table(models: Sequence[dict], height: int | None = None) -> RenderableType:
    """Many sessions, one row each, as many as fit in `height` rows (a line says how many
    more there are)."""
    t = Table(expand=True, box=None, header_style="bold", pad_edge=False)
    for col, just in (("SESSION", "left"), ("STATE", "left"), ("HEALTH", "left"),
                      ("RESTORED", "right"), ("RATE / ETA", "right"), ("APP", "left")):
        t.add_column(col, justify=just, no_wrap=True, overflow="ellipsis")  # type: ignore
    room = len(models) if height is None else max(1, height - 3)
    shown = models if len(models) <= room else models[:room - 1]
    for m in shown:
        word, colour = health(m)
        pct = f"{m['percent']:.1f}%" if m["percent"] is not None else "-"
        t.add_row(escape(m["session"]), f"[{colour}]{escape(m['state'])}[/]",
                  f"[{colour}]{escape(word)}[/]", pct, _rate_eta(m), escape(_app(m)))
    if len(shown) < len(models):
        t.add_row(f"... {len(models) - len(shown)} more", "", "", "", "", "")
    return t


def summary(models: Sequence[dict]) -> str:
    """The lines `status --watch` leaves when the sessions have ended."""
    out = []
    for m in models:
        line = f"session {m['session']}: {m['state']}"
        down = m["timings"].get("cutover_downtime")
        if m["state"] == "done":
            line += f"; the application runs on {m['dest']} at {m['mountpoint']}"
            if isinstance(down, (int, float)):
                line += f" (downtime {down:.2f} s)"
        elif _dead(m):
            line += f"; its process is not running: dmrecover resume {m['session']}"
        elif m.get("error"):
            line += f": {m['error']}"
        out.append(line)
    return "\n".join(out)


def plain_line(m: dict) -> str:
    """One line per session and tick, for a log or a pipe."""
    word, _ = health(m)
    pct = f"{m['percent']:.1f}%" if m["percent"] is not None else "-"
    return (f"{time.strftime('%H:%M:%S')} {m['session']} {m['state']}"
            + (f" ({m['phase']})" if m.get("phase") else "")
            + f" [{word}] {pct} {_rate_eta(m)} app {_app(m)}")


def _frame(models: Sequence[dict], width: int, height: int) -> RenderableType:
    if not models:
        return "no sessions"
    if len(models) == 1:
        return render_rich(models[0], width=min(width, 120))
    return render_table(models, height)


def _ended(models: Sequence[dict]) -> bool:
    """Nothing left to watch: every session finished, or its process dead."""
    return all(m["state"] not in ACTIVE_STATES or _dead(m) for m in models)


class RateWindow:
    """The restore rate averaged over the last `window` seconds of samples the watch took,
    per session (steadier than the last half second, and 0 only when it really stalls)."""

    def __init__(self, window: float = 10.0) -> None:
        self.window = window
        self._samples: dict[str, deque[tuple[float, int]]] = {}

    def apply(self, m: dict, now: float | None = None) -> dict:
        now = time.monotonic() if now is None else now
        if m["restored_bytes"] is None or _dead(m) or m["state"] not in ACTIVE_STATES:
            return m
        q = self._samples.setdefault(m["session"], deque())
        q.append((now, m["restored_bytes"]))
        while len(q) > 2 and now - q[0][0] > self.window:
            q.popleft()
        (t0, b0), (t1, b1) = q[0], q[-1]
        if t1 - t0 < 1.0:
            return m  # too short a window: the session's own rate
        rate = max(0.0, (b1 - b0) / (t1 - t0))
        left = (m["total_bytes"] or 0) - b1
        return {**m, "rate": rate, "eta": (left / rate) if rate > 0 else None}


class LiveStatus:
    """A rich display redrawn with each `update(models)`; a context manager."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console()
        self._live = Live("", console=self.console, refresh_per_second=4, transient=False,
                          vertical_overflow="crop")

    def __enter__(self) -> LiveStatus:
        self._live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._live.stop()

    def update(self, models: Sequence[dict]) -> None:
        size = self.console.size
        self._live.update(_frame(models, size.width, size.height), refresh=True)


def watch(models: Callable[[], list[dict]], interval: float = 0.5,
          console: Console | None = None, follow: bool = False) -> int:
    """`status --watch`: redraw every `interval` seconds; leave with a summary once every
    session has ended (unless follow) or on Ctrl-C. Not a terminal: one plain line per
    session and tick instead."""
    console = console or Console()
    rates = RateWindow()
    current: list[dict] = []
    try:
        if not console.is_terminal:
            while True:
                current = [rates.apply(m) for m in models()]
                for m in current:
                    console.print(plain_line(m), highlight=False, soft_wrap=True, markup=False)
                if not current:
                    console.print("no sessions")
                console.file.flush()
                if not follow and _ended(current):
                    break
                time.sleep(interval)
        else:
            with LiveStatus(console) as live:
                while True:
                    current = [rates.apply(m) for m in models()]
                    live.update(current)
                    if not follow and _ended(current):
                        break
                    time.sleep(interval)
    except KeyboardInterrupt:
        pass  # Ctrl-C leaves the display; the session runs on
    if current and _ended(current):
        console.print(summary(current), highlight=False, soft_wrap=True, markup=False)
    return 0
