"""`dmrecover cleanup`: find and remove what dead dmrecover sessions left behind.

Each backend finds its own leftovers (by looking at the system, never by trusting records) and
removes them; this module only answers the backends' questions about sessions (`SessionLookup`:
which state dir holds a path, is its session process alive) and goes through every backend of
the registry in turn, in its order (a backend whose devices sit on another's goes first).

Last come the applications' cgroups (`<cgroup v2 root>/dmrecover/SESSION-DIGEST`, see
session/app.py's cgroup_name) that dead sessions left: only empty ones (the kernel refuses to
remove a populated cgroup anyway), never a live session's (found by the state dirs whose lock a
process holds open, wherever they are: --state-dir too), and only names a session gives (other
tools' and the tests' own cgroups under dmrecover/ are left alone).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from dmrecover.backends import registry
from dmrecover.backends.base import Backend, Leftover
from dmrecover.errors import DmrecoverError
from dmrecover.session.app import cgroup_name
from dmrecover.session.record import (
    LOCK_FILE,
    SESSION_FILE,
    check_state_dir,
    lock_held,
    read_json,
    session_dir,
    state_root,
    take_state_lock,
)
from dmrecover.system import cgroups, lvm

log = logging.getLogger(__name__)


class StateDirLookup:
    """The session layer's answers to a backend's questions (base.SessionLookup)."""

    def state_dir_of(self, path: str) -> str | None:
        """The nearest ancestor of path holding session.json (a state dir), or None."""
        d = os.path.dirname(os.path.abspath(path))
        while True:
            if os.path.isfile(os.path.join(d, SESSION_FILE)):
                return d
            parent = os.path.dirname(d)
            if parent == d:
                return None
            d = parent

    def state_dir_for(self, session: str) -> str:
        return session_dir(session)

    def is_live(self, state_dir: str) -> bool:
        return lock_held(state_dir)

    def state(self, state_dir: str) -> str | None:
        try:
            data = read_json(os.path.join(state_dir, SESSION_FILE))
        except DmrecoverError:
            return None
        return data.get("state") if data else None


@dataclass(frozen=True)
class Found:
    """One leftover and the backend that removes it (None: an application cgroup, removed
    here)."""

    backend: Backend | None
    item: Leftover

    def __str__(self) -> str:
        return str(self.item)


def find_leftovers(backends: Iterable[Backend] | None = None, *,
                   app_cgroups: bool | None = None) -> list[Found]:
    """What dead sessions left, in removal order: every backend of the registry by default,
    then the applications' empty cgroups (by default only when every backend is asked)."""
    lookup = StateDirLookup()
    found: list[Found] = []
    for backend in backends if backends is not None else all_backends():
        found += [Found(backend, item) for item in backend.leftovers(lookup)]
    if app_cgroups if app_cgroups is not None else backends is None:
        found += [Found(None, Leftover("session", "cgroup", path))
                  for path in find_app_cgroups()]
        found += [Found(None, Leftover("session", "lv", str(lvm.as_volume(info))))
                  for info in find_orphan_lvs()]
    return found


def remove_leftovers(found: Iterable[Found]) -> list[str]:
    """Remove what find_leftovers() found; returns the problems (empty when all went)."""
    problems = []
    for f in found:
        try:
            if f.backend is None and f.item.kind == "lv":
                _remove_orphan_lv(f.item.name)
            elif f.backend is None:
                if not cgroups.remove_empty_cgroup(f.item.name):
                    problems.append(f"{f.item}: a process joined it meanwhile; left alone")
            else:
                f.backend.remove_leftover(f.item)
        except DmrecoverError as err:
            log.error("cleanup: %s: %s", f.item, err)
            problems.append(f"{f.item}: {err}")
    return problems


def all_backends() -> list[Backend]:
    return [registry.get(name) for name in registry.names()]


# ---------------------------------------------------------------- LVs

def find_orphan_lvs() -> list[lvm.LvInfo]:
    """LVs dmrecover created whose session is gone (lvm.orphaned): judged only while no
    process holds the session's state lock (a start holds it from before its first lvcreate
    until its session process, which holds it while it runs). Never an LV without the state
    dir's tag, never one a session record lists; DEST's only when the start's intent names it
    and no record does."""
    return [info for info in lvm.ours() if _orphaned(info)]


def _orphaned(info: lvm.LvInfo) -> bool:
    state_dir = lvm.state_dir_of(info)
    if state_dir is None:
        return False
    if os.path.isdir(state_dir) and lock_held(state_dir):
        return False  # a live process owns the session: a start, or the session itself
    try:
        return lvm.orphaned(info, *_listed(state_dir))
    except DmrecoverError as err:
        log.info("cleanup: LV %s/%s: %s: left alone", info.vg, info.name, err)
        return False  # unreadable: not ours to judge


def _listed(state_dir: str) -> tuple[list[lvm.LogicalVolume], list[lvm.LogicalVolume]]:
    """The LVs the state dir's record lists, and those its start's intent names."""
    if not os.path.isdir(state_dir):
        return [], []
    check_state_dir(state_dir)
    data = read_json(os.path.join(state_dir, SESSION_FILE)) or {}
    recorded = [lvm.LogicalVolume(str(d.get("vg")), str(d.get("name")), "", 0)
                for d in data.get("lvs") or [] if isinstance(d, dict)]
    return recorded, lvm.read_intent(state_dir)


@contextlib.contextmanager
def _session_locked(state_dir: str) -> Iterator[bool]:
    """Hold the state dir's lock (no start or session can take it meanwhile): True, or False
    when a process holds it; nothing to hold when the state dir is gone (no session can own
    its LVs: a new start there cannot create an LV under a name that is taken)."""
    if not os.path.isdir(state_dir):
        yield True
        return
    check_state_dir(state_dir)
    fd = take_state_lock(state_dir)
    if fd is None:
        yield False
        return
    try:
        yield True
    finally:
        os.close(fd)


def _remove_orphan_lv(name: str) -> None:
    """Remove the LV if it is still an orphan, judged again under its session's lock."""
    vg, lv = name.split("/", 1)
    info = next((i for i in lvm.ours() if (i.vg, i.name) == (vg, lv)), None)
    state_dir = lvm.state_dir_of(info) if info is not None else None
    if info is None or state_dir is None:  # gone meanwhile: nothing to do
        return
    with _session_locked(state_dir) as locked:
        recorded, intended = _listed(state_dir) if locked else ([], [])
        if not locked or not lvm.orphaned(info, recorded, intended):
            log.info("cleanup: LV %s is in use again: left alone", name)
            return
        lvm.remove(lvm.session_of(info) or "", lvm.as_volume(info))
        if intended and os.path.isdir(state_dir) and not lvm.intended_left(state_dir):
            lvm.clear_intent(state_dir)  # every LV that start made is gone


# ---------------------------------------------------------------- application cgroups

_SESSION_CGROUP = re.compile(r"^.+-[0-9a-f]{8}$")  # app.cgroup_name(): SESSION-DIGEST


def find_app_cgroups() -> list[str]:
    """The application cgroups of dead sessions that are empty now (paths)."""
    keep = _live_cgroups()
    out = []
    for path in cgroups.app_cgroup_dirs():
        name = os.path.basename(path)
        if not _SESSION_CGROUP.match(name) or name in keep or path in keep:
            continue
        if not cgroups.cgroup_populated(path):
            out.append(path)
    return out


def _live_cgroups() -> set[str]:
    """The cgroup names and paths of every live session (never removed)."""
    keep: set[str] = set()
    for d in live_state_dirs():
        try:
            data = read_json(os.path.join(d, SESSION_FILE)) or {}
        except DmrecoverError:
            data = {}
        if isinstance(data.get("name"), str):
            keep.add(cgroup_name(data["name"], d))
        cg = (data.get("app_handle") or {}).get("cgroup") or {}
        for key in ("name", "path"):
            if isinstance(cg.get(key), str):
                keep.add(cg[key])
    return keep


def live_state_dirs() -> set[str]:
    """The state dirs whose session process runs: those under the state root, and any other
    (--state-dir) whose lock file a process holds open; each checked with lock_held."""
    dirs: set[str] = set()
    root = state_root()
    try:
        dirs.update(os.path.join(root, n) for n in os.listdir(root))
    except OSError:
        pass
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if os.path.basename(target) == LOCK_FILE and target.startswith("/"):
                dirs.add(os.path.dirname(target))
    return {d for d in dirs if os.path.isfile(os.path.join(d, SESSION_FILE)) and lock_held(d)}
