"""The C library's calls Python's os module lacks (fallocate modes, sync_file_range, mallopt),
looked up once through ctypes, in one place."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Any


@functools.cache
def _libc() -> Any:
    # use_errno: callers read ctypes.get_errno() after a failed call.
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


@functools.cache
def function(name: str, *argtypes: Any) -> Any | None:
    """libc's `name` with its argument types set, or None where this C library has no such
    function (or none is loadable)."""
    try:
        fn = getattr(_libc(), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = list(argtypes)
    return fn


def errno() -> int:
    """The errno of the last failed call through `function` in this thread."""
    return ctypes.get_errno()
