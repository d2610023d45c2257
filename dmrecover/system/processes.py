"""Which processes use a mount, a device or a file (psutil and /proc).

The cutover must never pull a filesystem from under a live process, and a restore must never
overwrite a device another process has open: these lookups name those processes.
"""

from __future__ import annotations

import os
import stat

import psutil

from dmrecover.system.sysfs import stat_path


def _under(path: str, root: str) -> bool:
    """True when path is root or inside it (string test on normalised absolute paths)."""
    if not path:
        return False
    path = path.removesuffix(" (deleted)")
    try:
        return os.path.commonpath([os.path.abspath(path), root]) == root
    except ValueError:
        return False


def processes_holding(mountpoint: str) -> list[psutil.Process]:
    """Processes whose cwd, root, open files or memory maps are on the mount at mountpoint."""
    root = os.path.abspath(mountpoint)
    me = os.getpid()
    found = []
    for proc in psutil.process_iter():
        if proc.pid == me:
            continue
        try:
            if _holds(proc, root):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def _holds(proc: psutil.Process, root: str) -> bool:
    try:
        if _under(proc.cwd(), root):
            return True
    except (psutil.AccessDenied, FileNotFoundError):
        pass
    try:
        if _under(os.readlink(f"/proc/{proc.pid}/root"), root) and root != "/":
            return True
    except OSError:
        pass
    # Every fd, not only regular files: a directory held open also keeps a mount busy.
    try:
        for fd in os.listdir(f"/proc/{proc.pid}/fd"):
            try:
                if _under(os.readlink(f"/proc/{proc.pid}/fd/{fd}"), root):
                    return True
            except OSError:
                continue
    except OSError:
        pass
    return any(_under(path, root) for path in _mapped_paths(proc.pid))


def _mapped_paths(pid: int) -> set[str]:
    """The files a process has mapped, from /proc/PID/maps.

    Not psutil's memory_maps(): it parses /proc/PID/smaps, whose per-mapping page accounting
    costs the kernel far more; over every process of a busy server that was most of the
    cutover's stray-holder check, which runs while the application is stopped."""
    try:
        with open(f"/proc/{pid}/maps", encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except OSError:
        return set()
    paths = set()
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/"):
            paths.add(fields[5])
    return paths


def describe(procs: list[psutil.Process]) -> str:
    """'123 (python3), 456 (sqlite3)' for messages."""
    parts = []
    for p in procs:
        try:
            parts.append(f"{p.pid} ({p.name()})")
        except psutil.Error:
            parts.append(str(p.pid))
    return ", ".join(parts)


def processes_using(path: str | os.PathLike[str]) -> list[tuple[int, str]]:
    """(pid, name) of other processes with the device or file open.

    psutil lists the processes; the open descriptors are matched by identity (st_rdev for a
    device, st_dev+st_ino for a file) because psutil's open_files() skips block devices.
    """
    st = stat_path(path)
    if stat.S_ISBLK(st.st_mode):
        def same(s: os.stat_result) -> bool:
            return stat.S_ISBLK(s.st_mode) and s.st_rdev == st.st_rdev
    else:
        def same(s: os.stat_result) -> bool:
            return s.st_dev == st.st_dev and s.st_ino == st.st_ino
    me = os.getpid()
    users: list[tuple[int, str]] = []
    for proc in psutil.process_iter(["pid", "name"]):
        pid = proc.info["pid"]
        if pid == me:
            continue
        fddir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fddir)
        except OSError:
            continue
        for fd in fds:
            try:
                if same(os.stat(f"{fddir}/{fd}")):
                    users.append((pid, proc.info["name"] or "?"))
                    break
            except OSError:
                continue
    return users
