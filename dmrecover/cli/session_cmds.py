"""The live-restore verbs: `live-restore`, `session-run`, `resume`, `status`, `cutover`,
`abort`, `cleanup`. Each builds the typed call, and words what it returns."""

from __future__ import annotations

import argparse
import json
import sys

from dmrecover.cli import status_display
from dmrecover.cli.common import require_root
from dmrecover.session import boot, cleanup, control
from dmrecover.session.app import AppSpec
from dmrecover.session.record import SessionRecord, State, session_dir
from dmrecover.session.runner import run_session
from dmrecover.session.start import LiveRestoreRequest, start_live_restore
from dmrecover.session.status import model


def print_started(record: SessionRecord) -> None:
    """What live-restore and resume say once the application runs on the pseudo-volume."""
    extra = (f" --state-dir {record.state_dir}"
             if record.state_dir != session_dir(record.name) else "")
    print(f"session {record.name}: the application runs on {record.mountpoint} while "
          f"{record.backup_name or record.backup} is restored to {record.dest}")
    print(f"watch it:  dmrecover status {record.name}{extra} --watch")
    sys.stdout.flush()


def live_restore_request(args: argparse.Namespace) -> LiveRestoreRequest:
    """The typed request the live-restore arguments stand for."""
    return LiveRestoreRequest(
        repo=args.repo, backup=args.backup, dest=args.dest or "",
        dest_vg=getattr(args, "dest_vg", None), mountpoint=args.mount,
        app=AppSpec(start=args.app_start, stop=args.app_stop, unit=args.app_unit,
                    stop_timeout=args.stop_timeout),
        session=args.session, state_dir=args.state_dir, backend=args.backend,
        cutover=args.cutover, fetch_deadline=args.fetch_deadline, overlay=args.overlay,
        force=args.force, on_repository_lost=args.on_repository_lost,
        overlay_reserve=args.overlay_reserve)


def do_live_restore(args: argparse.Namespace) -> int:
    require_root("live-restore")
    start_live_restore(live_restore_request(args), foreground=args.foreground,
                       on_started=print_started)
    return 0


def do_session_run(args: argparse.Namespace) -> int:
    """Internal: the session process itself (run in the background or by systemd)."""
    require_root("session")
    return run_session(args.session, state_dir=args.state_dir, resume=args.resume)


def do_resume(args: argparse.Namespace) -> int:
    require_root("resume")
    started: list[SessionRecord] = []

    def on_started(record: SessionRecord) -> None:
        started.append(record)
        print_started(record)

    given = AppSpec(start=args.app_start, stop=args.app_stop, unit=args.app_unit)
    record = control.resume_session(args.session, state_dir=args.state_dir,
                                    foreground=args.foreground, on_started=on_started,
                                    app=given)
    if given.start or given.stop or given.unit:
        a = record.app
        how = f"unit {a.unit}" if a.unit else f"start `{a.start}`" + (
            f", stop `{a.stop}`" if a.stop else "")
        print(f"session {record.name}: the application is now run by {how} (recorded)")
    if not started and record.state == State.DONE:
        print(f"session {record.name} is done; nothing to resume")
    return 0


def do_status(args: argparse.Namespace) -> int:
    single = bool(args.session or args.state_dir)

    def models() -> list[dict]:
        if single:
            return [model(control.load_session(args.session, args.state_dir))]
        return [model(r) for r in control.list_sessions()]

    if args.watch:
        return status_display.watch(models, follow=args.follow)
    ms = models()
    if args.json:
        print(json.dumps(ms[0] if single else ms, indent=2))
    elif single:
        print(status_display.render_text(ms[0]))
    else:
        print(status_display.render_list(ms))
    return 0


def do_cutover(args: argparse.Namespace) -> int:
    require_root("cutover")
    res = control.request_cutover(args.session, state_dir=args.state_dir, online=args.online,
                                  wait=not args.no_wait)
    name = res.record.name
    if res.already_done:
        print(f"session {name} is already done")
        return 0
    if res.queued:
        print(f"cutover requested: it runs when the restore of {name} completes")
    if res.record.state == State.DONE:
        down = f" (downtime {res.downtime:.2f} s)" if res.downtime is not None else ""
        print(f"session {name}: done; the application runs on {res.record.dest} at "
              f"{res.record.mountpoint}{down}")
    return 0


def do_abort(args: argparse.Namespace) -> int:
    require_root("abort")
    res = control.abort_session(args.session, state_dir=args.state_dir,
                                force=args.force)
    name = res.record.name
    if res.already:
        print(f"session {name} is already aborted")
        return 0
    for w in res.record.warnings:
        if args.force and w.startswith("abort --force:"):
            print(f"dmrecover: warning: {w}", file=sys.stderr)
    print(f"session {name} aborted; the application is stopped and {res.record.mountpoint}"
          f" unmounted")
    print(f"the overlay (application writes, {res.overlay_bytes} bytes allocated) is kept in "
          f"{res.overlay_dir} (overlay.img, overlay.map, overlay.log); "
          f"`dmrecover resume {name}` continues, `dmrecover forget {name} --discard-overlay`"
          " drops it")
    return 0


def do_forget(args: argparse.Namespace) -> int:
    """Close a finished session: its state dir goes, its name is free again."""
    require_root("forget")
    res = control.forget_session(args.session, state_dir=args.state_dir,
                                 discard_overlay=args.discard_overlay)
    boot.disable(res.record.name)  # nothing left to resume at boot
    print(f"session {res.record.name} ({res.record.state}) forgotten: removed "
          f"{', '.join(res.removed)}")
    for line in res.left:
        print(f"  {line}")
    return 0


def do_cleanup(args: argparse.Namespace) -> int:
    """Remove what dead sessions left (mounts, device-mapper devices, loops, FUSE mounts)."""
    require_root("cleanup")
    found = cleanup.find_leftovers()
    if not found:
        print("nothing to clean up")
        return 0
    verb = "would remove" if args.dry_run else "removing"
    for f in found:
        print(f"{verb} {f}")
    if args.dry_run:
        return 0
    problems = cleanup.remove_leftovers(found)
    for p in problems:
        print(f"dmrecover: cleanup: {p}", file=sys.stderr)
    return 1 if problems else 0
