"""The one wrapper for every external command dmrecover runs.

Argument lists only (never a shell), LC_ALL=C so output can be parsed, a timeout, the command
and its stderr logged, and failures raised as the project's own error types carrying command,
exit code and stderr.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Sequence

from dmrecover.errors import CommandError, DmrecoverError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 120.0


def _env(extra: dict[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    env["LC_ALL"] = "C"
    env.pop("LANG", None)
    if extra:
        env.update(extra)
    return env


def run(
    argv: Sequence[str],
    *,
    timeout: float | None = DEFAULT_TIMEOUT,
    check: bool = True,
    input: bytes | str | None = None,
    error: type[DmrecoverError] = CommandError,
    what: str | None = None,
    env: dict[str, str] | None = None,
    stdin: int | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run argv, return the completed process (text stdout/stderr).

    On a non-zero exit (with check), a timeout, or a missing program, raise `error` with a
    one-line message naming `what` (default: the program), the exit code and stderr's last line.
    `stdin` (a file descriptor) feeds a large input without reading it into memory.
    """
    argv = [str(a) for a in argv]
    what = what or argv[0]
    log.debug("run: %s", " ".join(argv))
    try:
        proc = subprocess.run(
            argv,
            input=input.encode() if isinstance(input, str) else input,
            stdin=stdin if input is None else None,
            capture_output=True,
            timeout=timeout,
            env=_env(env),
            check=False,
        )
    except FileNotFoundError as err:
        raise error(
            f"{what}: program {argv[0]} not found",
            argv=argv,
            hint="install it (scripts/bootstrap.sh installs everything dmrecover needs)",
        ) from err
    except subprocess.TimeoutExpired as err:
        stderr = (err.stderr or b"").decode(errors="replace") if isinstance(err.stderr, bytes) \
            else (err.stderr or "")
        log.warning("timed out after %ss: %s", timeout, " ".join(argv))
        raise error(f"{what}: timed out after {timeout:g}s", argv=argv, stderr=stderr) from err
    stdout = proc.stdout.decode(errors="replace")
    stderr = proc.stderr.decode(errors="replace")
    if stderr.strip():
        log.debug("%s stderr: %s", argv[0], stderr.strip())
    result = subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)
    if check and proc.returncode != 0:
        last = stderr.strip().splitlines()[-1] if stderr.strip() else "no message"
        log.info("failed (%d): %s: %s", proc.returncode, " ".join(argv), stderr.strip())
        raise error(
            f"{what} failed (exit {proc.returncode}): {last}",
            argv=argv,
            returncode=proc.returncode,
            stderr=stderr,
        )
    return result


def have(program: str) -> bool:
    """True when program is on PATH (or in sbin, which root's PATH may lack)."""
    return find(program) is not None


def find(program: str) -> str | None:
    """Path of program on PATH, also looking in the sbin directories."""
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin:/usr/local/sbin"
    return shutil.which(program, path=path)
