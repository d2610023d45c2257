"""What the CLI does to sessions: load, list, resume, request a cutover, abort.

Each returns a typed result and never prints: the CLI words it. A request to a live session
process goes through control.json plus SIGUSR1; the caller then waits on session.json.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

from dmrecover.backends import registry
from dmrecover.backends.base import Backend
from dmrecover.engine import overlay as overlay_files
from dmrecover.engine.pseudovolume import MERGED_MARKER, RESTORED_MAP
from dmrecover.errors import DmrecoverError, SessionError, UsageError
from dmrecover.session.app import AppSpec
from dmrecover.session.cutover import RESUMABLE_PHASES
from dmrecover.session.record import (
    ACTIVE_STATES,
    CONTROL_FILE,
    LOG_FILE,
    SESSION_FILE,
    Phase,
    SessionRecord,
    State,
    read_json,
    state_root,
    take_state_lock,
    write_json_atomic,
)
from dmrecover.session.runner import OnStarted, launch
from dmrecover.session.services import Services, ServicesFactory, default_services
from dmrecover.system import files, forked, lvm, mounts

log = logging.getLogger(__name__)

GetBackend = Callable[[str], Backend]
CUTOVER_WAIT = 7 * 24 * 3600.0
ABORT_WAIT = 300.0
OVERLAY_FILE = "overlay.img"


@dataclass(frozen=True)
class CutoverResult:
    record: SessionRecord
    queued: bool  # the session is still restoring: the cutover runs when the restore ends
    downtime: float | None  # seconds the application was down (None: not cut over yet)
    already_done: bool = False


@dataclass(frozen=True)
class AbortResult:
    record: SessionRecord
    already: bool  # it was aborted before this call
    overlay_dir: str  # where the overlay (the application's writes) is kept
    overlay_bytes: int  # its allocated size


def load_session(name: str | None, state_dir: str | None = None) -> SessionRecord:
    """The record of session `name` (or of the one in state_dir); SessionError if none."""
    return SessionRecord.load(name, state_dir)


def list_sessions() -> list[SessionRecord]:
    """Every session under the state root (those with a custom --state-dir are not listed)."""
    root = state_root()
    try:
        names = sorted(os.listdir(root))
    except FileNotFoundError:
        return []
    out = []
    for n in names:
        d = os.path.join(root, n)
        try:
            data = read_json(os.path.join(d, SESSION_FILE))
            if data is not None:
                out.append(SessionRecord.from_dict(data, d))
        except (SessionError, NotADirectoryError, PermissionError, TypeError) as err:
            log.debug("skipping %s: %s", d, err)
    return out


def teardown_dead(record: SessionRecord, services: Services, *, stop_app: bool = True
                  ) -> list[str]:
    """Stop the application a dead session process left, and remove its stack (found by
    looking at the system, not by trusting the record). Returns what was done."""
    if services.backend.dead_source_waits(record.context()):
        # The source is served again first, by a FUSE server's threads: in a child process,
        # as the session process this one may fork next must not inherit their remains.
        done = _isolated(lambda: _teardown(record, services, stop_app, serve=True),
                         what=f"the teardown of session {record.name}")
    else:
        done = _teardown(record, services, stop_app, serve=False)
    for item in done:
        log.info("teardown: %s", item)
    return done


# How the teardown that serves a source runs: in a forked child (unit tests: here).
_isolated = forked.call


def _teardown(record: SessionRecord, services: Services, stop_app: bool, *, serve: bool
              ) -> list[str]:
    done: list[str] = []
    stop_serving = _serve_dead_source(record, services) if serve else None
    try:
        if stop_serving is not None:
            done.append("served the dead session's source again (its queued I/O completes)")
        if stop_app and services.app.processes():
            done += services.app.stop()
            done.append("stopped the application")
        done += services.backend.teardown_dead(record.context())
    finally:
        if stop_serving is not None:
            stop_serving()
    return done


def _serve_dead_source(record: SessionRecord, services: Services) -> Callable[[], None]:
    """Where the dead process's kernel side waits for its source (dm-clone: the hydration an
    application write needs queues, see backends/dm/waitpath.py), serve the volume again
    before anything is stopped or unmounted: what waits completes, no acknowledged write is
    failed. SessionError, nothing changed, when the backup cannot be opened."""
    ctx = record.context()
    try:
        volume = services.open_volume(record, services.backend, None)
    except DmrecoverError as err:
        raise SessionError(f"session {record.name}: I/O of its volume waits for the backup, "
                           f"which cannot be opened: {err}",
                           hint="make the repository reachable and run this again; "
                                "`dmrecover cleanup` fails that I/O instead") from err
    try:
        stop = services.backend.serve_dead_source(volume, ctx)
    except BaseException:
        volume.close()
        raise

    def stop_serving() -> None:
        try:
            stop()
        finally:
            volume.close()
    return stop_serving


def corrected_app(current: AppSpec, given: AppSpec | None) -> AppSpec | None:
    """The application spec `resume --app-start/--app-stop/--app-unit` asks for (None: no
    change): --app-unit replaces the commands, --app-start replaces the unit or the start
    command (and the stop command unless given), --app-stop alone replaces the stop command.
    UsageError when the result is incomplete or ambiguous, as for live-restore."""
    if given is None or not (given.start or given.stop or given.unit):
        return None
    if given.unit:
        new = AppSpec(unit=given.unit, stop=given.stop, stop_timeout=current.stop_timeout)
    elif given.start:
        new = AppSpec(start=given.start, stop=given.stop, stop_timeout=current.stop_timeout)
    else:
        if current.unit:
            raise UsageError("--app-stop alone cannot change a session run by --app-unit",
                             hint="give --app-start CMD --app-stop CMD, or --app-unit UNIT")
        new = AppSpec(start=current.start, stop=given.stop, stop_timeout=current.stop_timeout)
    new.validate()
    return new


def resume_session(name: str, *, state_dir: str | None = None, foreground: bool = False,
                   on_started: OnStarted | None = None,
                   services: ServicesFactory = default_services,
                   app: AppSpec | None = None) -> SessionRecord:
    """Tear down what a dead session left, then run it again (as `launch`). A session that
    is done is returned as it is (nothing to resume). `app` corrects how the application
    is started and stopped (see corrected_app): validated before anything changes, recorded
    after the old application is stopped, then used."""
    record = SessionRecord.load(name, state_dir)
    # The state lock first, held from here into the session process it starts: a second
    # `resume` at the same moment is refused instead of tearing down what this one builds.
    lock_fd = take_state_lock(record.state_dir)
    if lock_fd is None:
        raise SessionError(f"session {record.name} is running (or another resume is "
                           "starting it)", hint="nothing to resume: `dmrecover status` shows it")
    try:
        record = record.reload()  # as the previous holder of the lock left it
        new_app = corrected_app(record.app, app)
        if record.state == State.DONE:
            if new_app is not None:
                raise SessionError(f"session {record.name} is done: its application runs "
                                   f"on {record.dest}; there is nothing to resume")
            os.close(lock_fd)
            return record
        _prepare_resume(record, new_app, services)
    except BaseException:
        os.close(lock_fd)
        raise
    # launch() owns the lock from here: it hands it to the session process (or, in the
    # foreground, the session run here releases it when it ends).
    return launch(record, foreground=foreground, resume=True, on_started=on_started,
                  services=services, lock_fd=lock_fd)


def _prepare_resume(record: SessionRecord, new_app: AppSpec | None,
                    services: ServicesFactory) -> None:
    """resume_session's work under the state lock: stop and tear down what the dead process
    left, take the corrected application, set the state the session continues from."""
    # In the last phase the application already runs on DEST: leave it alone.
    last_phase = record.state == State.CUTTING_OVER and record.phase == Phase.DISCARD
    if new_app is not None and last_phase:
        raise SessionError(f"session {record.name} has restarted its application on "
                           f"{record.dest} already; its command cannot change now")
    teardown_dead(record, services(record), stop_app=not last_phase)
    if new_app is not None:  # the old application is stopped (by its old spec): switch
        log.info("session %s: application changed from %s to %s", record.name,
                 record.app.to_dict(), new_app.to_dict())
        record.save(app=new_app, app_handle=None)
    if record.state in (State.FAILED, State.ABORTED):
        failed_in = record.failed_in if record.state == State.FAILED else None
        if failed_in == State.CUTTING_OVER and record.phase in RESUMABLE_PHASES:
            record.set_state(State.CUTTING_OVER, error=None)
        else:
            record.set_state(State.STARTING, phase=None, error=None)
    try:
        os.unlink(record.file(CONTROL_FILE))  # a request the dead process never saw is void
    except FileNotFoundError:
        pass
    record.save(app_started=False, resumed=time.time())


def send_request(record: SessionRecord, request: str, **extra: object) -> str:
    """Hand a request to the live session process; returns its id."""
    rid = f"{os.getpid()}-{time.time():.6f}"
    write_json_atomic(record.file(CONTROL_FILE), {"request": request, "id": rid,
                                                  "time": time.time(), **extra})
    if record.pid:
        try:
            os.kill(record.pid, signal.SIGUSR1)
        except ProcessLookupError:
            pass
    return rid


def wait_state(record: SessionRecord, states: tuple[State, ...], timeout: float,
               request_id: str | None = None, poll: float = 0.1,
               give_up: Callable[[SessionRecord], str | None] | None = None
               ) -> SessionRecord:
    """Wait until the session reaches one of states; SessionError when the request is refused,
    the process ends elsewhere, `give_up` names a reason, or the time is up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        current = record.reload()
        if current.state in states:
            return current
        reason = give_up(current) if give_up is not None else None
        if reason:
            raise SessionError(reason)
        res = current.request_result or {}
        if request_id and res.get("id") == request_id and not res.get("ok"):
            raise SessionError(res.get("error") or "request refused")
        if not record.alive():
            current = record.reload()  # the process ended: one last read
            if current.state in states:
                return current
            raise SessionError(f"session {record.name} stopped in state {current.state}: "
                               f"{current.error or 'see ' + record.file(LOG_FILE)}")
        time.sleep(poll)
    raise SessionError(f"session {record.name} did not reach {'/'.join(states)} within "
                       f"{timeout:g}s", hint=f"see {record.file(LOG_FILE)}")


def request_cutover(name: str, *, state_dir: str | None = None, online: bool = False,
                    wait: bool = True, get_backend: GetBackend = registry.get,
                    timeout: float = CUTOVER_WAIT) -> CutoverResult:
    """Ask the session to cut over (now if ready, else when restored); with wait, until it
    is done (SessionError when it fails or is refused)."""
    record = SessionRecord.load(name, state_dir)
    if online and not get_backend(record.backend).supports_online_cutover:
        raise UsageError(f"--online is not supported by the {record.backend} backend",
                         hint="run it without --online")
    if record.state == State.DONE:
        return CutoverResult(record, queued=False, downtime=_downtime(record),
                             already_done=True)
    if not record.alive():
        raise SessionError(f"session {record.name} is not running ({record.state})",
                           hint=f"dmrecover resume {record.name}")
    if record.state not in (State.RESTORING, State.READY):
        raise SessionError(f"session {record.name} is {record.state}; cannot cut over now")
    blocked = restore_blocked(record)
    if blocked:
        raise SessionError(f"cutover of {record.name} refused: the restore cannot complete: "
                           f"{blocked}", hint=f"the application keeps running on the "
                           f"pseudo-volume; `dmrecover abort {record.name}` stops it")
    rid = send_request(record, "cutover", online=online)
    queued = record.state == State.RESTORING
    if not wait:
        return CutoverResult(record, queued=queued, downtime=None)
    def cannot_complete(current: SessionRecord) -> str | None:
        blocked = restore_blocked(current) if current.state == State.RESTORING else None
        return blocked and (f"cutover of {record.name} refused: the restore cannot "
                            f"complete: {blocked}")

    final = wait_state(record, (State.DONE, State.FAILED), timeout=timeout, request_id=rid,
                       give_up=cannot_complete)
    if final.state != State.DONE:
        raise SessionError(f"cutover of {record.name} failed: {final.error}")
    return CutoverResult(final, queued=queued, downtime=_downtime(final))


def abort_session(name: str, *, state_dir: str | None = None,
                  services: ServicesFactory = default_services,
                  timeout: float = ABORT_WAIT, force: bool = False) -> AbortResult:
    """Stop the application, tear the stack down, keep the overlay (resume continues).
    Refused (SessionError naming them) while other processes hold the mount, unless force:
    then they are named in the record's warnings and the mount is unmounted lazily under
    them (see SessionRunner.abort)."""
    record = SessionRecord.load(name, state_dir)
    if record.state == State.DONE:
        raise SessionError(f"session {record.name} is done; nothing to abort")
    already = record.state == State.ABORTED
    if record.state == State.CUTTING_OVER:
        raise SessionError(f"session {record.name} is cutting over; it cannot be aborted now",
                           hint=f"wait for it, or if its process died: dmrecover resume "
                                f"{record.name}")
    if already:
        pass
    elif record.alive():
        rid = send_request(record, "abort", force=force)
        record = wait_state(record, (State.ABORTED,), timeout=timeout, request_id=rid)
    else:
        teardown_dead(record, services(record))
        record.set_state(State.ABORTED, pid=None, error=None)
    eng = record.engine_path
    return AbortResult(record, already=already, overlay_dir=eng,
                       overlay_bytes=_allocated(os.path.join(eng, OVERLAY_FILE)))


def restore_blocked(record: SessionRecord) -> str | None:
    """Why the background restore cannot complete (it stopped on an error, e.g. a corrupt
    chunk), from the session's last status; None while it can."""
    stats = (record.status() or {}).get("stats") or {}
    error = stats.get("restorer_error")
    if error and not stats.get("restorer_running"):
        return str(error)
    return None


def _downtime(record: SessionRecord) -> float | None:
    value = record.timings.get("cutover_downtime")
    return float(value) if isinstance(value, (int, float)) else None


def _allocated(path: str) -> int:
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return 0


@dataclass(frozen=True)
class ForgetResult:
    record: SessionRecord
    removed: list[str]  # the paths removed
    left: list[str]  # what stays, in sentences (the application on DEST, an incomplete DEST)


def forget_session(name: str, *, state_dir: str | None = None, discard_overlay: bool = False,
                   services: ServicesFactory = default_services) -> ForgetResult:
    """Close a finished (done, failed or aborted) session for good: remove its state dir
    and engine files, so its name can be used again. Refused while it runs or can still be
    resumed, and - unless discard_overlay - while its overlay holds application writes that
    are not on DEST (an aborted or failed session: resume would continue from them)."""
    record = SessionRecord.load(name, state_dir)
    n = record.name
    if record.alive():
        raise SessionError(f"session {n} is running ({record.state})",
                           hint=f"`dmrecover cutover {n}` finishes it, `dmrecover abort {n}` "
                                "stops it; then forget it")
    if record.state in ACTIVE_STATES:
        raise SessionError(f"session {n} is {record.state} and its process is not running",
                           hint=f"`dmrecover resume {n}` continues it, `dmrecover abort {n}` "
                                "stops it; then forget it")
    eng = record.engine_path
    overlay_img = os.path.join(eng, overlay_files.IMG)
    held = _allocated(overlay_img)
    if record.state != State.DONE and held and not discard_overlay:
        raise SessionError(f"session {n} is {record.state}: its overlay {overlay_img} holds "
                           f"the application's writes ({held} bytes allocated), which are not "
                           f"on {record.dest}",
                           hint=f"`dmrecover resume {n}` continues with them; to drop them: "
                                f"dmrecover forget {n} --discard-overlay")
    # LVs the session created: DEST's stays once done (the application runs on it).
    lvs = [lvm.LogicalVolume.from_dict(d) for d in record.lvs
           if record.state != State.DONE or d.get("role") != "dest"]
    if record.state != State.DONE and lvs and not discard_overlay:
        raise SessionError(f"session {n} is {record.state}: it created the LVs "
                           f"{', '.join(map(str, lvs))}, which hold its restore and the "
                           "application's writes",
                           hint=f"`dmrecover resume {n}` continues with them; to remove them: "
                                f"dmrecover forget {n} --discard-overlay")
    left: list[str] = []
    if record.state == State.DONE:
        stop = (f"systemctl stop {record.app.unit}" if record.app.unit
                else record.app.stop or "its own tools")
        left.append(f"the application keeps running on {record.dest} at {record.mountpoint}; "
                    f"dmrecover no longer tracks it (stop it with: {stop})")
    else:
        # nothing of the stack may stay behind the files removed below
        teardown_dead(record, services(record), stop_app=False)
        left.append(f"{record.dest} holds an incomplete restore: restore to it again (or "
                    "use it for something else)")
        if held:
            left.append(f"the application's writes in the overlay ({held} bytes) are "
                        "discarded")
    _check_nothing_mounted(record.state_dir, eng)
    removed: list[str] = []
    problems = lvm.remove_all(n, lvs)
    left += problems
    removed += [f"LV {lv}" for lv in lvs if not any(str(lv) in p for p in problems)]
    if eng != record.state_dir and os.path.isdir(eng):
        for f in (overlay_files.IMG, overlay_files.MAP, overlay_files.LOG, RESTORED_MAP,
                  MERGED_MARKER):
            path = os.path.join(eng, f)
            if os.path.lexists(path):
                os.unlink(path)
                removed.append(path)
        try:
            os.rmdir(eng)  # only when nothing else is in it
            removed.append(eng)
        except OSError:
            left.append(f"{eng} is kept: it holds other files")
    _remove_dir(record.state_dir)
    removed.append(record.state_dir)
    log.info("session %s forgotten: removed %s", n, ", ".join(removed))
    return ForgetResult(record, removed=removed, left=left)


def _check_nothing_mounted(*dirs: str) -> None:
    """rmtree must never walk into a mount (e.g. the FUSE mount of a session not torn down)."""
    for d in dirs:
        inside = [m.target for m in mounts.mounts() if os.path.commonpath([m.target, d]) == d]
        if inside:
            raise SessionError(f"{inside[0]} is still mounted inside {d}",
                               hint="dmrecover cleanup removes what a dead session left; then "
                                    "forget again")


def _remove_dir(path: str) -> None:
    """Remove a state dir (files and subdirectories), durably: its parent is synced."""
    shutil.rmtree(path)
    files.fsync_dir(os.path.dirname(path))
