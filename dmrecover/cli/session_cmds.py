"""The live-restore verbs: `live-restore`, `session-run`, `resume`, `status`, `cutover`,
`abort`, `cleanup`."""

from __future__ import annotations

import argparse
import json

from dmrecover.cli import status_display
from dmrecover.cli.common import require_root
from dmrecover.session import session
from dmrecover.session.cleanup import find_leftovers, remove_leftovers
from dmrecover.session.status import model


def do_live_restore(args: argparse.Namespace) -> int:
    require_root("live-restore")
    return session.start_live_restore(args)


def do_session_run(args: argparse.Namespace) -> int:
    """Internal: the session process itself (run in the background or by systemd)."""
    require_root("session")
    return session.run_session(args.session, state_dir=args.state_dir, resume=args.resume)


def do_resume(args: argparse.Namespace) -> int:
    require_root("resume")
    return session.resume_session(args.session, state_dir=args.state_dir,
                                  foreground=args.foreground)


def do_status(args: argparse.Namespace) -> int:
    single = bool(args.session or args.state_dir)

    def models() -> list[dict]:
        if single:
            return [model(session.Session.load(args.session, args.state_dir))]
        return [model(s) for s in session.list_sessions()]

    if args.watch:
        return status_display.watch(models)
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
    return session.request_cutover(args.session, state_dir=args.state_dir, online=args.online,
                                   wait=not args.no_wait)


def do_abort(args: argparse.Namespace) -> int:
    require_root("abort")
    return session.abort_session(args.session, state_dir=args.state_dir)


def do_cleanup(args: argparse.Namespace) -> int:
    """Remove what dead sessions left (mounts, device-mapper devices, loops, FUSE mounts)."""
    require_root("cleanup")
    found = find_leftovers()
    if found.empty():
        print("nothing to clean up")
        return 0
    verb = "would remove" if args.dry_run else "removing"
    for mp in found.mounts:
        print(f"{verb} mount {mp}")
    for dm in found.dm:
        print(f"{verb} device-mapper device {dm}")
    for dev in found.loops:
        print(f"{verb} loop device {dev}")
    for path in found.fuse:
        print(f"{verb} FUSE mount {path}")
    if args.dry_run:
        return 0
    problems = remove_leftovers(found)
    for p in problems:
        print(f"dmrecover: cleanup: {p}")
    return 1 if problems else 0
