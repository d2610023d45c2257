"""LVM logical volumes that a session creates (--overlay VG, --dest-vg VG), through blivet.

A session may put its dm COW or dm-clone metadata (`cow`, `meta`) and its DEST (`dest`) on new
LVs of a volume group. Every LV made here carries the tags

    dmrecover   dmrecover_session_<session>   dmrecover_role_<role>

given in the same `lvcreate` (libblockdev's, through blivet: an LV is never seen untagged), and
nothing here removes an LV that lacks the first two: an LV that dmrecover did not create is
never removed, whatever its name. The LV's name is `dmrecover-<session>-<role>` (`cow`, `meta`),
or the session's own name for DEST (it stays: the application runs on it after the cutover).

A start names the LVs it is about to create in its state dir's intent file (INTENT_FILE,
written durably before the first `lvcreate`, removed once the session record lists them):
what `cleanup` reads to tell an LV a start made and never handed over (a crash in between)
from one a session uses.

blivet is imported on first use only (it is optional, setup.cfg extra `lvm`, and its import
is slow and prints libblockdev's DBus complaint where no system bus runs: that goes to the
debug log instead of the user's terminal). blivet 3.6 / libblockdev 2.28 (Debian 12) report no
tags: they are read with `lvs --reportformat json`, the one LVM command run here directly.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import stat
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from dmrecover import DM_NAME_PREFIX, DM_UUID_PREFIX
from dmrecover.errors import DeviceError, StackError, UsageError
from dmrecover.system import command, files
from dmrecover.system.blockdev import size_of
from dmrecover.system.sysfs import dm_nodes_with_uuid_prefix
from dmrecover.units import format_size

log = logging.getLogger(__name__)

TAG = "dmrecover"
SESSION_TAG = "dmrecover_session_"
ROLE_TAG = "dmrecover_role_"
STATE_TAG = "dmrecover_state_"  # the session's state dir (cleanup's question: still wanted?)
ROLES = ("cow", "meta", "dest")
#: In the session's state dir: the LVs a start is creating, until its record lists them.
INTENT_FILE = "lvs-intent.json"
#: Wiped at the start of a new COW or metadata LV: the kernel formats an all-zero header, and
#: refuses one holding what an earlier LV on the same extents left.
HEADER_WIPE = 1 << 20

# LVM's own rules (lvm(8)): LV names of [A-Za-z0-9+_.-], not starting with '-', at most 127
# characters (minus room for LVM's suffixes), none holding a name LVM keeps for itself; tags
# of [A-Za-z0-9_+.-/=!:&#], at most 1024.
_LV_CHARS = re.compile(r"[^A-Za-z0-9+_.-]")
_TAG_CHARS = re.compile(r"[^A-Za-z0-9_+.\-/=!:&#]")
_RESERVED = ("_cdata", "_cmeta", "_corig", "_mimage", "_mlog", "_pmspare", "_rimage",
             "_rmeta", "_tdata", "_tmeta", "_vorigin", "_vdata")
_VG_RE = re.compile(r"^[A-Za-z0-9+_.][A-Za-z0-9+_.-]{0,126}$")


def valid_vg_name(name: str) -> bool:
    """Whether `name` can be a volume group's name (LVM's charset; not '.' or '..')."""
    return bool(_VG_RE.match(name)) and name not in (".", "..")


def _lv_safe(text: str) -> str:
    text = _LV_CHARS.sub("_", text)
    for word in _RESERVED:  # "_tmeta" -> "-tmeta": a name LVM accepts
        text = text.replace(word, "-" + word[1:])
    return text


def lv_name(session: str, role: str) -> str:
    """The LV a session creates for `role`: DEST is named after the session, the rest
    dmrecover-<session>-<role>."""
    if role not in ROLES:
        raise ValueError(f"unknown LV role {role!r}")
    name = _lv_safe(session) if role == "dest" else f"dmrecover-{_lv_safe(session)}-{role}"
    if name in ("snapshot", "pvmove") or name.startswith(("snapshot", "pvmove", "-")):
        name = f"dmrecover-{name}"
    return name[:120]


def session_tag(session: str) -> str:
    return SESSION_TAG + _TAG_CHARS.sub("_", session)[:900]


def tags_for(session: str, role: str, state_dir: str | None = None) -> list[str]:
    """The LV's tags; the state dir's only where LVM's tag charset can spell it (an LV
    without it is never removed by cleanup)."""
    tags = [TAG, session_tag(session), ROLE_TAG + role]
    if state_dir and not _TAG_CHARS.search(state_dir) and len(state_dir) < 900:
        tags.append(STATE_TAG + state_dir)
    return tags


@dataclass(frozen=True)
class LogicalVolume:
    """An LV a session created (the session record keeps these)."""

    vg: str
    name: str
    role: str  # cow, meta or dest
    size: int

    @property
    def path(self) -> str:
        return f"/dev/{self.vg}/{self.name}"

    def __str__(self) -> str:
        return f"{self.vg}/{self.name}"

    def to_dict(self) -> dict:
        return {"vg": self.vg, "name": self.name, "role": self.role, "size": self.size}

    @classmethod
    def from_dict(cls, data: dict) -> LogicalVolume:
        return cls(str(data["vg"]), str(data["name"]), str(data.get("role", "")),
                   int(data.get("size", 0)))


@dataclass(frozen=True)
class VolumeGroup:
    name: str
    free: int  # bytes
    extent: int  # bytes


@dataclass(frozen=True)
class LvInfo:
    vg: str
    name: str
    tags: tuple[str, ...]
    size: int


# ---------------------------------------------------------------- the boundary: blivet

_import_lock = threading.Lock()
_blivet: Any = None


#: libblockdev's LVM plugin that runs the LVM tools. Debian's configuration prefers the DBus
#: one (libbd_lvm-dbus), which loads wherever a system bus runs and then fails every call
#: when lvm2-dbusd is not installed (the test VM: "com.redhat.lvmdbus1 was not provided").
LVM_PLUGIN = "libbd_lvm.so.2"


@contextlib.contextmanager
def _quiet_stderr(what: str) -> Iterator[None]:
    """What libblockdev and GLib print on fd 2 meanwhile (DBus complaints, GLib warnings)
    goes to the debug log, not to the user's terminal."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as err:
        os.dup2(err.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            err.seek(0)
            chatter = err.read().decode(errors="replace").strip()
            if chatter:
                log.debug("%s: %s", what, " ".join(chatter.split())[:2000])


def _import_blivet() -> Any:
    """blivet, imported once, with libblockdev's LVM plugin the one that runs the tools."""
    global _blivet
    with _import_lock:
        if _blivet is not None:
            return _blivet
        filters = warnings.filters[:]
        with _quiet_stderr("blivet import"):
            try:
                # Deferred: blivet is optional (setup.cfg extra `lvm`) and needed only for
                # --overlay VG / --dest-vg VG; its import loads libblockdev's plugins.
                import blivet
            except ImportError as exc:
                raise DeviceError("LVM support needs blivet, which is not installed",
                                  hint="install dmrecover[lvm] (with Debian's python3-blockdev "
                                       "and python3-gi)") from exc
            bd = blivet.blockdev
            specs = bd.plugin_specs_from_names(sorted(blivet._REQUESTED_PLUGIN_NAMES))
            for spec in specs:
                if spec.name == bd.Plugin.LVM:
                    spec.so_name = LVM_PLUGIN
            try:
                bd.try_reinit(require_plugins=specs, reload=True, log_func=None)
            except Exception as err:
                log.debug("libblockdev reinit: %s", _one_line(err))
            if not bd.is_plugin_available(bd.Plugin.LVM):
                raise DeviceError("LVM support needs libblockdev's LVM plugin "
                                  f"({LVM_PLUGIN}), which did not load",
                                  hint="apt install libblockdev-lvm2 lvm2")
        # Its import turns on DeprecationWarnings and logs Python warnings: undone, and its
        # own loggers (blivet, libblockdev's "program") heard only at -vv (debug): nothing of
        # it reaches the user's terminal through dmrecover's logging otherwise.
        warnings.filters[:] = filters
        logging.captureWarnings(False)
        for name in ("blivet", "program", "testdata"):
            logger = logging.getLogger(name)
            logger.propagate = logging.getLogger().isEnabledFor(logging.DEBUG)
        _blivet = blivet
        return blivet


class Lvm:
    """The LVM operations dmrecover needs, through blivet and its libblockdev (the one place
    that touches them: unit tests replace this class)."""

    def _blockdev(self) -> Any:
        bd = _import_blivet().blockdev
        bd.lvm.set_global_config(config())  # its LVM commands skip our devices too
        return bd

    def volume_group(self, name: str) -> VolumeGroup | None:
        """The volume group `name` as blivet sees it, or None when there is none."""
        blivet = _import_blivet()
        try:
            with _quiet_stderr("blivet scan"):
                b = blivet.Blivet()
                b.reset()
                dev = b.devicetree.get_device_by_name(name)
        except Exception as err:  # a device blivet cannot scan must not hide the VG
            log.info("blivet could not scan the devices (%s): asking LVM directly",
                     _one_line(err))
            dev = None
        if dev is not None and getattr(dev, "type", None) == "lvmvg":
            return VolumeGroup(name, int(dev.free_space), int(dev.pe_size))
        # Not in blivet's device tree (it hides some PVs, e.g. on devices it ignores): ask
        # its libblockdev directly before saying there is no such VG.
        try:
            with _quiet_stderr("vginfo"):
                info = self._blockdev().lvm.vginfo(name)
        except Exception as err:
            log.debug("vginfo %s: %s", name, _one_line(err))
            return None
        return VolumeGroup(name, int(info.free), int(info.extent_size))

    def create(self, vg: str, name: str, size: int, tags: list[str]) -> None:
        """lvcreate with the tags in the same command (never an untagged LV of ours)."""
        bd = self._blockdev()
        extra = [bd.ExtraArg.new("--addtag", t) for t in tags]
        try:
            with _quiet_stderr("lvcreate"):
                bd.lvm.lvcreate(vg, name, size, extra=extra)
        except Exception as err:  # GLib.Error from libblockdev
            raise StackError(f"creating LV {vg}/{name}: {_one_line(err)}") from err

    def activate(self, vg: str, name: str) -> None:
        try:
            with _quiet_stderr("lvactivate"):
                self._blockdev().lvm.lvactivate(vg, name, ignore_skip=True)
        except Exception as err:
            raise StackError(f"activating LV {vg}/{name}: {_one_line(err)}") from err

    def remove(self, vg: str, name: str) -> None:
        try:
            with _quiet_stderr("lvremove"):
                self._blockdev().lvm.lvremove(vg, name, force=True)
        except Exception as err:
            raise StackError(f"removing LV {vg}/{name}: {_one_line(err)}") from err

    def lvs(self, vg: str | None = None) -> list[LvInfo]:
        """Every LV (of `vg`) with its tags: libblockdev 2.28 reports none, `lvs` does."""
        argv = ["lvs", "--config", config(), "--reportformat", "json", "--units", "b",
                "--nosuffix",
                "-o", "vg_name,lv_name,lv_tags,lv_size"]
        if vg is not None:
            argv.append(vg)
        res = command.run(argv, error=StackError, what="listing LVs", check=vg is None)
        if res.returncode != 0:
            return []  # no such VG: no LVs
        out = []
        for report in json.loads(res.stdout or "{}").get("report", []):
            for row in report.get("lv", []):
                tags = tuple(t for t in str(row.get("lv_tags", "")).split(",") if t)
                out.append(LvInfo(row["vg_name"], row["lv_name"], tags,
                                  int(row.get("lv_size") or 0)))
        return out


def config() -> str:
    """The `--config` of every LVM command run here: dmrecover's own dm devices are never
    scanned. None is a PV, and while a dead session's source waits for `resume`
    (backends/dm/waitpath.py) a read of one waits too: an `lvs` scanning it never returned
    (`cleanup --dry-run` hung). Every name of each device is rejected (LVM accepts a device
    when any of its names matches an accept pattern first), ahead of the system's own
    global_filter, which is kept."""
    ours = [f"r|^{node}$|" for node in dm_nodes_with_uuid_prefix(DM_UUID_PREFIX)]
    ours += [f"r|^/dev/mapper/{DM_NAME_PREFIX}-|", f"r|^/dev/{DM_NAME_PREFIX}/|",
             f"r|/dm-name-{DM_NAME_PREFIX}-|", f"r|/dm-uuid-{DM_UUID_PREFIX}|"]
    entries = ours + system_global_filter()
    return "devices { global_filter = [ " + ", ".join(f'"{e}"' for e in entries) + " ] }"


def system_global_filter() -> list[str]:
    """The patterns of lvm.conf's devices/global_filter (empty when unset or no lvmconfig)."""
    if not command.have("lvmconfig"):
        return []
    res = command.run(["lvmconfig", "devices/global_filter"], check=False,
                      what="reading LVM's global_filter")
    if res.returncode != 0:
        return []
    return parse_filter(res.stdout)


def parse_filter(text: str) -> list[str]:
    """`global_filter=["a|x|","r|.*|"]` (lvmconfig's output) -> its patterns."""
    _, _, value = text.partition("=")
    return [m.replace('\\"', '"') for m in re.findall(r'"((?:[^"\\]|\\.)*)"', value)]


def _one_line(err: BaseException) -> str:
    text = getattr(err, "message", None) or str(err)
    return " ".join(str(text).split())[:300]


_default = Lvm()


def default() -> Lvm:
    return _default


# ---------------------------------------------------------------- dmrecover's rules

def lookup(vg: str, *, lvm: Lvm | None = None, option: str = "--overlay") -> VolumeGroup:
    """The volume group, or one line saying it is not there."""
    if not valid_vg_name(vg):
        raise UsageError(f"{option} {vg}: not a volume group name")
    found = (lvm or _default).volume_group(vg)
    if found is None:
        raise DeviceError(f"{option} {vg}: no such LVM volume group",
                          hint="`vgs` lists them; or name a directory")
    return found


def extents(size: int, extent: int) -> int:
    """`size` rounded up to whole extents (what the LV takes from the VG)."""
    extent = max(extent, 1)
    return -(-size // extent) * extent


def plan(session: str, wanted: list[tuple[str, str, int]], *,
         lvm: Lvm | None = None) -> list[LogicalVolume]:
    """Check that the LVs (vg, role, size) can be created: each VG exists and has the room
    (all of them together), no LV of that name is there yet. Changes nothing."""
    lvm = lvm or _default
    groups: dict[str, VolumeGroup] = {}
    out = []
    for vg, role, size in wanted:
        option = "--dest-vg" if role == "dest" else "--overlay"
        if vg not in groups:
            groups[vg] = lookup(vg, lvm=lvm, option=option)
        group = groups[vg]
        lv = LogicalVolume(vg, lv_name(session, role), role, extents(size, group.extent))
        _check_name_free(lv, session, lvm)
        out.append(lv)
    for vg, group in groups.items():
        need = sum(lv.size for lv in out if lv.vg == vg)
        if need > group.free:
            what = " and ".join(f"{lv.role} {format_size(lv.size)}" for lv in out
                                if lv.vg == vg)
            raise DeviceError(f"volume group {vg} has {format_size(group.free)} free, the "
                              f"session needs {format_size(need)} ({what})",
                              hint="extend the VG (vgextend), free room, or name another")
    return out


def _check_name_free(lv: LogicalVolume, session: str, lvm: Lvm) -> None:
    for info in lvm.lvs(lv.vg):
        if info.name != lv.name:
            continue
        if is_ours(info, session):
            raise DeviceError(f"LV {lv} exists already, left by an earlier dmrecover session "
                              f"{session}", hint="`dmrecover cleanup` removes it, or pick "
                              "another --session")
        raise DeviceError(f"LV {lv} exists already and was not created by dmrecover (it is "
                          "left alone)", hint="pick another --session (the LV is named after "
                          "it) or another volume group")


def check_free(session: str, lvs: list[LogicalVolume], *, lvm: Lvm | None = None) -> None:
    """Every planned name is still free (checked again under the state dir's lock, before
    the intent file names them: an LV the intent names is then one this start created)."""
    for lv in lvs:
        _check_name_free(lv, session, lvm or _default)


def is_ours(info: LvInfo, session: str | None = None) -> bool:
    """Tagged by dmrecover (for `session`, when given)."""
    if TAG not in info.tags:
        return False
    if session is None:
        return any(t.startswith(SESSION_TAG) for t in info.tags)
    return session_tag(session) in info.tags


def _tag_value(info: LvInfo, prefix: str) -> str | None:
    """The rest of the LV's first tag that starts with `prefix`, or None."""
    return next((t[len(prefix):] for t in info.tags if t.startswith(prefix)), None)


def session_of(info: LvInfo) -> str | None:
    return _tag_value(info, SESSION_TAG)


def state_dir_of(info: LvInfo) -> str | None:
    return _tag_value(info, STATE_TAG)


def role_of(info: LvInfo) -> str | None:
    return _tag_value(info, ROLE_TAG)


def create(session: str, lv: LogicalVolume, *, state_dir: str | None = None,
           lvm: Lvm | None = None, wipe_header: bool | None = None) -> LogicalVolume:
    """Create the planned LV, tagged for the session, active; a COW or metadata LV gets its
    first MiB zeroed (the kernel then formats it)."""
    lvm = lvm or _default
    _check_name_free(lv, session, lvm)
    lvm.create(lv.vg, lv.name, lv.size, tags_for(session, lv.role, state_dir))
    log.info("created LV %s (%s, %s) for session %s", lv, lv.role, format_size(lv.size),
             session)
    if wipe_header if wipe_header is not None else lv.role != "dest":
        zero_start(lv.path, min(HEADER_WIPE, lv.size))
    return lv


def zero_start(path: str, length: int) -> None:
    """Write `length` zero bytes at the start of the block device, durably."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        files.write_all(fd, bytes(length), 0)  # length is HEADER_WIPE at most: 1 MiB
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_active(lv: LogicalVolume, *, lvm: Lvm | None = None) -> None:
    """Activate the LV when its node is missing (after a reboot without autoactivation)."""
    if not os.path.exists(lv.path):
        (lvm or _default).activate(lv.vg, lv.name)


def device_for(link: str, size: int, what: str) -> str:
    """The LV an engine-dir symlink names (--overlay VG), activated if its node is missing;
    StackError when it is not a block device of at least `size` bytes."""
    target = os.readlink(link)
    parts = target.split("/")
    if not os.path.exists(target) and len(parts) == 4 and parts[1] == "dev":
        ensure_active(LogicalVolume(parts[2], parts[3], "", size))
    try:
        st = os.stat(target)
    except FileNotFoundError:
        raise StackError(f"the {what} LV {target} is missing",
                         hint="`lvs` shows whether it is there; `vgchange -ay` activates it"
                         ) from None
    if not stat.S_ISBLK(st.st_mode):
        raise StackError(f"the {what} {target} is not a block device")
    have = size_of(target)
    if have < size:
        raise StackError(f"the {what} LV {target} holds {have} bytes, {size} are needed")
    return target


def remove(session: str, lv: LogicalVolume, *, lvm: Lvm | None = None) -> bool:
    """Remove the LV if it is there and carries the session's tags; False when it is gone
    already. An LV of that name without them is never removed: StackError."""
    lvm = lvm or _default
    info = next((i for i in lvm.lvs(lv.vg) if i.name == lv.name), None)
    if info is None:
        return False
    if not is_ours(info, session):
        raise StackError(f"LV {lv} is not tagged by dmrecover session {session}: left alone",
                         hint="it is not dmrecover's: remove it yourself if it is unwanted")
    lvm.remove(lv.vg, lv.name)
    log.info("removed LV %s (%s) of session %s", lv, lv.role, session)
    return True


def remove_all(session: str, lvs: list[LogicalVolume], *, lvm: Lvm | None = None
               ) -> list[str]:
    """Remove each LV (newest first); returns the problems (empty when all went)."""
    problems = []
    for lv in reversed(lvs):
        try:
            remove(session, lv, lvm=lvm)
        except StackError as err:
            log.error("%s", err)
            problems.append(str(err))
    return problems


def ours(*, lvm: Lvm | None = None) -> list[LvInfo]:
    """Every LV on the system that dmrecover tagged (for cleanup)."""
    try:
        infos = (lvm or _default).lvs()
    except StackError as err:  # no LVM tools: no LVs of ours either
        log.debug("lvs: %s", err)
        return []
    return [i for i in infos if is_ours(i)]


def as_volume(info: LvInfo) -> LogicalVolume:
    return LogicalVolume(info.vg, info.name, role_of(info) or "", info.size)


def orphaned(info: LvInfo, recorded: list[LogicalVolume], intended: list[LogicalVolume]
             ) -> bool:
    """Whether cleanup removes this LV of ours, asked once no process holds its session's
    state lock (so no start is creating it and no session uses it): never one its session's
    record lists; an overlay LV (cow, meta) the record does not list (a start that died
    before its record, a state dir deleted by hand); DEST's LV only when the start's intent
    names it and the record does not (created, never handed over: it holds no data anyone
    acknowledged)."""
    key = (info.vg, info.name)
    if not is_ours(info) or state_dir_of(info) is None:
        return False
    if key in {(lv.vg, lv.name) for lv in recorded}:
        return False
    if role_of(info) in ("cow", "meta"):
        return True
    return role_of(info) == "dest" and key in {(lv.vg, lv.name) for lv in intended}


# ---------------------------------------------------------------- the start's intent

def write_intent(state_dir: str, lvs: list[LogicalVolume]) -> None:
    """Name the LVs a start is about to create, durably, before the first of them exists
    (the start holds the state dir's lock meanwhile)."""
    files.write_json_atomic(os.path.join(state_dir, INTENT_FILE),
                            {"lvs": [lv.to_dict() for lv in lvs]}, mode=0o600)


def read_intent(state_dir: str) -> list[LogicalVolume]:
    """The LVs the intent file names (none without it); DeviceError when it is unreadable or
    another user than root could have written it."""
    data = files.read_trusted_json(os.path.join(state_dir, INTENT_FILE),
                                   error=DeviceError) or {}
    lvs = data.get("lvs")
    try:
        return [LogicalVolume.from_dict(d) for d in lvs or [] if isinstance(d, dict)]
    except (KeyError, TypeError, ValueError) as err:
        raise DeviceError(f"{state_dir}/{INTENT_FILE} is unreadable: {err}") from None


def intended_left(state_dir: str, *, lvm: Lvm | None = None) -> list[LogicalVolume]:
    """The LVs the intent file names that are there, ours, of this state dir: what an earlier
    start that never wrote its record left (cleanup removes them)."""
    lvm = lvm or _default
    named = read_intent(state_dir)
    there = {(i.vg, i.name): i for vg in {lv.vg for lv in named} for i in lvm.lvs(vg)}
    return [lv for lv in named if (info := there.get((lv.vg, lv.name))) is not None
            and is_ours(info) and state_dir_of(info) == state_dir]


def clear_intent(state_dir: str) -> None:
    """Drop the intent file (the record names the LVs now, or none of them exists), durably."""
    try:
        os.unlink(os.path.join(state_dir, INTENT_FILE))
    except FileNotFoundError:
        return
    files.fsync_dir(state_dir)
