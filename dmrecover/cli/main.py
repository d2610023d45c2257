"""Command-line interface: one parser, one small handler per verb.

Handlers only parse, call into the engine modules, and render. Every DmrecoverError becomes one
line on stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable

from dmrecover import __version__
from dmrecover.errors import DmrecoverError, NotRootError
from dmrecover.units import parse_size

log = logging.getLogger("dmrecover")

Handler = Callable[[argparse.Namespace], int]


def require_root(what: str) -> None:
    """Fail early, before anything is touched, when root is needed and we are not."""
    if os.geteuid() != 0:
        raise NotRootError(f"{what} needs root", hint="run it as root (sudo dmrecover ...)")


# ---------------------------------------------------------------- repository verbs


def cmd_repo_init(args: argparse.Namespace) -> int:
    from dmrecover.repository.repo import Repository

    repo = Repository.init(args.repo)
    print(f"initialised repository at {repo.path}")
    return 0


def cmd_backup(args: argparse.Namespace) -> int:
    from dmrecover.cli.progress_display import make_renderer
    from dmrecover.repository.backup import backup, check_chunk_size
    from dmrecover.repository.repo import Repository
    from dmrecover.system.blockdev import is_block_device

    check_chunk_size(args.chunk_size)
    if is_block_device(args.source):
        require_root(f"backing up block device {args.source}")
    repo = Repository.open(args.repo)
    manifest = backup(
        args.source,
        repo,
        name=args.name,
        chunk_size=args.chunk_size,
        renderer=make_renderer(args.progress),
    )
    st = manifest.stats
    log.info("backup %s: %d chunks, %d new, %d deduplicated, %d zero", manifest.id,
             st.get("chunks", 0), st.get("new_chunks", 0), st.get("dedup_chunks", 0),
             st.get("zero_chunks", 0))
    print(manifest.id)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from dmrecover.repository.repo import Repository
    from dmrecover.units import format_size

    repo = Repository.open(args.repo)
    manifests = repo.backups()
    if args.json:
        print(json.dumps([m.summary() for m in manifests], indent=2))
        return 0
    if not manifests:
        print("no backups")
        return 0
    print(f"{'ID':<18} {'NAME':<20} {'CREATED':<20} {'SIZE':>10} {'CHUNK':>9} {'FS':<6} STORED")
    for m in manifests:
        s = m.summary()
        print(
            f"{m.id:<18} {m.name:<20} {s['created_iso']:<20} {format_size(m.size):>10} "
            f"{format_size(m.chunk_size):>9} {m.fstype or '-':<6} {s['stored_chunks']}"
            f"/{m.chunk_count}"
        )
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from dmrecover.cli.progress_display import make_renderer
    from dmrecover.repository.repo import Repository
    from dmrecover.repository.verify import verify

    repo = Repository.open(args.repo)
    bad = verify(repo, args.backup, renderer=make_renderer(args.progress))
    for problem in bad:
        print(problem, file=sys.stderr)
    if bad:
        print(f"verify: {len(bad)} bad chunk(s)", file=sys.stderr)
        return 1
    print("verify: all chunks good")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from dmrecover.cli.progress_display import make_renderer
    from dmrecover.repository.repo import Repository
    from dmrecover.repository.restore import restore
    from dmrecover.system.blockdev import is_block_device

    if is_block_device(args.dest):
        require_root(f"restoring to block device {args.dest}")
    repo = Repository.open(args.repo)
    manifest = repo.manifest(args.backup)
    restore(repo, manifest, args.dest, renderer=make_renderer(args.progress),
            force=args.force)
    print(f"restored {manifest.id} to {args.dest}")
    return 0


# ---------------------------------------------------------------- live-restore verbs


def cmd_live_restore(args: argparse.Namespace) -> int:
    require_root("live-restore")
    from dmrecover.session.session import start_live_restore

    return start_live_restore(args)


def cmd_session_run(args: argparse.Namespace) -> int:
    """Internal: the session process itself (run in the background or by systemd)."""
    require_root("session")
    from dmrecover.session.session import run_session

    return run_session(args.session, state_dir=args.state_dir, resume=args.resume)


def cmd_resume(args: argparse.Namespace) -> int:
    require_root("resume")
    from dmrecover.session.session import resume_session

    return resume_session(args.session, state_dir=args.state_dir, foreground=args.foreground)


def cmd_status(args: argparse.Namespace) -> int:
    from dmrecover.cli import status_display
    from dmrecover.session.session import Session, list_sessions
    from dmrecover.session.status import model

    single = bool(args.session or args.state_dir)

    def models() -> list[dict]:
        found = [Session.load(args.session, args.state_dir)] if single else list_sessions()
        return [model(s) for s in found]

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


def cmd_cutover(args: argparse.Namespace) -> int:
    require_root("cutover")
    from dmrecover.session.session import request_cutover

    return request_cutover(args.session, state_dir=args.state_dir, online=args.online,
                           wait=not args.no_wait)


def cmd_abort(args: argparse.Namespace) -> int:
    require_root("abort")
    from dmrecover.session.session import abort_session

    return abort_session(args.session, state_dir=args.state_dir)


def cmd_cleanup(args: argparse.Namespace) -> int:
    require_root("cleanup")
    from dmrecover.session.cleanup import cleanup_command

    return cleanup_command(args)


def cmd_demo(args: argparse.Namespace) -> int:
    require_root("demo")
    from dmrecover.demo.demo import run_demo

    return run_demo(args)


# ---------------------------------------------------------------- parser


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except DmrecoverError as err:  # argparse reports ArgumentTypeError as a usage error
        raise argparse.ArgumentTypeError(str(err)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dmrecover",
        description="Instant recovery of a data volume from backup.",
    )
    p.add_argument("--version", action="version", version=f"dmrecover {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    sub = p.add_subparsers(dest="verb", metavar="VERB", required=True)

    def verb(name: str, handler: Handler, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(handler=handler)
        return sp

    def progress_opt(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--progress", choices=["auto", "rich", "plain", "json", "none"],
                        default="auto", help="progress display (default: rich on a TTY)")

    # repo init
    repo = sub.add_parser("repo", help="manage a backup repository")
    repo_sub = repo.add_subparsers(dest="repo_verb", metavar="ACTION", required=True)
    ri = repo_sub.add_parser("init", help="create a new repository")
    ri.add_argument("repo", metavar="REPO")
    ri.set_defaults(handler=cmd_repo_init)

    sp = verb("backup", cmd_backup, "back up a block device or image file")
    sp.add_argument("source", metavar="SOURCE")
    sp.add_argument("--repo", required=True)
    sp.add_argument("--name", default=None, help="a name for the backup (default: source name)")
    sp.add_argument("--chunk-size", type=_size, default=4 << 20,
                    help="chunk size, 64K to 16M (default 4M)")
    progress_opt(sp)

    sp = verb("list", cmd_list, "list the backups in a repository")
    sp.add_argument("--repo", required=True)
    sp.add_argument("--json", action="store_true")

    sp = verb("verify", cmd_verify, "re-read and re-hash every chunk")
    sp.add_argument("--repo", required=True)
    sp.add_argument("backup", nargs="?", metavar="BACKUP", help="one backup (default: all)")
    progress_opt(sp)

    sp = verb("restore", cmd_restore, "full offline restore to a block device or file")
    sp.add_argument("--repo", required=True)
    sp.add_argument("backup", metavar="BACKUP")
    sp.add_argument("dest", metavar="DEST")
    sp.add_argument("--force", action="store_true",
                    help="overwrite a destination that holds a filesystem")
    progress_opt(sp)

    sp = verb("live-restore", cmd_live_restore,
              "restore while the application runs on a pseudo-volume")
    sp.add_argument("--repo", required=True)
    sp.add_argument("backup", metavar="BACKUP")
    sp.add_argument("dest", metavar="DEST")
    sp.add_argument("--mount", required=True, metavar="MOUNTPOINT")
    sp.add_argument("--app-start", metavar="CMD")
    sp.add_argument("--app-stop", metavar="CMD")
    sp.add_argument("--app-unit", metavar="UNIT")
    sp.add_argument("--backend", choices=["auto", "fuse", "dm"], default="auto")
    sp.add_argument("--session", metavar="NAME")
    sp.add_argument("--cutover", choices=["auto", "manual", "online"], default="auto")
    sp.add_argument("--overlay", metavar="PATH",
                    help="overlay file (or LVM volume group for --backend dm)")
    sp.add_argument("--state-dir", metavar="DIR")
    sp.add_argument("--foreground", action="store_true")
    sp.add_argument("--fetch-deadline", type=float, default=600.0, metavar="SECONDS",
                    help="how long a read waits for an unreachable repository before failing")
    sp.add_argument("--force", action="store_true",
                    help="overwrite a destination that holds a filesystem")

    sp = verb("resume", cmd_resume, "continue a session after a crash or reboot")
    sp.add_argument("session", metavar="SESSION")
    sp.add_argument("--state-dir", metavar="DIR")
    sp.add_argument("--foreground", action="store_true")

    sp = verb("session-run", cmd_session_run,
              "internal: the session process that live-restore and resume start")
    sp.add_argument("session", metavar="SESSION")
    sp.add_argument("--state-dir", metavar="DIR")
    sp.add_argument("--resume", action="store_true")

    sp = verb("status", cmd_status, "show live-restore sessions")
    sp.add_argument("session", nargs="?", metavar="SESSION")
    sp.add_argument("--state-dir", metavar="DIR")
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--watch", action="store_true", help="live display; Ctrl-C leaves")

    sp = verb("cutover", cmd_cutover, "switch the application to the restored volume")
    sp.add_argument("session", metavar="SESSION")
    sp.add_argument("--state-dir", metavar="DIR")
    sp.add_argument("--online", action="store_true", help="merge without stopping the app (dm)")
    sp.add_argument("--no-wait", action="store_true")

    sp = verb("abort", cmd_abort, "stop the application and tear the session down")
    sp.add_argument("session", metavar="SESSION")
    sp.add_argument("--state-dir", metavar="DIR")

    sp = verb("cleanup", cmd_cleanup, "remove stale devices, loops and mounts left by a crash")
    sp.add_argument("--dry-run", action="store_true")

    sp = verb("demo", cmd_demo, "live-restore a sample database volume, end to end")
    sp.add_argument("--size", type=_size, default=256 << 20)
    sp.add_argument("--fstype", choices=["ext4", "xfs"], default="ext4")
    sp.add_argument("--backend", choices=["auto", "fuse", "dm"], default="auto")
    sp.add_argument("--workdir", metavar="DIR")
    sp.add_argument("--keep", action="store_true", help="keep the work directory")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    try:
        return args.handler(args)
    except DmrecoverError as err:
        print(f"dmrecover: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("dmrecover: interrupted", file=sys.stderr)
        return 130
