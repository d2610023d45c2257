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
from dmrecover.session.record import state_root
from dmrecover.units import parse_size

Handler = Callable[[argparse.Namespace], int]



class HelpFormatter(argparse.HelpFormatter):
    """argparse's help, with "(default: X)" added to every option whose help does not name its
    default already (no "(default: None)" or "(default: False)" noise)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if ("default" in text or default in (None, False, argparse.SUPPRESS)
                or isinstance(action, argparse._CountAction)
                or not (action.option_strings or action.nargs == "?")):
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors: `dmrecover: error: ...`, exit code 2."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

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


def _global_opts(sp: argparse.ArgumentParser) -> None:
    """The global options again on every verb, so `dmrecover status -v` works like
    `dmrecover -v status` (a dest of their own: one does not reset the other)."""
    sp.add_argument("-v", "--verbose", action="count", default=0, dest="verbose_after",
                    help="more logging (-vv: debug); also accepted before the verb")


def _repo_opt(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--repo", required=True, metavar="REPO",
                    help="the repository: a directory or s3://BUCKET/PREFIX")


def _session_arg(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("session", metavar="SESSION",
                    help="the session's name (`dmrecover status` lists them)")


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
                    help=f"the session's state dir (default: {state_root()}/SESSION; "
                    "$DMRECOVER_STATE_ROOT moves the root)")


def build_parser() -> argparse.ArgumentParser:
    """The whole command line; every verb's parser sets `handler`."""
    p = Parser(prog="dmrecover", description="Instant recovery of a data volume from backup.",
               epilog="Sessions live in "
               f"{state_root()}/SESSION (root only). `dmrecover VERB --help` for a verb's "
               "options; `man dmrecover` for all of them; docs/operations.md is the runbook.")
    p.add_argument("--version", action="version", version=f"dmrecover {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="more logging (-vv: debug); also accepted after the verb")
    sub = p.add_subparsers(dest="verb", metavar="VERB", required=True, parser_class=Parser)

    def verb(name: str, handler: Handler, help: str, hidden: bool = False
             ) -> argparse.ArgumentParser:
        # An internal verb is added without `help`: argparse then leaves it out of the list.
        sp = (sub.add_parser(name, description=help) if hidden
              else sub.add_parser(name, help=help, description=help))
        sp.set_defaults(handler=handler)
        _global_opts(sp)
        return sp

    _repository_verbs(sub, verb)
    _session_verbs(verb)

    sp = verb("demo", demo_cmd.do_demo, "live-restore a sample database volume, end to end")
    sp.add_argument("--size", type=_size, default=256 << 20, help="volume size (default 256M)")
    sp.add_argument("--fstype", choices=FSTYPES, default="ext4",
                    help="the sample volume's filesystem")
    _backend_opt(sp, "how the pseudo-volume is presented (default: the best available)")
    sp.add_argument("--workdir", metavar="DIR",
                    help="work directory (default: a new one under /var/tmp)")
    sp.add_argument("--keep", action="store_true", help="keep the work directory")
    sp.add_argument("--app", choices=DEMO_APPS, default="sample",
                    help="the application: the sample SQLite app (default), PostgreSQL 15, or "
                         "auto (PostgreSQL where installed)")
    return p


def _repository_verbs(sub: argparse._SubParsersAction,
                      verb: Callable[..., argparse.ArgumentParser]) -> None:
    repo = sub.add_parser("repo", help="manage a backup repository",
                          description="manage a backup repository")
    repo_sub = repo.add_subparsers(dest="repo_verb", metavar="ACTION", required=True)
    ri = repo_sub.add_parser("init", help="create a new repository",
                             description="create a new repository")
    _global_opts(ri)
    ri.add_argument("repo", metavar="REPO", help="a directory or s3://BUCKET/PREFIX")
    ri.add_argument("--encryption", choices=["aes-256-gcm", "none"], default="aes-256-gcm",
                    help="encrypt and authenticate (default) or store plain chunks")
    _password_opt(ri)
    ri.set_defaults(handler=repository_cmds.do_repo_init)
    _key_verbs(repo_sub)

    sp = verb("backup", repository_cmds.do_backup, "back up a block device or image file")
    sp.add_argument("source", metavar="SOURCE", help="the block device or image file to read")
    _repo_opt(sp)
    _password_opt(sp)
    sp.add_argument("--name", default=None, help="a name for the backup (default: source name)")
    sp.add_argument("--chunk-size", type=_size, default=4 << 20,
                    help="chunk size, 64K to 16M (default 4M)")
    _progress_opt(sp)

    sp = verb("list", repository_cmds.do_list, "list the backups in a repository")
    _repo_opt(sp)
    _password_opt(sp)
    sp.add_argument("--json", action="store_true", help="print JSON instead of a table")

    sp = verb("verify", repository_cmds.do_verify, "re-read and re-hash every chunk")
    _repo_opt(sp)
    _password_opt(sp)
    sp.add_argument("backup", nargs="?", metavar="BACKUP", help="one backup (default: all)")
    _progress_opt(sp)

    sp = verb("restore", repository_cmds.do_restore,
              "full offline restore to a block device or file")
    _repo_opt(sp)
    _password_opt(sp)
    sp.add_argument("backup", metavar="BACKUP", help="the backup's name or id (`dmrecover list`)")
    sp.add_argument("dest", metavar="DEST",
                    help="the block device or file to write (a file is created)")
    sp.add_argument("--force", action="store_true",
                    help="overwrite a destination that holds a filesystem")
    _progress_opt(sp)


def _key_verbs(repo_sub: argparse._SubParsersAction) -> None:
    key = repo_sub.add_parser("key", help="manage the passwords of an encrypted repository",
                              description="manage the passwords of an encrypted repository")
    key_sub = key.add_subparsers(dest="key_verb", metavar="ACTION", required=True)
    for name, handler, help in (
            ("list", repository_cmds.do_key_list, "list the key files"),
            ("add", repository_cmds.do_key_add, "add a password (a new key file)"),
            ("remove", repository_cmds.do_key_remove, "remove a key file by id"),
            ("passwd", repository_cmds.do_key_passwd, "change the password used")):
        sp = key_sub.add_parser(name, help=help, description=help)
        sp.set_defaults(handler=handler)
        _global_opts(sp)
        _repo_opt(sp)
        _password_opt(sp)
        if name in ("add", "passwd"):
            sp.add_argument("--new-password-file", metavar="FILE", required=True,
                            help="the new password, FILE's first line")
        if name == "remove":
            sp.add_argument("key_id", metavar="KEY_ID", help="the key file's id (`repo key list`)")


def _app_opts(sp: argparse.ArgumentParser, required: bool) -> None:
    """The application: --app-start [--app-stop], or --app-unit (one of them is required)."""
    g = sp.add_mutually_exclusive_group(required=required)
    g.add_argument("--app-start", metavar="CMD",
                   help="shell command that starts the application (it may stay in the "
                   "foreground or daemonize)" + ("; required unless --app-unit" if required
                                                 else ""))
    g.add_argument("--app-unit", metavar="UNIT",
                   help="a systemd unit that runs the application, instead of --app-start")
    sp.add_argument("--app-stop", metavar="CMD",
                    help="command that stops the application (default: SIGTERM to its "
                    "processes); with --app-start")


def _session_verbs(verb: Callable[..., argparse.ArgumentParser]) -> None:
    sp = verb("live-restore", session_cmds.do_live_restore,
              "restore while the application runs on a pseudo-volume")
    _repo_opt(sp)
    _password_opt(sp, export=True)
    sp.add_argument("backup", metavar="BACKUP", help="the backup's name or id (`dmrecover list`)")
    sp.add_argument("dest", metavar="DEST", nargs="?",
                    help="the block device or file the backup is restored to (or --dest-vg)")
    sp.add_argument("--dest-vg", metavar="VG",
                    help="instead of DEST: create DEST as a new LV of the backup's size in "
                    "this LVM volume group, named after the session and tagged as "
                    "dmrecover's; it holds the data and stays after the cutover (removed "
                    "only when the start fails, or by `forget --discard-overlay`)")
    sp.add_argument("--mount", required=True, metavar="MOUNTPOINT",
                    help="where the application finds its volume (an empty directory)")
    _app_opts(sp, required=True)
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
    sp.add_argument("--overlay", metavar="DIR|VG",
                    help="a directory for the engine's files: the overlay holding the "
                    "application's writes and the restore map (default: the state dir); or, "
                    "dm and dm-clone backends, an LVM volume group (a name without '/'): "
                    "the COW or the clone metadata on a new tagged LV there, sized from the "
                    "backup, removed after the cutover")
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
    _session_arg(sp)
    _state_dir_opt(sp)
    sp.add_argument("--foreground", action="store_true",
                    help="run the session in this process instead of in the background")
    _app_opts(sp, required=False)
    sp.epilog = ("--app-start/--app-stop/--app-unit correct how the application is started "
                 "and stopped (e.g. a typo that made it fail): checked as for live-restore, "
                 "recorded, then used from this resume on.")

    sp = verb("session-run", session_cmds.do_session_run,
              "internal: the session process that live-restore and resume start", hidden=True)
    _session_arg(sp)
    _state_dir_opt(sp)
    sp.add_argument("--resume", action="store_true",
                    help="rebuild the stack from the persisted state")

    sp = verb("status", session_cmds.do_status, "show live-restore sessions")
    sp.add_argument("session", nargs="?", metavar="SESSION",
                    help="one session, in full (default: every session, one line each)")
    _state_dir_opt(sp)
    sp.add_argument("--json", action="store_true", help="print the status model as JSON")
    sp.add_argument("--watch", action="store_true",
                    help="live display (plain lines when not a terminal); it ends with a "
                    "summary once the sessions have ended; Ctrl-C leaves")
    sp.add_argument("--follow", action="store_true",
                    help="with --watch: keep watching after the sessions have ended")

    sp = verb("cutover", session_cmds.do_cutover,
              "switch the application to the restored volume")
    _session_arg(sp)
    _state_dir_opt(sp)
    sp.add_argument("--online", action="store_true", help="merge without stopping the app (dm)")
    sp.add_argument("--no-wait", action="store_true",
                    help="return once the request is queued")

    sp = verb("abort", session_cmds.do_abort, "stop the application and tear the session down")
    _session_arg(sp)
    _state_dir_opt(sp)
    sp.add_argument("--force", action="store_true",
                    help="when processes other than the application hold the mount: name "
                         "them and unmount it lazily under them (their I/O then fails)")

    sp = verb("forget", session_cmds.do_forget,
              "close a finished (done, failed or aborted) session: remove its state dir, free "
              "its name")
    _session_arg(sp)
    _state_dir_opt(sp)
    sp.add_argument("--discard-overlay", action="store_true",
                    help="also when the overlay of an aborted or failed session still holds "
                    "the application's writes (they are lost: resume could continue them)")

    sp = verb("cleanup", session_cmds.do_cleanup,
              "remove stale devices, loops and mounts left by a crash")
    sp.add_argument("--dry-run", action="store_true", help="only say what would be removed")
