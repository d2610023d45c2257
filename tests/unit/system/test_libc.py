"""The one ctypes lookup of the C library's calls."""

import ctypes
import errno
import os

from dmrecover.system import libc


def test_a_known_function_is_found_once_with_its_argument_types() -> None:
    fn = libc.function("sync_file_range", ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
                       ctypes.c_uint)
    assert fn is not None
    assert fn.argtypes == [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    assert libc.function("sync_file_range", ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
                         ctypes.c_uint) is fn


def test_a_missing_function_is_none() -> None:
    assert libc.function("no_such_function_in_any_libc") is None


def test_errno_of_a_failed_call(tmp_path) -> None:
    fallocate = libc.function("fallocate", ctypes.c_int, ctypes.c_int, ctypes.c_int64,
                              ctypes.c_int64)
    assert fallocate is not None
    fd = os.open(tmp_path / "f", os.O_RDONLY | os.O_CREAT, 0o600)
    try:
        assert fallocate(fd, 0, 0, 4096) == -1  # read-only descriptor
        assert libc.errno() == errno.EBADF
    finally:
        os.close(fd)
