"""The entry point: parse, dispatch to the verb's handler, report errors.

Every DmrecoverError becomes one line on stderr, `dmrecover: error: ...`, and the error's exit
code. Nothing else is caught, so a bug still shows its traceback.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import sys

from dmrecover.cli.parser import build_parser
from dmrecover.errors import DmrecoverError

EXIT_INTERRUPTED = 128 + signal.SIGINT
EXIT_PIPE = 128 + signal.SIGPIPE  # what a shell tool killed by SIGPIPE reports


def _stdout_closed() -> bool:
    """True when stdout is a pipe or socket whose reader went away (`dmrecover list | head -1`):
    poll reports an error condition on it."""
    try:
        fd = sys.stdout.fileno()
    except (OSError, ValueError):  # no real file descriptor (e.g. captured in tests)
        return False
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poller.poll(0))


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's last flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no real file descriptor
        pass


def main(argv: list[str] | None = None) -> int:
    """`dmrecover ...`; returns the exit code (usage errors exit 2 through SystemExit)."""
    try:
        args = build_parser().parse_args(argv)
        verbose = args.verbose + getattr(args, "verbose_after", 0)  # -v before/after the verb
        level = logging.WARNING - 10 * min(verbose, 2)
        logging.basicConfig(level=level,
                            format="%(asctime)s %(name)s %(levelname)s: %(message)s")
        return args.handler(args)
    except DmrecoverError as err:
        print(f"dmrecover: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("dmrecover: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        if not _stdout_closed():
            raise  # a pipe of our own broke: a bug to see
        _silence_stdout()
        return EXIT_PIPE
    except SystemExit:  # --help, --version, usage errors: the last flush must not fail
        if _stdout_closed():
            _silence_stdout()
        raise
