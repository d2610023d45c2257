"""The command line: one parser, one sub-parser per verb, each bound to its handler."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from typing import NoReturn

from dmrecover import __version__
from dmrecover.backends import registry
from dmrecover.cli import demo_cmd, repository_cmds, session_cmds
from dmrecover.cli.progress_display import MODES as PROGRESS_MODES
from dmrecover.demo.pgdemo import APPS as DEMO_APPS
from dmrecover.demo.volume import FSTYPES
from dmrecover.errors import DmrecoverError
from dmrecover.session.app import STOP_TIMEOUT
from dmrecover.units import parse_size

Handler = Callable[[argparse.Namespace], int]



class Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors: `dmrecover: error: ...`, exit code 2."""

    def error(self, message: str) -> NoReturn:
        print(f"dmrecover: error: {message} (see: {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except DmrecoverError as err:  # argparse reports ArgumentTypeError as a usage error
        raise argparse.ArgumentTypeError(str(err)) from None


def _seconds(text: str) -> float:
    """A duration in seconds: a positive, finite number (not inf, nan, 0 or negative)."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"bad duration {text!r}: a positive number of "
                                         "seconds, e.g. 30")
    return value


def _progress_opt(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--progress", choices=PROGRESS_MODES, default="auto",
                    help="progress display (default: rich on a TTY, else plain lines)")


def _backend_opt(sp: argparse.ArgumentParser, help: str | None = None) -> None:
    """--backend: "auto" or a registered backend (a new backend shows up by itself)."""
    sp.add_argument("--backend", choices=[registry.AUTO, *registry.names()],
                    default=registry.AUTO, help=help)


def _password_opt(sp: argparse.ArgumentParser, export: bool = False) -> None:
    sp.add_argument("--password-file", metavar="FILE",
                    type=repository_cmds.export_password_file if export else str,
                    help="read the repository password from FILE's first line (default: "
                    "$DMRECOVER_PASSWORD or $DMRECOVER_PASSWORD_FILE)")


def _state_dir_opt(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--state-dir", metavar="DIR",
                    help="the session's state dir (default: /var/lib/dmrecover/SESSION)")


def build_parser() -> argparse.ArgumentParser:
    """The whole command line; every verb's parser sets `handler`."""
    p = Parser(prog="dmrecover", description="Instant recovery of a data volume from backup.")
    p.add_argument("--version", action="version", version=f"dmrecover {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    sub = p.add_subparsers(dest="verb", metavar="VERB", required=True, parser_class=Parser)

    def verb(name: str, handler: Handler, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(handler=handler)
        return sp

    _repository_verbs(sub, verb)
    _session_verbs(verb)

    sp = verb("demo", demo_cmd.do_demo, "live-restore a sample database volume, end to end")
    sp.add_argument("--size", type=_size, default=256 << 20, help="volume size (default 256M)")
    sp.add_argument("--fstype", choices=FSTYPES, default="ext4")
    _backend_opt(sp)
    sp.add_argument("--workdir", metavar="DIR",
                    help="work directory (default: a new one under /var/tmp)")
    sp.add_argument("--keep", action="store_true", help="keep the work directory")
    sp.add_argument("--app", choices=DEMO_APPS, default="sample",
                    help="the application: the sample SQLite app (default), PostgreSQL 15, or "
                         "auto (PostgreSQL where installed)")
    return p


def _repository_verbs(sub: argparse._SubParsersAction,
                      verb: Callable[[str, Handler, str], argparse.ArgumentParser]) -> None:
    repo = sub.add_parser("repo", help="manage a backup repository")
    repo_sub = repo.add_subparsers(dest="repo_verb", metavar="ACTION", required=True)
    ri = repo_sub.add_parser("init", help="create a new repository")
    ri.add_argument("repo", metavar="REPO", help="a directory or s3://BUCKET/PREFIX")
    ri.add_argument("--encryption", choices=["aes-256-gcm", "none"], default="aes-256-gcm",
                    help="encrypt and authenticate (default) or store plain chunks")
    _password_opt(ri)
    ri.set_defaults(handler=repository_cmds.do_repo_init)
    _key_verbs(repo_sub)

    sp = verb("backup", repository_cmds.do_backup, "back up a block device or image file")
    sp.add_argument("source", metavar="SOURCE")
    sp.add_argument("--repo", required=True)
    _password_opt(sp)
    sp.add_argument("--name", default=None, help="a name for the backup (default: source name)")
    sp.add_argument("--chunk-size", type=_size, default=4 << 20,
                    help="chunk size, 64K to 16M (default 4M)")
    _progress_opt(sp)

    sp = verb("list", repository_cmds.do_list, "list the backups in a repository")
    sp.add_argument("--repo", required=True)
    _password_opt(sp)
    sp.add_argument("--json", action="store_true")

    sp = verb("verify", repository_cmds.do_verify, "re-read and re-hash every chunk")
    sp.add_argument("--repo", required=True)
    _password_opt(sp)
    sp.add_argument("backup", nargs="?", metavar="BACKUP", help="one backup (default: all)")
    _progress_opt(sp)

    sp = verb("restore", repository_cmds.do_restore,
              "full offline restore to a block device or file")
    sp.add_argument("--repo", required=True)
    _password_opt(sp)
    sp.add_argument("backup", metavar="BACKUP")
    sp.add_argument("dest", metavar="DEST")
    sp.add_argument("--force", action="store_true",
                    help="overwrite a destination that holds a filesystem")
    _progress_opt(sp)


def _key_verbs(repo_sub: argparse._SubParsersAction) -> None:
    key = repo_sub.add_parser("key", help="manage the passwords of an encrypted repository")
    key_sub = key.add_subparsers(dest="key_verb", metavar="ACTION", required=True)
    for name, handler, help in (
            ("list", repository_cmds.do_key_list, "list the key files"),
            ("add", repository_cmds.do_key_add, "add a password (a new key file)"),
            ("remove", repository_cmds.do_key_remove, "remove a key file by id"),
            ("passwd", repository_cmds.do_key_passwd, "change the password used")):
        sp = key_sub.add_parser(name, help=help, description=help)
        sp.set_defaults(handler=handler)
        sp.add_argument("--repo", required=True)
        _password_opt(sp)
        if name in ("add", "passwd"):
            sp.add_argument("--new-password-file", metavar="FILE", required=True,
                            help="the new password, FILE's first line")
        if name == "remove":
            sp.add_argument("key_id", metavar="KEY_ID")


def _session_verbs(verb: Callable[[str, Handler, str], argparse.ArgumentParser]) -> None:
    sp = verb("live-restore", session_cmds.do_live_restore,
              "restore while the application runs on a pseudo-volume")
    sp.add_argument("--repo", required=True)
    _password_opt(sp, export=True)
    sp.add_argument("backup", metavar="BACKUP")
    sp.add_argument("dest", metavar="DEST")
    sp.add_argument("--mount", required=True, metavar="MOUNTPOINT",
                    help="where the application finds its volume (an empty directory)")
    sp.add_argument("--app-start", metavar="CMD", help="command that starts the application")
    sp.add_argument("--app-stop", metavar="CMD", help="command that stops the application")
    sp.add_argument("--app-unit", metavar="UNIT", help="a systemd unit instead of commands")
    sp.add_argument("--stop-timeout", type=_seconds, default=STOP_TIMEOUT, metavar="SECONDS",
                    help="how long the application may take to stop (the stop command, or "
                    "`systemctl stop`, and its processes exiting) before dmrecover sends "
                    f"SIGTERM, then SIGKILL (default {STOP_TIMEOUT:g})")
    _backend_opt(sp, "how the pseudo-volume is presented (default: the best available)")
    sp.add_argument("--session", metavar="NAME", help="session name (default: the mount "
                    "point's name)")
    sp.add_argument("--cutover", choices=["auto", "manual", "online"], default="auto",
                    help="auto: when restored; manual: on `dmrecover cutover`; online: merge "
                    "without stopping the application (dm backend)")
    sp.add_argument("--overlay", metavar="DIR",
                    help="a directory for the engine's files: the overlay holding the "
                    "application's writes and the restore map (default: the state dir)")
    _state_dir_opt(sp)
    sp.add_argument("--foreground", action="store_true",
                    help="run the session in this process instead of in the background")
    sp.add_argument("--fetch-deadline", type=_seconds, default=600.0, metavar="SECONDS",
                    help="how long an unreachable repository is retried before it counts as "
                    "lost (status says so; see --on-repository-lost)")
    sp.add_argument("--on-repository-lost", choices=["block", "error"], default="block",
                    help="past --fetch-deadline, reads that need the repository wait for it "
                    "(block, the default) or fail with EIO (error: the portable backend "
                    "only); the restore waits either way and goes on when it returns")
    sp.add_argument("--overlay-reserve", type=_size, default=64 << 20, metavar="SIZE",
                    help="free room the overlay's filesystem must have at start (default 64M)")
    sp.add_argument("--force", action="store_true",
                    help="overwrite a destination that holds a filesystem")

    sp = verb("resume", session_cmds.do_resume, "continue a session after a crash or reboot")
    sp.add_argument("session", metavar="SESSION")
    _state_dir_opt(sp)
    sp.add_argument("--foreground", action="store_true")

    sp = verb("session-run", session_cmds.do_session_run,
              "internal: the session process that live-restore and resume start")
    sp.add_argument("session", metavar="SESSION")
    _state_dir_opt(sp)
    sp.add_argument("--resume", action="store_true")

    sp = verb("status", session_cmds.do_status, "show live-restore sessions")
    sp.add_argument("session", nargs="?", metavar="SESSION")
    _state_dir_opt(sp)
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--watch", action="store_true", help="live display; Ctrl-C leaves")

    sp = verb("cutover", session_cmds.do_cutover,
              "switch the application to the restored volume")
    sp.add_argument("session", metavar="SESSION")
    _state_dir_opt(sp)
    sp.add_argument("--online", action="store_true", help="merge without stopping the app (dm)")
    sp.add_argument("--no-wait", action="store_true",
                    help="return once the request is queued")

    sp = verb("abort", session_cmds.do_abort, "stop the application and tear the session down")
    sp.add_argument("session", metavar="SESSION")
    _state_dir_opt(sp)

    sp = verb("cleanup", session_cmds.do_cleanup,
              "remove stale devices, loops and mounts left by a crash")
    sp.add_argument("--dry-run", action="store_true")
