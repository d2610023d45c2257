"""A daemonizing toy application and its stop script, as a real init script would have them.

    python -m tests.apps.daemon_toy start --dir DIR --pidfile PID [--interval S] [--ignore-term]
    python -m tests.apps.daemon_toy stop --pidfile PID [--timeout S]

start: double-forks (the daemon is reparented away from whoever started it and leads its own
session), writes its pid file, then appends a numbered line to DIR/toy.log with fsync every
interval until SIGTERM (--ignore-term: it ignores SIGTERM, for kill escalation tests). The
start command exits 0 once the pid file is written, like `pg_ctl start -w`.

stop: sends SIGTERM to the pid in the pid file and waits, with `kill -0` semantics, until that
pid no longer exists; exit 1 on timeout. A zombie still exists for kill -0: whoever is its
parent must reap it, or this waits for ever.

Also importable: `start_argv()`/`stop_argv()` build the argv strings for --app-start/--app-stop.
Standard library only, so the commands also run from any working directory by path.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import signal
import sys
import time

HERE = os.path.abspath(__file__)


def start_argv(directory: str, pidfile: str, *, interval: float = 0.1,
               ignore_term: bool = False) -> list[str]:
    """argv of the start command (runs this file by path: works from cwd '/')."""
    argv = [sys.executable, HERE, "start", "--dir", directory, "--pidfile", pidfile,
            "--interval", str(interval)]
    return argv + (["--ignore-term"] if ignore_term else [])


def stop_argv(pidfile: str, *, timeout: float = 20.0) -> list[str]:
    """argv of the stop command."""
    return [sys.executable, HERE, "stop", "--pidfile", pidfile, "--timeout", str(timeout)]


def command_string(argv: list[str]) -> str:
    """argv as one string that dmrecover's --app-start/--app-stop split back with shlex."""
    return shlex.join(argv)


def read_pid(pidfile: str) -> int | None:
    """The pid in pidfile, or None when there is none."""
    try:
        with open(pidfile) as f:
            return int(f.read().strip() or 0) or None
    except (FileNotFoundError, ValueError):
        return None


def _daemon(directory: str, pidfile: str, interval: float, ignore_term: bool,
            ready_fd: int) -> None:
    stopping = False

    def on_term(_sig: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, signal.SIG_IGN if ignore_term else on_term)
    tmp = pidfile + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"{os.getpid()}\n")
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, pidfile)
    os.write(ready_fd, b"1")  # the start command may exit now
    os.close(ready_fd)
    n = 0
    fd = os.open(os.path.join(directory, "toy.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                 0o644)
    try:
        while not stopping:
            n += 1
            os.write(fd, f"{os.getpid()} {n} {time.time():.3f}\n".encode())
            os.fsync(fd)
            time.sleep(interval)
    finally:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(pidfile)


def start(args: argparse.Namespace) -> int:
    """Double fork; the start command exits 0 once the daemon's pid file exists."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(args.pidfile)
    r, w = os.pipe()
    if os.fork() > 0:  # the start command
        os.close(w)
        ok = os.read(r, 1) == b"1"
        os.wait()  # the intermediate
        return 0 if ok else 1
    os.close(r)
    os.setsid()
    if os.fork() > 0:  # the intermediate exits: the daemon is reparented
        os._exit(0)
    os.chdir("/")
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    try:
        _daemon(args.dir, args.pidfile, args.interval, args.ignore_term, w)
    finally:
        os._exit(0)


def stop(args: argparse.Namespace) -> int:
    """SIGTERM the daemon, then wait with `kill -0` until its pid is gone."""
    pid = read_pid(args.pidfile)
    if pid is None:
        print("daemon_toy: not running (no pid file)", file=sys.stderr)
        return 0
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return 0
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)  # a zombie still answers
        except ProcessLookupError:
            return 0
        time.sleep(0.05)
    print(f"daemon_toy: pid {pid} still exists after {args.timeout:g}s", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="daemon_toy")
    sub = p.add_subparsers(dest="verb", required=True)
    s = sub.add_parser("start")
    s.add_argument("--dir", required=True)
    s.add_argument("--pidfile", required=True)
    s.add_argument("--interval", type=float, default=0.1)
    s.add_argument("--ignore-term", action="store_true")
    t = sub.add_parser("stop")
    t.add_argument("--pidfile", required=True)
    t.add_argument("--timeout", type=float, default=20.0)
    args = p.parse_args(argv)
    return start(args) if args.verb == "start" else stop(args)


if __name__ == "__main__":
    sys.exit(main())
