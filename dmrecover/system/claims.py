"""Claims: one user at a time of a destination or a mount point, for as long as it uses it.

A claim is an flock() on a lock file named after the identity of what is claimed, in a
root-only directory (/run/dmrecover/claims, or $DMRECOVER_CLAIMS_DIR):

- a regular file DEST: keyed by its (st_dev, st_ino), so two names of one file are one claim;
  the file is created (0600, never through a symlink) when missing, so it has an identity;
- a block device DEST: keyed by its st_rdev, plus an O_EXCL open of the device (the kernel's
  own claim: no mount, dm table or other O_EXCL opener gets it while the claim holds it);
- a mount point: keyed by its (st_dev, st_ino) and by its real path (once something is mounted
  on it, its inode is the mounted root's; the path still names it).

The lock file holds who claimed it (JSON), so a refusal names the owner. A claim is taken
before the checks on what it claims and held until the user is done: flock belongs to the open
file description, so a claim handed to a child process (`handoff_env` + pass_fds, then
`adopt_inherited` in the child) is held with no gap, as long as any of the processes lives.
A killed holder releases it (the kernel closes its files): no stale claim to clean up.

    with claims.claim_destination(dest, "restore") as c:
        os.pwrite(c.fd, data, 0)        # c.fd: O_RDWR, O_EXCL for a block device
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import stat
import time
from collections.abc import Iterable

from dmrecover.errors import DeviceError, DmrecoverError
from dmrecover.system.files import unlink_quietly

CLAIMS_DIR_ENV = "DMRECOVER_CLAIMS_DIR"
DEFAULT_CLAIMS_DIR = "/run/dmrecover/claims"
HANDOFF_ENV = "DMRECOVER_CLAIM_FDS"

StrPath = str | os.PathLike[str]


# Another session or restore holds the claim (its owner is named in the message). An alias,
# not a subclass: every error type lives in dmrecover/errors.py with its exit code.
ClaimRefused = DeviceError


def claims_dir() -> str:
    """The directory of the lock files, created root-only (0700) when missing."""
    d = os.environ.get(CLAIMS_DIR_ENV, DEFAULT_CLAIMS_DIR)
    os.makedirs(d, mode=0o700, exist_ok=True)
    st = os.lstat(d)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise DmrecoverError(f"claims directory {d} is not a private directory of this user",
                             hint="remove it; dmrecover recreates it 0700")
    return d


class Claim:
    """A held claim. `fd` is an O_RDWR descriptor on a claimed DEST (None for a mount point).
    `release()` (or leaving the with block) gives it up."""

    def __init__(self, kind: str, path: str, owner: str, locks: list[tuple[str, int]],
                 fd: int | None = None, created: bool = False) -> None:
        self.kind = kind  # "dest" or "mountpoint"
        self.path = path
        self.owner = owner
        self.locks = locks  # (lock file path, fd holding its flock)
        self.fd = fd
        self.created = created  # the DEST file did not exist before this claim
        self.is_block = fd is not None and stat.S_ISBLK(os.fstat(fd).st_mode)

    def fds(self) -> list[int]:
        """Every descriptor that holds the claim (to pass to a child process)."""
        return [fd for _, fd in self.locks] + ([self.fd] if self.fd is not None else [])

    def release_device(self) -> None:
        """Close the descriptor on DEST (for a block device: its O_EXCL claim), keeping the
        lock: the cutover then mounts DEST, which takes the kernel's claim itself."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def release(self) -> None:
        """Give the claim up (idempotent). The lock files are removed first, under the lock,
        so a waiter that opened the old file notices and retries on a new one."""
        for path, fd in self.locks:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            os.close(fd)
        self.locks = []
        self.release_device()

    def close(self) -> None:
        """Close this process's descriptors without giving the claim up: for the parent once
        a child it handed the claim to holds it."""
        for _, fd in self.locks:
            os.close(fd)
        self.locks = []
        self.release_device()

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"Claim({self.kind} {self.path} by {self.owner})"


def _lock(key: str, owner: str, what: str) -> tuple[str, int]:
    """flock the lock file of key (LOCK_NB); ClaimRefused naming the holder when held."""
    path = os.path.join(claims_dir(), key + ".lock")
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise ClaimRefused(f"{what} is in use by {holder}",
                               hint="wait for it to end, or pick another") from None
        except BaseException:
            os.close(fd)
            raise
        # The holder before us may have unlinked the file just before releasing it: then
        # our lock is on a dead inode and a newcomer could lock a new file. Retry.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    _write_holder(fd, json.dumps({"owner": owner, "pid": os.getpid(), "what": what}).encode())
    return path, fd


def _write_holder(fd: int, data: bytes) -> None:
    """Name the holder in its lock file: written first, then cut to length, so a reader never
    finds the file empty while it is held (at worst unparsable for a moment: it reads again)."""
    os.pwrite(fd, data, 0)
    os.ftruncate(fd, len(data))


def _holder(fd: int, wait: float = 2.0) -> str:
    """Who holds the lock on fd, as its holder wrote it. A holder that has just taken the
    lock (or adopted it from its parent) writes its name a moment later: read again for a
    short while before saying only "another dmrecover process"."""
    deadline = time.monotonic() + wait
    while True:
        try:
            info = json.loads(os.pread(fd, 4096, 0) or b"{}")
            return f"{info['owner']} (pid {info['pid']})"
        except (ValueError, KeyError, TypeError, OSError):
            if time.monotonic() >= deadline:
                return "another dmrecover process"
        time.sleep(0.02)


def _release_all(locks: Iterable[tuple[str, int]]) -> None:
    for path, fd in locks:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        os.close(fd)


def claim_destination(path: StrPath, owner: str, *, create: bool = True,
                      mode: int = 0o600, exclusive: bool = True) -> Claim:
    """Claim DEST for `owner` (e.g. "session db", "restore"). A missing regular file is
    created (mode, never through a symlink) when `create`. ClaimRefused when another holds
    it; DeviceError when it cannot be opened (for a block device: mounted or held).
    exclusive=False: a block device is locked but not opened O_EXCL (it is mounted by its
    user already, e.g. a session resumed past its cutover's merge).

    DEST is opened only once its lock is ours: the winner of two claims at once checks that
    no other process has DEST open, and a loser holding it open for a moment (while it reads
    who holds the lock) would make the winner refuse too."""
    p = os.path.abspath(os.fspath(path))
    created = False
    for _ in range(10):
        st = _identity(p, create)
        if st is None:  # missing: create it, closed at once (opened again under the lock)
            try:
                os.close(os.open(p, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                                 | os.O_CLOEXEC, mode))
                created = True
            except FileExistsError:
                pass
            except OSError as err:
                raise DeviceError(f"cannot create destination {p}: {err.strerror}") from None
            continue
        is_block = stat.S_ISBLK(st.st_mode)
        key = f"blk-{st.st_rdev:x}" if is_block else f"file-{st.st_dev:x}-{st.st_ino:x}"
        # Refused: the file this call created (if any) is the holder's now; it stays.
        lock = _lock(key, owner, f"destination {p}")
        try:
            if is_block:
                fd = _open_dest(_dev_node(p), os.O_EXCL if exclusive else 0)
            else:
                fd = _open_dest(p, 0)
                now = os.fstat(fd)
                if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                    # Replaced between the stat and the open: lock the new one.
                    os.close(fd)
                    _release_all([lock])
                    continue
        except BaseException:
            _release_all([lock])
            if created:
                unlink_quietly(p)
            raise
        return Claim("dest", p, owner, [lock], fd=fd, created=created)
    raise DeviceError(f"destination {p} keeps being replaced while it is claimed",
                      hint="stop what renames or recreates it")


def _identity(p: str, create: bool) -> os.stat_result | None:
    """DEST's stat (a block device through udev's symlinks under /dev; a regular file never
    through a symlink), None when missing and `create`; DeviceError otherwise."""
    try:
        st = os.stat(p)
    except FileNotFoundError:
        if os.path.islink(p):
            raise DeviceError(f"destination {p} is a symbolic link",
                              hint="name the file itself") from None
        if not create or p.startswith("/dev/"):
            raise DeviceError(f"destination {p} does not exist",
                              hint="check the name") from None
        return None
    except OSError as err:
        raise DeviceError(f"cannot open destination {p}: {err.strerror}") from None
    if stat.S_ISBLK(st.st_mode):
        return st
    if not stat.S_ISREG(st.st_mode):
        raise DeviceError(f"destination {p} is neither a block device nor a regular file")
    if os.path.islink(p):
        raise DeviceError(f"destination {p} is a symbolic link", hint="name the file itself")
    return st


def _dev_node(p: str) -> str:
    """A block device's node: udev's symlinks under /dev (/dev/VG/LV, /dev/mapper/NAME, made
    by root) resolved; any other path as it is (a symlink is refused by O_NOFOLLOW)."""
    real = os.path.realpath(p)
    return real if p.startswith("/dev/") and real.startswith("/dev/") else p


def _open_dest(p: str, extra: int) -> int:
    try:
        return os.open(p, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | extra)
    except OSError as err:
        if err.errno == errno.EBUSY:
            raise DeviceError(f"destination {p} is in use (mounted, or held by another "
                              "device or program)", hint="unmount it or stop what uses it"
                              ) from None
        if err.errno == errno.ELOOP:
            raise DeviceError(f"destination {p} is a symbolic link",
                              hint="name the file itself") from None
        raise DeviceError(f"cannot open destination {p}: {err.strerror}") from None


def claim_mountpoint(path: StrPath, owner: str) -> Claim:
    """Claim a mount point (by its real path, and by its inode when nothing is mounted on
    it). ClaimRefused when another holds it; DeviceError when it does not exist."""
    p = os.path.realpath(os.fspath(path))
    try:
        st = os.stat(p)
    except OSError as err:
        raise DeviceError(f"mount point {p}: {err.strerror}",
                          hint="create it (mkdir -p)") from None
    what = f"mount point {p}"
    locks = [_lock("mp-" + hashlib.sha256(p.encode()).hexdigest()[:32], owner, what)]
    try:
        locks.append(_lock(f"ino-{st.st_dev:x}-{st.st_ino:x}", owner, what))
    except BaseException:
        _release_all(locks)
        raise
    return Claim("mountpoint", p, owner, locks)


# ---------------------------------------------------------------- handing claims on


def handoff_env(claims: Iterable[Claim]) -> dict[str, str]:
    """The environment entry that tells a child which inherited descriptors hold which
    claims; pass `fds()` of each claim as the child's pass_fds."""
    parts = []
    for c in claims:
        fds = ",".join(str(fd) for fd in c.fds())
        parts.append(f"{c.kind}:{c.fd if c.fd is not None else -1}:{fds}:{c.path}")
    return {HANDOFF_ENV: ";".join(parts)}


def adopt_inherited(owner: str) -> list[Claim]:
    """The claims a parent handed to this process (and removes the entry from the
    environment, so they are adopted once). The descriptors are made close-on-exec."""
    text = os.environ.pop(HANDOFF_ENV, "")
    out = []
    for part in filter(None, text.split(";")):
        kind, dest_fd, fds, path = part.split(":", 3)
        lock_fds = [int(x) for x in fds.split(",") if x and int(x) != int(dest_fd)]
        for fd in lock_fds + ([int(dest_fd)] if int(dest_fd) >= 0 else []):
            os.set_inheritable(fd, False)
        locks = [(os.readlink(f"/proc/self/fd/{fd}"), fd) for fd in lock_fds]
        for _, fd in locks:  # now ours: name this process as the holder
            data = json.dumps({"owner": owner, "pid": os.getpid(),
                               "what": f"{kind} {path}"}).encode()
            _write_holder(fd, data)
        out.append(Claim(kind, path, owner, locks,
                         fd=int(dest_fd) if int(dest_fd) >= 0 else None))
    return out
