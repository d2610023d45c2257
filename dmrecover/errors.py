"""The project's own error types, each with the exit code the CLI ends with.

Every error that reaches the user is a DmrecoverError: the CLI prints one line
`dmrecover: error: <message>: <hint>` and exits with the class's `exit_code`. Nothing else is
caught there, so a bug still shows its traceback. The codes follow sysexits(3) so that scripts
and systemd (`RestartPreventExitStatus=`, `SuccessExitStatus=`) can tell a transient failure,
worth retrying as is, from one that needs a person:

==================== ==== ================ =========================================== ======
class                code sysexits         meaning                                     retry?
==================== ==== ================ =========================================== ======
DmrecoverError          1 -                any other failure                           no
UsageError              2 (argparse's)     bad arguments or input on the command line  no
CorruptChunk           65 EX_DATAERR       a chunk does not match its digest           no
BitmapError            65 EX_DATAERR       a state bitmap is torn or foreign           no
RepositoryError        66 EX_NOINPUT       repository missing or not a repository      no
BackupNotFound         66 EX_NOINPUT       no backup has that id or name               no
BackendUnavailable     69 EX_UNAVAILABLE   this host cannot run that backend           no
EngineError            70 EX_SOFTWARE      the pseudo-volume refused (state, sizes)    no
OverlayError           70 EX_SOFTWARE      the overlay's files do not fit the volume   no
SessionError           70 EX_SOFTWARE      session missing, in the wrong state, failed no
AppError               70 EX_SOFTWARE      starting or stopping the application failed no
CommandError           71 EX_OSERR         an external command failed                  no
StackError             71 EX_OSERR         building/tearing down loop, dm, mount, FUSE no
DeviceError            74 EX_IOERR         a device is missing, too small, busy, fails no
RepositoryUnavailable  75 EX_TEMPFAIL      repository unreachable right now            yes
RepositoryLocked       75 EX_TEMPFAIL      another writer holds the repository lock    yes
NotRootError           77 EX_NOPERM        the operation needs root                    no
==================== ==== ================ =========================================== ======

Any error may carry the context of the external command behind it (argv, returncode,
stderr): `dmrecover.system.command.run(..., error=AnyOfThese)` raises the given class with
those fields, so every class accepts them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class DmrecoverError(Exception):
    """Base class: a failure the user can act on (optionally from an external command)."""

    exit_code = 1

    def __init__(
        self,
        message: str,
        *,
        hint: str | None = None,
        argv: Sequence[str] | None = None,
        returncode: int | None = None,
        stderr: str = "",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.argv = list(argv or [])
        self.returncode = returncode
        self.stderr = stderr

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}: {self.hint}"
        return self.message


class UsageError(DmrecoverError):
    """Bad arguments or bad input named on the command line."""

    exit_code = 2


class NotRootError(DmrecoverError):
    """The operation needs root."""

    exit_code = 77


class CommandError(DmrecoverError):
    """An external command failed; carries the command, its exit code and its stderr."""

    exit_code = 71


class StackError(CommandError):
    """Building or tearing down the device stack (loop, dm, mount, FUSE) failed."""


class RepositoryError(DmrecoverError):
    """The repository is missing, not a repository, or unusable."""

    exit_code = 66


class RepositoryUnavailable(RepositoryError):
    """The repository cannot be reached right now (a transient fault: retry)."""

    exit_code = 75


class RepositoryLocked(RepositoryError):
    """Another writer holds the repository lock (retry once it is done)."""

    exit_code = 75


class BackupNotFound(RepositoryError):
    """No backup matches the given id or name."""


class CorruptChunk(RepositoryError):
    """A chunk's content does not match its digest (or cannot be decompressed)."""

    exit_code = 65

    def __init__(self, message: str, *, digest: str = "", backup: str = "", index: int = -1,
                 **context: Any) -> None:
        super().__init__(message, **context)
        self.digest = digest
        self.backup = backup
        self.index = index


class BackendUnavailable(DmrecoverError):
    """A backend cannot run on this host (missing tool, kernel target, root)."""

    exit_code = 69


class DeviceError(DmrecoverError):
    """A source or destination device is missing, too small, mounted, held open or failing."""

    exit_code = 74


class EngineError(DmrecoverError):
    """The live-restore engine refused an operation or found its state unusable."""

    exit_code = 70


class BitmapError(EngineError):
    """A bitmap file is missing, torn or not a bitmap."""

    exit_code = 65


class OverlayError(EngineError):
    """The overlay's files do not match the volume (size, map) or cannot be used."""


class SessionError(DmrecoverError):
    """A live-restore session is missing, in the wrong state, or failed."""

    exit_code = 70


class AppError(DmrecoverError):
    """Starting or stopping the application failed."""

    exit_code = 70


def all_error_classes() -> list[type[DmrecoverError]]:
    """DmrecoverError and every subclass defined so far (for tests and documentation)."""
    out: list[type[DmrecoverError]] = []
    todo: list[type[DmrecoverError]] = [DmrecoverError]
    while todo:
        cls = todo.pop()
        out.append(cls)
        todo.extend(cls.__subclasses__())
    return out
