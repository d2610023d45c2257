"""`live-restore`: validate everything, write the session's record, start its process."""

from __future__ import annotations

import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from dmrecover import testhooks
from dmrecover.backends import registry
from dmrecover.backends.base import Backend
from dmrecover.engine.fetcher import ON_LOST
from dmrecover.errors import DeviceError, DmrecoverError, SessionError, UsageError
from dmrecover.repository import keys
from dmrecover.repository.crypto import AeadCodec
from dmrecover.repository.manifest import Manifest
from dmrecover.repository.repo import Repository
from dmrecover.repository.s3 import is_s3_url
from dmrecover.session import boot, volume
from dmrecover.session.app import AppSpec
from dmrecover.session.record import (
    CONTROL_FILE,
    SESSION_FILE,
    STATUS_FILE,
    CutoverMode,
    SessionRecord,
    State,
    check_state_dir,
    lock_held,
    read_json,
    session_dir,
    take_state_lock,
)
from dmrecover.session.runner import OnStarted, launch
from dmrecover.session.services import ServicesFactory, default_services
from dmrecover.session.volume import (
    KEY_CACHE,
    claim_for_session,
    key_cache_path,
    release_claims,
)
from dmrecover.system import claims, files, lvm
from dmrecover.system.blockdev import check_writable_destination
from dmrecover.system.claims import Claim
from dmrecover.system.mounts import is_mountpoint
from dmrecover.units import format_size

log = logging.getLogger(__name__)

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class LiveRestoreRequest:
    """What `dmrecover live-restore` asks for."""

    repo: str
    backup: str
    dest: str
    mountpoint: str
    app: AppSpec
    session: str | None = None  # default: from the mount point's name
    state_dir: str | None = None
    backend: str = registry.AUTO
    cutover: str = CutoverMode.AUTO
    fetch_deadline: float = 600.0
    overlay: str | None = None  # a directory for the engine's files (default: the state dir),
    # or a volume group's name (dm backends): the kernel's overlay on a new LV there
    dest_vg: str | None = None  # DEST: a new LV of this volume group (dest then "")
    force: bool = False  # overwrite a DEST that holds a filesystem
    overlay_reserve: int = 64 << 20  # free room the overlay's filesystem must have at start
    on_repository_lost: str = "block"  # past fetch_deadline: reads wait ("block") or fail


def default_name(mountpoint: str) -> str:
    """The session name live-restore picks from the mount point (`/srv/db` -> `db`)."""
    base = re.sub(r"[^A-Za-z0-9._-]", "-", os.path.basename(os.path.abspath(mountpoint)))
    return base.strip("-.") or "session"


def start_live_restore(req: LiveRestoreRequest, *, foreground: bool = False,
                       on_started: OnStarted | None = None,
                       choose_backend: Callable[[str], Backend] = registry.choose,
                       services: ServicesFactory = default_services) -> SessionRecord:
    """Validate the request, create the session and run its process (detached: returns once
    the application runs; foreground: runs it here, `on_started` once the application runs).
    Nothing is changed on the system until every check has passed."""
    record, held, lock_fd = prepare(req, choose_backend=choose_backend)
    return launch(record, foreground=foreground, resume=False, on_started=on_started,
                  services=services, held=held, lock_fd=lock_fd)


def prepare(req: LiveRestoreRequest, *,
            choose_backend: Callable[[str], Backend] = registry.choose
            ) -> tuple[SessionRecord, list[Claim], int]:
    """Every check of start_live_restore, then the state dir, DEST and the record (state
    starting); the boot unit where the backend resumes at boot. Returns the record, the
    claims on DEST and the mount point, taken before the checks, and the state dir's lock,
    taken before anything is created in it: the caller hands them to the session process
    (or releases them)."""
    req.app.validate()
    cutover = _cutover_mode(req.cutover)
    backend = choose_backend(req.backend)
    if cutover == CutoverMode.ONLINE and not backend.supports_online_cutover:
        raise UsageError(f"--cutover online is not supported by the {backend.name} backend",
                         hint="use --cutover auto or manual")
    if req.on_repository_lost not in ON_LOST:
        raise UsageError(f"unknown --on-repository-lost {req.on_repository_lost!r}",
                         hint=", ".join(ON_LOST))
    if req.on_repository_lost == "error" and backend.kernel_takes_writes:
        raise UsageError(f"--on-repository-lost error is not possible with the "
                         f"{backend.name} backend: a read error on its origin would "
                         "invalidate the volume for good", hint="use block (the default)")
    if not (req.fetch_deadline > 0 and math.isfinite(req.fetch_deadline)):
        raise UsageError(f"bad fetch deadline {req.fetch_deadline!r}",
                         hint="a positive number of seconds")
    name = req.session or default_name(req.mountpoint)
    if not _NAME_RE.match(name):
        raise UsageError(f"bad session name {name!r}",
                         hint="letters, digits, '.', '_' and '-', at most 64")
    if bool(req.dest) == bool(req.dest_vg):
        raise UsageError("name DEST or --dest-vg VG (one of them)")
    vg = overlay_vg(req.overlay)
    if vg is not None and backend.overlay_file(1) is None:
        raise UsageError(f"--overlay {req.overlay}: an overlay on LVM needs the dm or dm-clone "
                         f"backend, not {backend.name}",
                         hint=f"a directory: --overlay ./{req.overlay}")
    # The claims first: every check below holds for as long as the session lives (a DEST
    # LV of --dest-vg is claimed once created).
    held = (claim_for_session(name, req.dest, req.mountpoint) if req.dest else
            [claims.claim_mountpoint(req.mountpoint, f"session {name}")]
            if os.path.isdir(req.mountpoint) else [])
    try:
        record, lock_fd = _prepare_claimed(req, name, backend, cutover, held)
        return record, held, lock_fd
    except BaseException:
        release_claims(held)
        raise


def _prepare_claimed(req: LiveRestoreRequest, name: str, backend: Backend,
                     cutover: CutoverMode, held: list[Claim]) -> tuple[SessionRecord, int]:
    # A backend's slow imports (Backend.preload; none of today's backends needs one) beside
    # the repository's opening, whose key derivation (scrypt) releases the GIL: off the RTO's
    # path. Joined before returning: the session process is forked from this one, and no
    # thread may run at a fork.
    preload = threading.Thread(target=backend.preload, name="preload", daemon=True)
    preload.start()
    try:
        return _prepare_checked(req, name, backend, cutover, held)
    finally:
        preload.join()


def _prepare_checked(req: LiveRestoreRequest, name: str, backend: Backend,
                     cutover: CutoverMode, held: list[Claim]) -> tuple[SessionRecord, int]:
    repo = Repository.open(req.repo)
    manifest = repo.manifest(req.backup)
    opened = time.time()
    if not manifest.fstype:
        raise UsageError(f"backup {manifest.id} records no filesystem type",
                         hint="live restore mounts the volume: back up a filesystem")
    over_vg = overlay_vg(req.overlay)
    dest = (os.path.abspath(req.dest) if req.dest else
            lvm.LogicalVolume(str(req.dest_vg), lvm.lv_name(name, "dest"), "dest", 0).path)
    mp = os.path.abspath(req.mountpoint)
    d = session_dir(name, req.state_dir)
    engine = os.path.abspath(req.overlay) if req.overlay and not over_vg else d
    # Nothing the session writes may be in the repository, or hold it (issue 9 item 4).
    for path, what in ((dest, "destination"), (d, "state dir"), (engine, "overlay dir"),
                       (mp, "mount point")):
        repo.check_apart(path, what)
    # The session first: a half-done one explains a DEST that already holds a filesystem.
    _check_state_dir(d)
    if req.dest:
        check_writable_destination(dest, manifest.size, force=req.force, claimed=True)
    _check_mountpoint(mp)
    if os.path.commonpath([d, mp]) == mp or os.path.commonpath([dest, mp]) == mp:
        raise UsageError("the state dir and DEST must not be under the mount point")
    engine_dir = engine
    if req.overlay and not over_vg and os.path.exists(engine_dir) \
            and not os.path.isdir(engine_dir):
        raise UsageError(f"--overlay {req.overlay}: the overlay is kept in a directory",
                         hint="name a directory")

    lv_plan = _plan_lvs(req, name, backend, manifest.size, over_vg)
    dest_claim = next((c for c in held if c.kind == "dest"), None)
    need = 0 if dest_claim is None or dest_claim.is_block \
        else max(0, manifest.size - _allocated(dest))
    if need:
        _check_room(dest, need, "destination")
    same_fs = need and _fs_of(dest) == _fs_of(engine_dir)
    _check_room(engine_dir, req.overlay_reserve + (need if same_fs else 0), "overlay dir",
                hint="free space there, name another --overlay, or lower --overlay-reserve")

    # Validated: from here on things change.
    files.private_dir(d, error=SessionError, kind="state dir")
    # The state dir's lock from here until the session process takes it over: `cleanup`
    # judges an LV of this dir only while no process holds it, so the LVs created below are
    # never taken for a dead start's before the record lists them.
    lock_fd = take_state_lock(d)
    if lock_fd is None:
        raise SessionError(f"state dir {d} is in use by a running session",
                           hint="pick another --session or --state-dir")
    try:
        created = _create_lvs(name, lv_plan, backend, d, engine_dir, manifest.size, held)
        testhooks.pause_point("lvs-created")
        try:
            record = _write_session(req, name, backend, cutover, manifest, repo, opened, d,
                                    engine_dir, dest, mp, held, created)
        except BaseException:
            _undo_lvs(name, created, d)
            raise
        lvm.clear_intent(d)  # the record lists the LVs now
    except BaseException:
        os.close(lock_fd)
        raise
    return record, lock_fd


def _write_session(req: LiveRestoreRequest, name: str, backend: Backend,
                   cutover: CutoverMode, manifest: Manifest, repo: Repository, opened: float,
                   d: str, engine_dir: str, dest: str, mp: str, held: list[Claim],
                   created: list[lvm.LogicalVolume]) -> SessionRecord:
    dest_claim = next(c for c in held if c.kind == "dest")
    if engine_dir != d:
        files.private_dir(engine_dir, error=SessionError, kind="overlay dir")
    _clear_done_session(d, engine_dir)
    if not dest_claim.is_block:
        _preallocate(dest_claim, manifest.size)
    location = req.repo if is_s3_url(req.repo) else os.path.abspath(req.repo)
    if isinstance(repo.codec, AeadCodec):
        # The session process (now, after a crash, at boot) opens the repository with this.
        keys.save_cache(key_cache_path(d), repo.codec.master, location)
    now = time.time()
    record = SessionRecord(
        state_dir=d, name=name, created=now,
        repo=location,
        backup=manifest.id, backup_name=manifest.name, size=manifest.size,
        chunk_size=manifest.chunk_size, fstype=manifest.fstype, dest=dest, mountpoint=mp,
        app=req.app, backend=backend.name, cutover_mode=cutover,
        fetch_deadline=req.fetch_deadline, on_repository_lost=req.on_repository_lost,
        engine_dir=engine_dir, lvs=[lv.to_dict() for lv in created],
        timings={"repository_opened": opened, "command_started": now})
    record.set_state(State.STARTING)
    volume.hand_over(location, repo, manifest)  # the session process opens it no more
    if backend.resume_at_boot:
        try:
            boot.enable(name)
        except DmrecoverError as err:
            log.warning("session %s will not resume at boot: %s", name, err)
    return record


def overlay_vg(overlay: str | None) -> str | None:
    """The volume group `--overlay` names, or None for a directory: a value without '/' that
    is not an existing directory is a VG (a new relative directory: ./NAME)."""
    if not overlay or "/" in overlay or os.path.isdir(overlay):
        return None
    return overlay


def _plan_lvs(req: LiveRestoreRequest, name: str, backend: Backend, size: int,
              over_vg: str | None) -> list[lvm.LogicalVolume]:
    """The LVs the session will create, checked (VG there, room, name free): nothing made."""
    wanted = []
    if req.dest_vg:
        wanted.append((req.dest_vg, "dest", size))
    if over_vg:
        spec = backend.overlay_file(size)
        assert spec is not None  # checked in prepare()
        wanted.append((over_vg, "cow" if backend.name == "dm" else "meta", spec[1]))
    return lvm.plan(name, wanted) if wanted else []


def _create_lvs(name: str, plan: list[lvm.LogicalVolume], backend: Backend, state_dir: str,
                engine_dir: str, size: int, held: list[Claim]) -> list[lvm.LogicalVolume]:
    """Create the planned LVs (tagged for the session); DEST's is claimed, the overlay's
    linked from the engine dir (where the backend looks for its file). Named first in the
    state dir's intent file (the caller holds its lock): what cleanup removes of a start
    that dies before its record. Undone on failure."""
    left = lvm.intended_left(state_dir)
    if left:
        raise DeviceError(f"state dir {state_dir} holds the LVs {', '.join(map(str, left))} "
                          "of an earlier start that did not finish",
                          hint="`dmrecover cleanup` removes them")
    if not plan:
        return []
    lvm.check_free(name, plan)  # again, under the lock: the intent names only LVs made here
    lvm.write_intent(state_dir, plan)
    created: list[lvm.LogicalVolume] = []
    try:
        for lv in plan:
            created.append(lvm.create(name, lv, state_dir=state_dir))
            if lv.role == "dest":
                held.append(claims.claim_destination(lv.path, f"session {name}",
                                                     create=False))
            else:
                spec = backend.overlay_file(size)
                assert spec is not None
                link = os.path.join(engine_dir, spec[0])
                if os.path.lexists(link):
                    os.unlink(link)
                os.symlink(lv.path, link)
                files.fsync_dir(engine_dir)
    except BaseException:
        _undo_lvs(name, created, state_dir)
        raise
    return created


def _undo_lvs(name: str, created: list[lvm.LogicalVolume], state_dir: str) -> None:
    """A failed start removes the LVs it created (and one its intent names that is there:
    created, then its header wipe failed); the intent file goes once they are all gone
    (else it stays, and `cleanup` removes the rest)."""
    try:
        made = [lv for lv in lvm.intended_left(state_dir) if lv not in created]
    except DmrecoverError as err:
        log.error("%s", err)
        made = []
    if not lvm.remove_all(name, [*created, *made]):
        lvm.clear_intent(state_dir)


def _existing(path: str) -> str:
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def _fs_of(path: str) -> int:
    return os.stat(_existing(path)).st_dev


def _allocated(path: str) -> int:
    try:
        return os.stat(path).st_blocks * 512
    except FileNotFoundError:
        return 0


def _check_room(path: str, need: int, what: str, hint: str | None = None) -> None:
    """Refuse up front when the filesystem of path has less than `need` bytes free."""
    st = os.statvfs(_existing(path))
    free = st.f_bavail * st.f_frsize
    if need > free:
        raise DeviceError(f"{what} {path} needs {format_size(need)}, {format_size(free)} free",
                          hint=hint or "free space there or pick another place")


def _preallocate(claim: Claim, size: int) -> None:
    """Allocate DEST's blocks now (fallocate: no sparse holes for the restore or a partial
    write to fill later, when the filesystem may be full)."""
    assert claim.fd is not None
    try:
        os.posix_fallocate(claim.fd, 0, size)
        os.fsync(claim.fd)
    except OSError as err:
        raise DeviceError(f"destination {claim.path}: cannot allocate {format_size(size)}: "
                          f"{err.strerror}", hint="free space there or pick another place"
                          ) from None


def _cutover_mode(text: str) -> CutoverMode:
    try:
        return CutoverMode(text)
    except ValueError:
        raise UsageError(f"unknown cutover mode {text!r}",
                         hint=", ".join(m.value for m in CutoverMode)) from None


def _check_mountpoint(mp: str) -> None:
    if not os.path.exists(mp):
        raise UsageError(f"mount point {mp} does not exist", hint="create it (mkdir -p)")
    if not os.path.isdir(mp):
        raise UsageError(f"mount point {mp} is not a directory")
    if is_mountpoint(mp):
        raise DeviceError(f"{mp} is already a mount point", hint="unmount it or pick another")
    if os.listdir(mp):
        raise UsageError(f"mount point {mp} is not empty",
                         hint="use an empty directory (its files would be hidden)")


def _check_state_dir(d: str) -> None:
    check_state_dir(d)
    data = read_json(os.path.join(d, SESSION_FILE)) if os.path.isdir(d) else None
    if lock_held(d):
        raise SessionError(f"state dir {d} is in use by a running session",
                           hint="pick another --session or --state-dir")
    if data is not None:
        other = data.get("name")
        if data.get("state") == State.DONE:  # reused only after forget (issue 13)
            hint = (f"its application runs on {data.get('dest')}: `dmrecover forget {other}` "
                    "closes it and frees the name; or pick another --session")
        elif data.get("state") == State.ABORTED:
            hint = (f"its overlay is kept there: `dmrecover resume {other}` continues it; "
                    f"`dmrecover forget {other} --discard-overlay` drops it")
        else:
            hint = (f"`dmrecover resume {other}` continues it, `dmrecover abort {other}` "
                    "stops it; or pick another --session")
        raise SessionError(f"session {other} in {d} is {data.get('state')}", hint=hint)


def _clear_done_session(d: str, engine_dir: str) -> None:
    """A finished session's dir is reused: drop its record and engine files, keep the logs."""
    data = read_json(os.path.join(d, SESSION_FILE))
    if data is None or data.get("state") != State.DONE:
        return
    for name in (SESSION_FILE, STATUS_FILE, CONTROL_FILE, KEY_CACHE, "restored.map",
                 "merged"):
        for base in (d, engine_dir):
            try:
                os.unlink(os.path.join(base, name))
            except FileNotFoundError:
                pass
