"""device-mapper: the dmsetup wrapper, the start-up probe, naming, udev rules and udev waits.

Every device dmrecover creates has a UUID starting with `DM_UUID_PREFIX`, so it can be found
(`list_owned()`), cleaned up after a crash, and recognised by the udev rules (udev/), which give
it a stable name /dev/dmrecover/<session>/<layer> and keep other tools off the internal layers.

dmsetup normally waits for udev to process each device's events (udev cookies). Where no udevd
runs that wait would hang, so the probe detects it and every call then passes `--noudevsync` and
polls for the device node instead. Where udevd runs, dmrecover also waits for the device's own
event through pyudev (monitor started before the dmsetup call, so the event cannot be missed):
that is when the udev rules have run and /dev/dmrecover/<session>/<layer> exists.
"""

from __future__ import annotations

import filecmp
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import dmrecover
from dmrecover import DM_NAME_PREFIX, DM_UUID_PREFIX
from dmrecover.errors import BackendUnavailable, NotRootError, StackError
from dmrecover.system import command

log = logging.getLogger(__name__)

UDEV_RULES_NAME = "56-dmrecover.rules"
UDEV_RULES_DIR = Path("/etc/udev/rules.d")
NAME_PREFIX = DM_NAME_PREFIX
# Sector size of device-mapper tables.
SECTOR = 512
# Seconds to wait for a device's udev event or node.
UDEV_TIMEOUT = 30.0

_LAYER_RE = re.compile(r"^[a-z][a-z0-9]*$")
_SESSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


# ---------------------------------------------------------------------------------------------
# naming


def dm_name(session: str, layer: str) -> str:
    """The dm name of a session's layer: dmrecover-<session>-<layer>, "-" in session doubled.

    This is LVM's escaping, so `dmsetup splitname` (used by the udev rules) splits it back.
    """
    _check_names(session, layer)
    return f"{NAME_PREFIX}-{session.replace('-', '--')}-{layer}"


def dm_uuid(session: str, layer: str) -> str:
    """The dm UUID of a session's layer: always starts with DM_UUID_PREFIX."""
    _check_names(session, layer)
    return f"{DM_UUID_PREFIX}{session}-{layer}"


def split_uuid(uuid: str) -> tuple[str, str] | None:
    """(session, layer) of one of our UUIDs, None for any other UUID."""
    if not uuid.startswith(DM_UUID_PREFIX):
        return None
    rest = uuid[len(DM_UUID_PREFIX):]
    session, sep, layer = rest.rpartition("-")
    if not sep or not session or not layer:
        return None
    return session, layer


def stable_path(session: str, layer: str) -> Path:
    """/dev/dmrecover/<session>/<layer>, the name the udev rules give a layer."""
    return Path("/dev") / NAME_PREFIX / session / layer


def mapper_path(name: str) -> Path:
    return Path("/dev/mapper") / name


def _check_names(session: str, layer: str) -> None:
    if not _SESSION_RE.match(session) or len(session) > 64:
        raise StackError(f"session name {session!r} is not usable in a device name",
                         hint="use letters, digits, '.', '_', '+' and '-' (at most 64)")
    if not _LAYER_RE.match(layer):
        raise StackError(f"layer name {layer!r} is not usable in a device name")


# ---------------------------------------------------------------------------------------------
# probe


@dataclass(frozen=True)
class DmInfo:
    """What `dmsetup info` says about one device."""

    name: str
    uuid: str
    major: int
    minor: int
    open_count: int
    suspended: bool
    read_only: bool
    targets: int

    @property
    def devnode(self) -> Path:
        return Path(f"/dev/dm-{self.minor}")

    @property
    def owned(self) -> bool:
        return self.uuid.startswith(DM_UUID_PREFIX)


_udevsync: bool | None = None


def udev_running() -> bool:
    """True when a udevd answers on its control socket."""
    if not Path("/run/udev/control").exists():
        return False
    if not command.have("udevadm"):
        return False
    res = command.run(["udevadm", "control", "--ping", "--timeout=5"], check=False, timeout=10)
    return res.returncode == 0


def use_udevsync() -> bool:
    """Whether dmsetup may wait for udev (cached: udevd does not come and go under us)."""
    global _udevsync
    if _udevsync is None:
        _udevsync = udev_running()
        if not _udevsync:
            log.info("no udevd answers: dmsetup runs with --noudevsync, nodes are polled for")
    return _udevsync


def targets() -> dict[str, tuple[int, ...]]:
    """The kernel's device-mapper targets and their versions (`dmsetup targets`)."""
    out = _dmsetup(["targets"], what="dmsetup targets").stdout
    result: dict[str, tuple[int, ...]] = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[1].startswith("v"):
            try:
                result[parts[0]] = tuple(int(x) for x in parts[1][1:].split("."))
            except ValueError:
                result[parts[0]] = ()
    return result


def _load_module(module: str) -> None:
    """modprobe a module if possible; a failure is not an error by itself (it may be built in)."""
    if command.have("modprobe"):
        command.run(["modprobe", module], check=False, timeout=30)


def available(target: str = "snapshot") -> bool:
    """True when device-mapper works here and has `target` (loads its module first).

    Never raises: this is what `--backend auto` asks.
    """
    if os.geteuid() != 0 or not command.have("dmsetup"):
        return False
    _load_module("dm-mod")
    _load_module(f"dm-{target}")
    if not Path("/dev/mapper/control").exists():
        return False
    try:
        return target in targets()
    except StackError:
        return False


def probe(required: tuple[str, ...] = ("snapshot",)) -> dict[str, tuple[int, ...]]:
    """Check that the dm backend can run here; one clear error naming what is missing.

    Needs root, dmsetup, the device-mapper driver and each target in `required` (the module is
    loaded first: `snapshot` lives in dm-snapshot, which also provides `snapshot-merge`).
    Returns the targets. NotRootError for a non-root caller, BackendUnavailable for a missing
    piece.
    """
    if os.geteuid() != 0:
        raise NotRootError("the dm backend needs root", hint="run dmrecover as root")
    if not command.have("dmsetup"):
        raise BackendUnavailable("the dm backend needs dmsetup, which is not installed",
                                 hint="install the dmsetup package, or use --backend fuse")
    _load_module("dm-mod")
    for t in required:
        _load_module(f"dm-{t}")
    if not Path("/dev/mapper/control").exists():
        raise BackendUnavailable("this kernel has no device-mapper "
                                 "(/dev/mapper/control is missing)",
                                 hint="load the dm-mod module, or use --backend fuse")
    try:
        have = targets()
    except StackError as err:
        raise BackendUnavailable(f"device-mapper does not answer: {err.message}",
                                 hint="see the kernel log, or use --backend fuse") from err
    for t in required:
        if t not in have:
            raise BackendUnavailable(f"the kernel has no device-mapper {t!r} target "
                                     f"(have: {', '.join(sorted(have)) or 'none'})",
                                     hint=f"load the dm-{t} module, or use --backend fuse")
    use_udevsync()
    return have


# ---------------------------------------------------------------------------------------------
# dmsetup


def _dmsetup(args: list[str], *, what: str, input: str | None = None, sync: bool = False,
             timeout: float = 120.0, check: bool = True):
    argv = [command.find("dmsetup") or "dmsetup"]
    if sync and not use_udevsync():
        argv.append("--noudevsync")
    argv += args
    return command.run(argv, what=what, input=input, error=StackError, timeout=timeout,
                       check=check)


def _table_text(table: str | list[str]) -> str:
    lines = [table] if isinstance(table, str) else list(table)
    text = "\n".join(line.strip() for line in lines if line.strip())
    if not text:
        raise StackError("empty device-mapper table")
    return text + "\n"


class _UdevWaiter:
    """Catches one device's udev event: the monitor starts before the dmsetup call."""

    def __init__(self, uuid: str, actions: tuple[str, ...]) -> None:
        self.uuid = uuid
        self.actions = actions
        self.monitor = None
        if use_udevsync():
            try:
                # Deferred: only where udevd runs, and optional even then (without it, or
                # without netlink in this namespace, the node is polled for instead).
                import pyudev

                context = pyudev.Context()
                self.monitor = pyudev.Monitor.from_netlink(context, source="udev")
                self.monitor.filter_by("block")
                self.monitor.start()
            except (ImportError, OSError) as err:  # no netlink in this namespace: poll
                log.info("udev monitor unavailable (%s): polling for nodes", err)
                self.monitor = None

    def wait(self, check, timeout: float = UDEV_TIMEOUT) -> None:
        """Wait for our event (with udevd), else until check() holds; raise on timeout."""
        deadline = time.monotonic() + timeout
        if self.monitor is not None:
            try:
                while time.monotonic() < deadline:
                    left = deadline - time.monotonic()
                    dev = self.monitor.poll(timeout=max(0.05, min(1.0, left)))
                    if dev is None:
                        if check():  # the event may have come before our filter saw it whole
                            return
                        continue
                    if dev.action in self.actions and dev.properties.get("DM_UUID") == self.uuid:
                        log.debug("udev %s event for %s", dev.action, self.uuid)
                        return
            finally:
                self.close()
        while time.monotonic() < deadline:
            if check():
                return
            time.sleep(0.05)
        if check():
            return
        raise StackError(f"device {self.uuid}: no udev event or device node after {timeout:g}s",
                         hint="check that udevd runs (systemd-udevd) and `udevadm settle`")

    def close(self) -> None:
        if self.monitor is not None:
            # pyudev's Monitor has no close(); dropping the socket is enough.
            self.monitor = None


def change_waiter(name: str):
    """A waiter for the next udev change event of a device, to start before the call that
    causes it (a resume); None when the device has no UUID. `.wait(check)` returns on that
    event (where udevd runs), else once check() holds."""
    inf = info(name)
    return _UdevWaiter(inf.uuid, ("change",)) if inf and inf.uuid else None


def create(name: str, table: str | list[str], uuid: str, *, read_only: bool = False,
           wait: bool = True) -> Path:
    """Create (and resume) a device; return its /dev/mapper path once its node exists.

    `uuid` must start with DM_UUID_PREFIX: every device dmrecover makes is findable as its own.
    """
    if not uuid.startswith(DM_UUID_PREFIX):
        raise StackError(f"refusing to create {name}: uuid {uuid!r} lacks the "
                         f"{DM_UUID_PREFIX} prefix")
    waiter = _UdevWaiter(uuid, ("add", "change")) if wait else None
    args = ["create", name, "--uuid", uuid]
    if read_only:
        args.append("--readonly")
    try:
        _dmsetup(args, what=f"creating device {name}", input=_table_text(table), sync=True)
    except BaseException:
        if waiter:
            waiter.close()
        raise
    path = mapper_path(name)
    if waiter:
        waiter.wait(lambda: path.exists())
        if not path.exists():
            # udev ran but made no /dev/mapper node (no dm rules installed): make it ourselves.
            _dmsetup(["mknodes", name], what=f"making the node of {name}", check=False)
    log.info("created %s (%s)", name, uuid)
    return path


def message(name: str, text: str, sector: int = 0) -> str:
    """Send a target message (`dmsetup message NAME SECTOR TEXT`); returns its answer."""
    return _dmsetup(["message", name, str(sector), *text.split()],
                    what=f"sending {text!r} to {name}").stdout


def resume(name: str) -> None:
    """Resume a device (activating a reloaded table); waits for its udev change event."""
    waiter = change_waiter(name)
    try:
        _dmsetup(["resume", name], what=f"resuming {name}", sync=True)
    except BaseException:
        if waiter:
            waiter.close()
        raise
    if waiter:
        waiter.wait(lambda: mapper_path(name).exists(), timeout=UDEV_TIMEOUT)


def remove(name: str, *, retries: int = 20, force: bool = False) -> None:
    """Remove a device; retried a while since udev's probes may hold it open for a moment.

    force replaces the table by `error` first (so a stuck opener gets errors, never data).
    """
    args = ["remove", "--retry"]
    if force:
        args.append("--force")
    args.append(name)
    last: StackError | None = None
    for attempt in range(retries):
        if info(name) is None:
            return
        try:
            _dmsetup(args, what=f"removing {name}", sync=True)
        except StackError as err:
            last = err
            if _gone(err.stderr) or info(name) is None:
                return
            time.sleep(0.1 * (attempt + 1))
            continue
        _wait_gone(mapper_path(name))
        log.info("removed %s", name)
        return
    assert last is not None
    raise last


def _wait_gone(path: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while (path.exists() or path.is_symlink()) and time.monotonic() < deadline:
        time.sleep(0.05)
    if path.is_symlink() and not path.exists():
        # a dangling link left where no udevd runs
        try:
            path.unlink()
        except OSError:
            pass


def status(name: str) -> str:
    """The device's status line(s) (`dmsetup status`)."""
    return _dmsetup(["status", name], what=f"status of {name}").stdout.strip()


def table(name: str) -> str:
    """The device's live table (`dmsetup table`)."""
    return _dmsetup(["table", name], what=f"table of {name}").stdout.strip()


def _gone(stderr: str) -> bool:
    """dmsetup's ways of saying the device does not exist."""
    s = stderr.lower()
    return "does not exist" in s or "no such device" in s or "not found" in s


_INFO_FIELDS = "name,uuid,major,minor,open,attr,segments"


def _parse_info_line(line: str) -> DmInfo | None:
    parts = line.split("|")
    if len(parts) != 7:
        return None
    name, uuid, major, minor, opened, attr, segments = parts
    try:
        return DmInfo(name=name, uuid=uuid, major=int(major), minor=int(minor),
                      open_count=int(opened), suspended="s" in attr, read_only="r" in attr,
                      targets=int(segments))
    except ValueError:
        return None


def info(name: str) -> DmInfo | None:
    """What dmsetup knows of one device, None when it does not exist."""
    res = _dmsetup(["info", "-c", "--noheadings", "--separator", "|", "-o", _INFO_FIELDS, name],
                   what=f"info of {name}", check=False)
    if res.returncode != 0:
        if _gone(res.stderr):
            return None
        raise StackError(f"dmsetup info {name} failed: {res.stderr.strip() or 'no message'}",
                         argv=list(res.args), returncode=res.returncode, stderr=res.stderr)
    return _parse_info_line(res.stdout.strip().splitlines()[0]) if res.stdout.strip() else None


def list_all() -> list[DmInfo]:
    """Every dm device on the system."""
    res = _dmsetup(["info", "-c", "--noheadings", "--separator", "|", "-o", _INFO_FIELDS],
                   what="listing dm devices", check=False)
    if res.returncode != 0 or "No devices found" in res.stdout + res.stderr:
        return []
    return [i for i in (_parse_info_line(x) for x in res.stdout.splitlines()) if i]


def list_owned(session: str | None = None) -> list[DmInfo]:
    """dmrecover's devices (UUID with our prefix), optionally one session's only."""
    owned = [i for i in list_all() if i.owned]
    if session is not None:
        owned = [i for i in owned if (split_uuid(i.uuid) or ("", ""))[0] == session]
    return owned


def dependencies(name: str) -> list[tuple[int, int]]:
    """(major, minor) of the devices a dm device sits on (`dmsetup deps`)."""
    out = _dmsetup(["deps", "-o", "devno", name], what=f"dependencies of {name}").stdout
    return [(int(a), int(b)) for a, b in re.findall(r"\((\d+),\s*(\d+)\)", out)]


def remove_owned(session: str | None = None) -> list[str]:
    """Remove dmrecover's devices (top layers first); touch nothing else. Returns the names."""
    removed: list[str] = []
    # A device can be removed once nothing holds it: repeat, removing the unopened ones.
    for _ in range(8):
        owned = list_owned(session)
        if not owned:
            break
        progress = False
        for dev in sorted(owned, key=lambda d: d.open_count):
            if dev.open_count == 0:
                if dev.suspended:
                    resume(dev.name)
                remove(dev.name)
                removed.append(dev.name)
                progress = True
        if not progress:
            names = ", ".join(f"{d.name} (open {d.open_count})" for d in owned)
            raise StackError(f"dmrecover devices still in use: {names}",
                             hint="unmount them and stop what holds them, then run cleanup again")
    return removed


# ---------------------------------------------------------------------------------------------
# udev rules


def packaged_rules() -> Path:
    """The udev rules file shipped in the package."""
    return Path(dmrecover.__file__).with_name("data") / UDEV_RULES_NAME


def install_udev_rules(rules_dir: Path = UDEV_RULES_DIR) -> bool:
    """Install (or update) dmrecover's udev rules and reload udevd. True when it changed them."""
    src = packaged_rules()
    if not src.exists():
        raise StackError(f"udev rules {src} missing from the installed package",
                         hint="reinstall dmrecover")
    dst = rules_dir / UDEV_RULES_NAME
    if dst.exists() and filecmp.cmp(src, dst, shallow=False):
        return False
    rules_dir.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_suffix(".tmp")
    shutil.copyfile(src, tmp)
    os.chmod(tmp, 0o644)
    os.replace(tmp, dst)
    if use_udevsync():
        command.run(["udevadm", "control", "--reload"], what="reloading udev rules",
                    error=StackError, check=False)
    log.info("installed udev rules %s", dst)
    return True


# ---------------------------------------------------------------------------------------------
# tables


def sectors(size_bytes: int) -> int:
    """Bytes to 512-byte sectors; the size must be a whole number of sectors."""
    if size_bytes % SECTOR:
        raise StackError(f"size {size_bytes} is not a multiple of {SECTOR} bytes")
    return size_bytes // SECTOR


def linear_table(device: str | Path, size_bytes: int, offset: int = 0) -> str:
    return f"0 {sectors(size_bytes)} linear {device} {offset}"


def snapshot_table(origin: str | Path, cow: str | Path, size_bytes: int,
                   chunk_sectors: int = 8) -> str:
    """A persistent snapshot (P) with 4 KiB chunks by default."""
    return f"0 {sectors(size_bytes)} snapshot {origin} {cow} P {chunk_sectors}"


def snapshot_merge_table(origin: str | Path, cow: str | Path, size_bytes: int,
                         chunk_sectors: int = 8) -> str:
    return f"0 {sectors(size_bytes)} snapshot-merge {origin} {cow} P {chunk_sectors}"


@dataclass(frozen=True)
class SnapshotStatus:
    """A snapshot's or snapshot-merge's status: `<allocated>/<total> <metadata>`."""

    allocated: int
    total: int
    metadata: int
    invalid: bool = False
    merge_failed: bool = False

    @property
    def merged(self) -> bool:
        """A merge is complete when only the metadata sectors remain allocated."""
        return not self.invalid and self.allocated == self.metadata


def parse_snapshot_status(line: str) -> SnapshotStatus:
    """Parse `0 N snapshot A/T M` (or `Invalid`, `Merge failed`)."""
    parts = line.split()
    if len(parts) < 4:
        raise StackError(f"unexpected snapshot status {line!r}")
    rest = " ".join(parts[3:])
    if "Invalid" in rest:
        return SnapshotStatus(0, 0, 0, invalid=True)
    if "Merge failed" in rest:
        return SnapshotStatus(0, 0, 0, merge_failed=True)
    m = re.match(r"(\d+)/(\d+)\s+(\d+)", rest)
    if not m:
        raise StackError(f"unexpected snapshot status {line!r}")
    return SnapshotStatus(int(m.group(1)), int(m.group(2)), int(m.group(3)))


def snapshot_status(name: str) -> SnapshotStatus:
    return parse_snapshot_status(status(name).splitlines()[0])
