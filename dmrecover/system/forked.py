"""Run a call in a forked child process and bring its result (or its error) back.

For work that starts threads in a process that forks again later: a fork copies the memory of
the threads' libraries but not the threads. trio (0.22, Debian 12's, which once served FUSE)
kept its idle worker threads in a module-level cache, so a process forked after a FUSE server
ran handed its first blocking read to a worker that did not exist in it, and that read never
returned (seen: the session process `resume` forks, after `resume` served a dead session's
source). Run such work here: the child's threads end with the child.

The result must be JSON-serializable. A DmrecoverError raised in the child is raised again in
the parent as the same class, message, hint and command fields; any other exception as a
DmrecoverError naming it.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

from dmrecover import errors
from dmrecover.errors import DmrecoverError

log = logging.getLogger(__name__)


def flush_std_streams() -> None:
    """Before a fork: what stdout and stderr buffer is written once, not by both processes."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass


def call(fn: Callable[[], Any], *, what: str) -> Any:
    """fn() in a child process; its return value, or its exception raised here."""
    r, w = os.pipe()
    flush_std_streams()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        os.close(r)
        code = 0
        try:
            payload: dict[str, Any] = {"result": fn()}
        except BaseException as err:  # noqa: BLE001 - all of it goes to the parent
            code = 1
            payload = {"type": type(err).__name__, "message": getattr(err, "message", str(err)),
                       "hint": getattr(err, "hint", None), "argv": getattr(err, "argv", []),
                       "returncode": getattr(err, "returncode", None),
                       "stderr": getattr(err, "stderr", ""),
                       "ours": isinstance(err, DmrecoverError)}
            if not isinstance(err, DmrecoverError):
                log.error("%s failed in its child process:\n%s", what, traceback.format_exc())
        try:
            data = json.dumps(payload).encode()
            while data:
                data = data[os.write(w, data):]
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    try:
        while True:
            chunk = os.read(r, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(r)
        _, status = os.waitpid(pid, 0)
    try:
        payload = json.loads(b"".join(chunks) or b"{}")
    except ValueError:
        payload = {}
    if "result" in payload:
        return payload["result"]
    if not payload:
        raise DmrecoverError(f"{what}: its child process died "
                             f"(wait status {status}) without a result")
    cls = getattr(errors, payload["type"], None) if payload.get("ours") else None
    if not (isinstance(cls, type) and issubclass(cls, DmrecoverError)):
        raise DmrecoverError(f"{what}: {payload['type']}: {payload['message']}")
    raise cls(payload["message"], hint=payload.get("hint"), argv=payload.get("argv"),
              returncode=payload.get("returncode"), stderr=payload.get("stderr") or "")
