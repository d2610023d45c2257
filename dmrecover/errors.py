"""The project's own error types.

Every error that reaches the user is a DmrecoverError: the CLI prints its message on one line
(what is wrong and what to do) and exits with its exit code. Nothing else is caught there, so a
bug still shows its traceback.
"""

from __future__ import annotations


class DmrecoverError(Exception):
    """Base class: a failure the user can act on."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}: {self.hint}"
        return self.message


class UsageError(DmrecoverError):
    """Bad arguments or bad input named on the command line."""

    exit_code = 2


class NotRootError(DmrecoverError):
    """The operation needs root."""

    exit_code = 4


class CommandError(DmrecoverError):
    """An external command failed; carries the command, its exit code and its stderr."""

    def __init__(
        self,
        message: str,
        *,
        argv: list[str] | None = None,
        returncode: int | None = None,
        stderr: str = "",
        hint: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.argv = argv or []
        self.returncode = returncode
        self.stderr = stderr


class StackError(CommandError):
    """Building or tearing down the device stack (loop, dm, mount, FUSE) failed."""


class RepositoryError(DmrecoverError):
    """The repository is missing, not a repository, or unusable."""


class RepositoryUnavailable(RepositoryError):
    """The repository cannot be reached right now (a transient fault: retry)."""


class RepositoryLocked(RepositoryError):
    """Another writer holds the repository lock."""


class BackupNotFound(RepositoryError):
    """No backup matches the given id or name."""


class CorruptChunk(RepositoryError):
    """A chunk's content does not match its digest (or cannot be decompressed)."""

    def __init__(self, message: str, *, digest: str = "", backup: str = "", index: int = -1,
                 hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.digest = digest
        self.backup = backup
        self.index = index


class BackendUnavailable(DmrecoverError):
    """A backend cannot run on this host (missing tool, kernel target, root)."""

    exit_code = 3


class DeviceError(DmrecoverError):
    """A source or destination device is missing, too small, mounted or held open."""


class SessionError(DmrecoverError):
    """A live-restore session is missing, in the wrong state, or failed."""


class AppError(DmrecoverError):
    """Starting or stopping the application failed."""
