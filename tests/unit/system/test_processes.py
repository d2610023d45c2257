"""Process lookups: holders of a mount, users of a file."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from dmrecover.system import processes


def test_holders_and_users(tmp_path: Path) -> None:
    inside = tmp_path / "mnt"
    inside.mkdir()
    f = inside / "held"
    f.write_bytes(b"x")
    proc = subprocess.Popen([sys.executable, "-c",
                             "import sys, time; f = open(sys.argv[1]); time.sleep(30)", str(f)])
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not processes.processes_using(f):
            time.sleep(0.05)
        assert [pid for pid, _ in processes.processes_using(f)] == [proc.pid]
        held = processes.processes_holding(str(inside))
        assert [p.pid for p in held] == [proc.pid]
        assert processes.describe(held).startswith(f"{proc.pid} (")
        assert not processes.processes_holding(str(tmp_path / "mn"))
    finally:
        proc.kill()
        proc.wait()


def test_a_mapping_alone_holds_the_mount(tmp_path: Path) -> None:
    """A process that mapped a file and closed it (a database's mmap, a library) still keeps
    the mount busy: the holder lookup must find it through its memory maps."""
    inside = tmp_path / "mnt"
    inside.mkdir()
    f = inside / "mapped"
    f.write_bytes(b"x" * 4096)
    # libc's mmap, not Python's: mmap.mmap keeps a duplicate of the descriptor.
    code = ("import ctypes, os, sys, time\n"
            "libc = ctypes.CDLL(None, use_errno=True)\n"
            "libc.mmap.restype = ctypes.c_void_p\n"
            "libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,"
            " ctypes.c_int, ctypes.c_int, ctypes.c_long]\n"
            "fd = os.open(sys.argv[1], os.O_RDONLY)\n"
            "assert libc.mmap(None, 4096, 1, 1, fd, 0) not in (None, 2**64 - 1)\n"
            "os.close(fd)\n"
            "os.chdir('/')\n"
            "print('mapped', flush=True)\n"
            "time.sleep(30)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(f)], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "mapped"
        assert processes.processes_using(f) == []  # no descriptor left
        assert [p.pid for p in processes.processes_holding(str(inside))] == [proc.pid]
        assert not processes.processes_holding(str(tmp_path / "mn"))
    finally:
        proc.kill()
        proc.wait()
