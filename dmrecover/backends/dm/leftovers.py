"""What dead sessions of the dm backend left: their device-mapper devices and mounts of them.

Every device dmrecover makes has a UUID with our prefix (dmsetup.DM_UUID_PREFIX), so the
devices are found by looking; which session owns one is found by looking too (the state dir
holding the backing file of a loop under it, else the session's default state dir). The session
layer answers the questions about state dirs through a `SessionLookup`: this module does not
import it.

Left alone: devices of a live session, and the pseudo-volume of a finished online cutover (a
`linear` mapping on DEST that the application runs on). A dead session's origin device (its
table may be one `linear` on DEST too) always goes, after the pseudo-volume over it; the
read-only loop on DEST under it goes by itself with it (autoclear, see stack.py).
"""

from __future__ import annotations

from dmrecover.backends.base import Leftover, SessionLookup
from dmrecover.backends.dm import dmsetup as dm
from dmrecover.backends.dm import waitpath
from dmrecover.errors import StackError
from dmrecover.system import loops
from dmrecover.system.mounts import mounts, umount_or_detach

BACKEND = "dm"
MOUNT = "mount"
DEVICE = "dm"
QUEUE = "queue"  # a waiting source (waitpath): told to stop queueing before the unmounts
#: Removal order among layers equally open (others 0): the origin under them, then the waiting
#: source under the origin (or the clone) last.
LAYER_ORDER = {"origin": 1, waitpath.LAYER: 2}


def _session_state(info: dm.DmInfo, sessions: SessionLookup
                   ) -> tuple[str | None, bool, str | None]:
    """(state dir, live, state) of the session owning a device, found by looking: the state
    dir holding the backing file of a loop under it, else the default state dir."""
    dirs: list[str] = []
    try:
        for major, minor in dm.dependencies(info.name):
            backing = loops.backing_file((major, minor))
            d = sessions.state_dir_of(backing) if backing else None
            if d:
                dirs.append(d)
    except StackError:
        pass
    parts = dm.split_uuid(info.uuid)
    if not dirs and parts:
        dirs.append(sessions.state_dir_for(parts[0]))
    for d in dirs:
        if sessions.is_live(d):
            return d, True, None
    if not dirs:
        return None, False, None
    try:
        state = sessions.state(dirs[0])
    except Exception:  # an unreadable record: the device is still a dead session's
        state = None
    return dirs[0], False, state


def leftover_devices(sessions: SessionLookup, session: str | None = None) -> list[dm.DmInfo]:
    """dmrecover's dm devices that no live session owns, in removal order (top first)."""
    found = []
    for inf in dm.list_owned(session):
        _, live, state = _session_state(inf, sessions)
        if live:
            continue
        if state == "done" and _layer(inf) == "pseudo":
            try:
                if dm.table(inf.name).split()[2:3] == ["linear"]:
                    continue
            except StackError:
                pass
        found.append(inf)
    # Top layers (opened by nothing of ours) first: fewer open references first, and the
    # pseudo-volume before the origin under it (a mounted pseudo is open once, as is the
    # origin it holds).
    return sorted(found, key=lambda i: (i.open_count, LAYER_ORDER.get(_layer(i), 0)))


def _layer(info: dm.DmInfo) -> str:
    """The layer its UUID names ("pseudo", "origin", "source", ...)."""
    return (dm.split_uuid(info.uuid) or ("", ""))[1]


def mounts_of_devices(names: list[str]) -> list[str]:
    """Mount points whose source is one of these dm devices, deepest first."""
    wanted = set()
    for n in names:
        wanted.add(str(dm.mapper_path(n)))
        inf = dm.info(n)
        if inf is not None:
            wanted.add(str(inf.devnode))
    return [m.target for m in reversed(mounts()) if m.source in wanted]


def find(sessions: SessionLookup) -> list[Leftover]:
    """The mounts of dead sessions' devices, then the devices: in removal order. Empty where
    device-mapper is not usable (no dmsetup, no driver, not root)."""
    if not dm.available("snapshot"):
        return []
    infos = leftover_devices(sessions)
    if not infos:
        return []
    names = [i.name for i in infos]
    return ([Leftover(BACKEND, QUEUE, i.name) for i in infos if _layer(i) == waitpath.LAYER]
            + [Leftover(BACKEND, MOUNT, mp) for mp in mounts_of_devices(names)]
            + [Leftover(BACKEND, DEVICE, n) for n in names])


def release_sources(infos: list[dm.DmInfo]) -> list[str]:
    """Tell the waiting sources among `infos` to stop queueing: nobody serves them again,
    and unmounting a filesystem whose writes wait on one would hang."""
    done = []
    for inf in infos:
        if _layer(inf) == waitpath.LAYER:
            waitpath.release(inf.name)
            done.append(f"stopped queueing on {inf.name}")
    return done


def remove_device(name: str) -> None:
    """Remove one leftover device (resumed first if a crash left it suspended)."""
    inf = dm.info(name)
    if inf is None:
        return
    if inf.suspended:
        dm.resume(name)
    dm.remove(name)


def remove(item: Leftover) -> None:
    """Remove one leftover found by `find()` (a mount lazily where a normal unmount fails)."""
    if item.kind == QUEUE:
        waitpath.release(item.name)
    elif item.kind == MOUNT:
        umount_or_detach(item.name)
    elif item.kind == DEVICE:
        remove_device(item.name)
    else:
        raise ValueError(f"not a leftover of the dm backend: {item}")


def teardown_session_devices(session: str) -> list[str]:
    """A dead session's dm part: unmount what is mounted from its devices, remove them."""
    done = []
    infos = dm.list_owned(session) if dm.available() else []
    names = [i.name for i in infos]
    done += release_sources(infos)
    for mp in mounts_of_devices(names):
        lazily = umount_or_detach(mp)
        done.append(f"{'lazily ' if lazily else ''}unmounted {mp}")
    if names:
        done += [f"removed dm device {n}" for n in dm.remove_owned(session)]
    return done
