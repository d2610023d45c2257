"""Run a command inside a cgroup, with no race and no shell.

    python -m dmrecover.system.cgexec [--status-fd N] PROCS -- ARGV...

writes its own pid to PROCS (a `cgroup.procs` file; "-" for none) and then execs ARGV, so the
command and everything it forks afterwards, daemonized or not, is born inside the cgroup. No
preexec_fn: that is unsafe in a process with threads, and the session has some.

With --status-fd, an error (cannot join the cgroup, cannot exec) is written to that descriptor
instead of stderr, and the descriptor is closed by the exec: the parent reads until end of file
and knows that the command runs inside the cgroup, or why it does not (see
cgroups.AppCgroup.start). Exit codes as a shell's: 126 cannot join or execute, 127 not found.

Standard library only, and runnable by path (`python -I -S .../cgexec.py`), so starting it does
not import dmrecover and costs a bare interpreter start.
"""

from __future__ import annotations

import os
import sys

USAGE = "usage: cgexec [--status-fd N] PROCS|- -- ARGV...\n"


def _fail(status_fd: int, message: str, code: int) -> None:
    os.write(status_fd, (message.rstrip("\n") + "\n").encode(errors="replace"))
    os._exit(code)


def main(args: list[str]) -> None:
    """Parse args, join the cgroup, exec the command (never returns)."""
    status_fd = 2
    if len(args) >= 2 and args[0] == "--status-fd":
        try:
            status_fd = int(args[1])
        except ValueError:
            _fail(2, USAGE, 2)
        args = args[2:]
    if len(args) < 3 or args[1] != "--":
        _fail(status_fd, USAGE, 2)
    procs, argv = args[0], args[2:]
    if status_fd != 2:
        # closed by the exec: end of file tells the parent that the command runs
        os.set_inheritable(status_fd, False)
    if procs != "-":
        try:
            fd = os.open(procs, os.O_WRONLY)
            try:
                # "0" means the writing process itself, but the pid reads better in a trace
                os.write(fd, str(os.getpid()).encode())
            finally:
                os.close(fd)
        except OSError as err:
            _fail(status_fd, f"cannot join cgroup {procs}: {err.strerror}", 126)
    try:
        os.execvp(argv[0], argv)
    except FileNotFoundError:
        _fail(status_fd, f"cannot run {argv[0]}: command not found", 127)
    except OSError as err:
        _fail(status_fd, f"cannot run {argv[0]}: {err.strerror}", 126)


if __name__ == "__main__":
    main(sys.argv[1:])
