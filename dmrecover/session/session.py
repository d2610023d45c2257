"""A live-restore session: its state dir, its persisted record, and the session process.

State dir (default /var/lib/dmrecover/<session>/, or --state-dir; the root can be moved with
DMRECOVER_STATE_ROOT, which the tests use):

    session.json   the persisted record (config, state, cutover phase, pids, devices), written
                   atomically; every state change is written before it takes effect
    status.json    rewritten every ~0.5 s by the session process (engine stats, app state)
    control.json   a request (cutover, abort) from the CLI; the CLI then sends SIGUSR1
    lock           flock()ed by the live session process: "in use" means this lock is held
    session.log    the session process's log;  app.log: the application's output
    fuse/          the FUSE mount (portable backend)
    overlay.*, restored.map, merged    the engine's files (PseudoVolume), unless --overlay DIR

States: starting -> restoring -> [ready ->] cutting-over -> done; failed; aborted.
Cutover phases (persisted): stop-app, unmount, merge, mount-dest, start-app, discard. A crash
before "merge" resumes as a restore (the application comes back on the pseudo-volume and the
cutover runs again); from "merge" on, resume continues the cutover (the merge is idempotent).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import psutil

from dmrecover.errors import (
    DeviceError,
    DmrecoverError,
    SessionError,
    StackError,
    UsageError,
)
from dmrecover.session.app import AppHandle, Application, AppSpec

log = logging.getLogger(__name__)

STATE_ROOT_ENV = "DMRECOVER_STATE_ROOT"
DEFAULT_STATE_ROOT = "/var/lib/dmrecover"
# Test-only knob: seconds the background restorer sleeps per chunk it fetches, so that the
# application really runs during the restore in small test volumes.
THROTTLE_ENV = "DMRECOVER_TEST_RESTORE_DELAY"

SESSION_FILE = "session.json"
STATUS_FILE = "status.json"
CONTROL_FILE = "control.json"
LOCK_FILE = "lock"
LOG_FILE = "session.log"
APP_LOG = "app.log"

ACTIVE_STATES = ("starting", "restoring", "ready", "cutting-over")
CUTOVER_PHASES = ("stop-app", "unmount", "merge", "mount-dest", "start-app", "discard")
STATUS_INTERVAL = 0.5
START_TIMEOUT = 300.0

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


# ---------------------------------------------------------------- files


def state_root() -> str:
    return os.environ.get(STATE_ROOT_ENV, DEFAULT_STATE_ROOT)


def session_dir(name: str, state_dir: str | None = None) -> str:
    """The state dir of session `name` (--state-dir wins)."""
    return os.path.abspath(state_dir) if state_dir else os.path.join(state_root(), name)


def write_json_atomic(path: str | os.PathLike[str], data: dict, *, durable: bool = True) -> None:
    """Write JSON to path atomically (temp, [fsync], rename, [fsync dir])."""
    path = str(path)
    tmp = f"{path}.tmp.{os.getpid()}.{threading.get_ident()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, json.dumps(data, indent=1, sort_keys=True).encode() + b"\n")
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    if durable:
        dfd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def read_json(path: str | os.PathLike[str]) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (ValueError, OSError) as err:
        raise SessionError(f"{path} is unreadable: {err}") from err


def lock_held(state_dir: str) -> bool:
    """True when a live session process holds the state dir's lock."""
    path = os.path.join(state_dir, LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing releases a lock we just took
    return False


@dataclass
class Session:
    """The persisted record of a session (session.json)."""

    state_dir: str
    data: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.data["name"]

    @property
    def state(self) -> str:
        return self.data["state"]

    @property
    def path(self) -> str:
        return os.path.join(self.state_dir, SESSION_FILE)

    @property
    def engine_dir(self) -> str:
        return self.data.get("engine_dir") or self.state_dir

    def file(self, name: str) -> str:
        return os.path.join(self.state_dir, name)

    @classmethod
    def load(cls, name: str | None, state_dir: str | None = None) -> Session:
        """Load session `name` (or the one in state_dir); SessionError when there is none."""
        if not name and not state_dir:
            raise UsageError("name a session (or --state-dir)")
        d = session_dir(name or "", state_dir)
        data = read_json(os.path.join(d, SESSION_FILE))
        if data is None:
            raise SessionError(f"no session {name or ''} in {d}".replace("  ", " "),
                               hint="`dmrecover status` lists the sessions")
        if name and data.get("name") != name:
            raise SessionError(f"{d} holds session {data.get('name')}, not {name}")
        return cls(d, data)

    def save(self, **changes: object) -> None:
        """Apply changes and persist them durably (before they take effect)."""
        self.data.update(changes)
        self.data["updated"] = time.time()
        write_json_atomic(self.path, self.data)

    def set_state(self, state: str, **changes: object) -> None:
        hist = self.data.setdefault("history", [])
        hist.append({"state": state, "phase": changes.get("cutover_phase"), "time": time.time()})
        del hist[:-50]
        log.info("session %s: state %s%s", self.data.get("name"), state,
                 f" ({changes['cutover_phase']})" if changes.get("cutover_phase") else "")
        self.save(state=state, **changes)

    def alive(self) -> bool:
        """True when the session process runs (it holds the lock)."""
        return lock_held(self.state_dir)

    def status(self) -> dict | None:
        try:
            return read_json(self.file(STATUS_FILE))
        except SessionError:
            return None  # being replaced right now: callers poll again

    def application(self) -> Application:
        return Application(AppSpec.from_dict(self.data["app"]),
                           mountpoint=self.data["mountpoint"], log_path=self.file(APP_LOG),
                           handle=AppHandle.from_dict(self.data.get("app_handle")))


# ---------------------------------------------------------------- backend choice


def choose_backend(requested: str) -> str:
    """auto -> dm where device-mapper with the snapshot target is usable, else fuse.

    dm when asked for is probed: a clear error names what is missing (root, dmsetup, the
    device-mapper driver or its snapshot target).
    """
    from dmrecover.backends.dm import dmsetup as dm

    if requested == "dm":
        dm.probe(("snapshot",))
        return "dm"
    if requested == "auto" and dm.available("snapshot"):
        return "dm"
    return "fuse"


# ---------------------------------------------------------------- live-restore (CLI side)


def _default_name(mountpoint: str) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]", "-", os.path.basename(os.path.abspath(mountpoint)))
    return base.strip("-.") or "session"


def _check_mountpoint(mp: str) -> None:
    from dmrecover.system.mounts import is_mountpoint

    if not os.path.exists(mp):
        raise UsageError(f"mount point {mp} does not exist", hint="create it (mkdir -p)")
    if not os.path.isdir(mp):
        raise UsageError(f"mount point {mp} is not a directory")
    if is_mountpoint(mp):
        raise DeviceError(f"{mp} is already a mount point", hint="unmount it or pick another")
    if os.listdir(mp):
        raise UsageError(f"mount point {mp} is not empty",
                         hint="use an empty directory (its files would be hidden)")


def _check_state_dir(d: str, name: str) -> None:
    data = read_json(os.path.join(d, SESSION_FILE)) if os.path.isdir(d) else None
    if lock_held(d):
        raise SessionError(f"state dir {d} is in use by a running session",
                           hint="pick another --session or --state-dir")
    if data is not None and data.get("state") != "done":
        other = data.get("name")
        if data.get("state") == "aborted":
            hint = (f"its overlay is kept there: `dmrecover resume {other}` continues it; "
                    f"remove {d} to start over")
        else:
            hint = (f"`dmrecover resume {other}` continues it, `dmrecover abort {other}` "
                    "stops it; or pick another --session")
        raise SessionError(f"session {other} in {d} is {data.get('state')}", hint=hint)


def start_live_restore(args) -> int:
    """`dmrecover live-restore`: validate everything, then start the session process."""
    from dmrecover.repository.repo import Repository
    from dmrecover.system.blockdev import check_writable_destination

    spec = AppSpec(start=args.app_start, stop=args.app_stop, unit=args.app_unit)
    spec.validate()
    backend = choose_backend(args.backend)
    if args.cutover == "online" and backend != "dm":
        raise UsageError("--cutover online needs the dm backend",
                         hint="use --cutover auto or manual")
    name = args.session or _default_name(args.mount)
    if not _NAME_RE.match(name):
        raise UsageError(f"bad session name {name!r}",
                         hint="letters, digits, '.', '_' and '-', at most 64")
    repo = Repository.open(args.repo)
    manifest = repo.manifest(args.backup)
    if not manifest.fstype:
        raise UsageError(f"backup {manifest.id} records no filesystem type",
                         hint="live restore mounts the volume: back up a filesystem")
    dest = os.path.abspath(args.dest)
    mp = os.path.abspath(args.mount)
    d = session_dir(name, args.state_dir)
    # The session first: a half-done one explains a DEST that already holds a filesystem.
    _check_state_dir(d, name)
    check_writable_destination(dest, manifest.size, force=args.force)
    _check_mountpoint(mp)
    if os.path.commonpath([d, mp]) == mp or os.path.commonpath([dest, mp]) == mp:
        raise UsageError("the state dir and DEST must not be under the mount point")
    engine_dir = os.path.abspath(args.overlay) if args.overlay else d
    if args.overlay and os.path.exists(engine_dir) and not os.path.isdir(engine_dir):
        raise UsageError(f"--overlay {args.overlay}: the fuse backend keeps its overlay in a "
                         "directory", hint="name a directory")

    # Validated: from here on things change.
    os.makedirs(d, exist_ok=True)
    _clear_done_session(d, engine_dir)
    if not os.path.exists(dest) or stat.S_ISREG(os.stat(dest).st_mode):
        with open(dest, "ab") as f:
            if os.fstat(f.fileno()).st_size < manifest.size:
                os.truncate(dest, manifest.size)
            os.fsync(f.fileno())
    sess = Session(d, {
        "format": "dmrecover-session", "version": 1,
        "name": name, "created": time.time(),
        "repo": os.path.abspath(args.repo), "backup": manifest.id,
        "backup_name": manifest.name, "size": manifest.size, "chunk_size": manifest.chunk_size,
        "fstype": manifest.fstype, "dest": dest, "mountpoint": mp,
        "app": spec.to_dict(), "backend": backend, "cutover": args.cutover,
        "fetch_deadline": args.fetch_deadline, "engine_dir": engine_dir,
        "state": "starting", "cutover_phase": None, "cutover_requested": False,
        "pid": None, "app_handle": None, "devices": {}, "dest_loop": None, "error": None,
        "timings": {"command_started": time.time()},
    })
    sess.set_state("starting")
    if backend == "dm":
        # Where systemd runs, a unit resumes the session at boot (dmrecover.session.boot).
        from dmrecover.session.boot import enable as enable_boot_unit

        try:
            enable_boot_unit(name)
        except DmrecoverError as err:
            log.warning("session %s will not resume at boot: %s", name, err)
    return _launch(sess, foreground=args.foreground, resume=False)


def _clear_done_session(d: str, engine_dir: str) -> None:
    """A finished session's dir is reused: drop its record and engine files, keep the logs."""
    data = read_json(os.path.join(d, SESSION_FILE))
    if data is None or data.get("state") != "done":
        return
    for name in (SESSION_FILE, STATUS_FILE, CONTROL_FILE, "restored.map", "merged"):
        for base in (d, engine_dir):
            try:
                os.unlink(os.path.join(base, name))
            except FileNotFoundError:
                pass


def _launch(sess: Session, *, foreground: bool, resume: bool) -> int:
    """Run the session process (detached, or here with foreground); report once the app runs."""
    if foreground:
        def started(s: Session) -> None:
            _print_started(s)

        return run_session(sess.name, state_dir=sess.state_dir, resume=resume,
                           on_started=started)
    argv = [sys.executable, "-m", "dmrecover", "session-run", sess.name,
            "--state-dir", sess.state_dir] + (["--resume"] if resume else [])
    logf = open(sess.file(LOG_FILE), "ab")  # noqa: SIM115 - handed to the child
    try:
        proc = psutil.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                            cwd="/", start_new_session=True, close_fds=True)
    finally:
        logf.close()
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        data = read_json(sess.path) or {}
        state = data.get("state")
        if data.get("app_started") and state in ("restoring", "ready", "cutting-over", "done"):
            sess.data = data
            _print_started(sess)
            return 0
        if state == "failed":
            raise SessionError(f"session {sess.name} failed: {data.get('error')}",
                               hint=f"see {sess.file(LOG_FILE)}")
        rc = proc.poll()
        if rc is not None:
            data = read_json(sess.path) or {}
            if data.get("app_started"):
                sess.data = data
                _print_started(sess)
                return 0
            err = data.get("error") or f"the session process exited with code {rc}"
            raise SessionError(f"session {sess.name} failed: {err}",
                               hint=f"see {sess.file(LOG_FILE)}")
        if time.monotonic() > deadline:
            raise SessionError(f"session {sess.name} did not start its application within "
                               f"{START_TIMEOUT:g}s", hint=f"see {sess.file(LOG_FILE)}")
        time.sleep(0.02)


def _print_started(sess: Session) -> None:
    d = sess.data
    extra = f" --state-dir {sess.state_dir}" if sess.state_dir != session_dir(sess.name) else ""
    print(f"session {sess.name}: the application runs on {d['mountpoint']} while "
          f"{d['backup_name'] or d['backup']} is restored to {d['dest']}")
    print(f"watch it:  dmrecover status {sess.name}{extra} --watch")
    sys.stdout.flush()


# ---------------------------------------------------------------- the session process


class _ThrottledSource:
    """Test knob (DMRECOVER_TEST_RESTORE_DELAY): slows the background restorer's fetches only."""

    def __init__(self, inner: object, delay: float) -> None:
        self._inner = inner
        self._delay = delay

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)

    def read_chunk(self, index: int) -> bytes:
        if threading.current_thread().name == "dmrecover-restorer":
            time.sleep(self._delay)
        return self._inner.read_chunk(index)  # type: ignore[attr-defined]


def _open_volume(sess: Session, on_restored=None):
    from dmrecover.engine.pseudovolume import PseudoVolume
    from dmrecover.repository.repo import Repository
    from dmrecover.repository.source import RepositorySource

    d = sess.data
    repo = Repository.open(d["repo"])
    manifest = repo.manifest(d["backup"])
    source: object = RepositorySource(repo, manifest)
    delay = float(os.environ.get(THROTTLE_ENV) or 0)
    if delay > 0:
        source = _ThrottledSource(source, delay)
    volume = PseudoVolume(source, d["dest"], sess.engine_dir,  # type: ignore[arg-type]
                          fetch_deadline=float(d.get("fetch_deadline") or 600.0),
                          read_only=d.get("backend") == "dm", on_restored=on_restored)
    return volume


class SessionRunner:
    """The session process: presents the pseudo-volume, runs the app, restores, cuts over."""

    def __init__(self, sess: Session, on_started=None) -> None:
        self.sess = sess
        self.on_started = on_started
        self.volume = None
        self.stack = None
        self.app = sess.application()
        self.wake = threading.Event()
        self.stop_requested = False
        self.rates: deque[tuple[float, int]] = deque(maxlen=40)
        self._app_state = "stopped"
        self._app_state_at = 0.0
        self._status_error: str | None = None
        self.cutover_request_id: str | None = None
        self.restored_at: float | None = None
        self.auto_blocked = False

    # ---------------------------------------------------------- main

    def run(self) -> int:
        s = self.sess
        state = s.state
        if state == "done":
            log.info("session %s is done; nothing to do", s.name)
            return 0
        phase = s.data.get("cutover_phase")
        try:
            self.volume = _open_volume(s, on_restored=self._on_restored)
            if state == "cutting-over" and phase in CUTOVER_PHASES[2:]:
                self.cutover(resume_phase=phase)
                return 0
            self.bring_up()
            return self.loop()
        except DmrecoverError as err:
            self.fail(str(err))
            return 1
        except Exception as err:
            log.exception("session failed")
            self.fail(f"{type(err).__name__}: {err}")
            return 1
        finally:
            self.write_status()
            if self.volume is not None and self.sess.state in ("done", "aborted", "failed"):
                try:
                    self.volume.close()
                except Exception as err:  # closing must not hide the session's outcome
                    log.error("closing the pseudo-volume: %s", err)

    def _on_restored(self) -> None:
        """Called by the restorer thread once every chunk is restored and synced."""
        self.restored_at = time.time()
        self.wake.set()

    def fail(self, message: str) -> None:
        """Persist failed (with the state it failed in); tear down what this process built."""
        log.error("session %s failed: %s", self.sess.name, message)
        if self.stack is not None and self.sess.state != "cutting-over":
            try:
                self.app.stop()
            except DmrecoverError as err:
                log.error("stopping the application: %s", err)
            for e in self.stack.undo.unwind():
                log.error("%s", e)
            self.stack = None
        self.sess.set_state("failed", error=message, failed_in=self.sess.state,
                            pid=None)

    def bring_up(self) -> None:
        """Stack (FUSE, loop, mount), application, background restore: undone on failure."""
        from dmrecover.backends.fuse.stack import FuseStack, fault_point

        s = self.sess
        if s.state != "starting":
            s.set_state("starting", cutover_phase=None, error=None)
        if s.data.get("backend") == "dm":
            from dmrecover.backends.dm.stack import DmStack

            self.stack = DmStack(self.volume, s.engine_dir, s.data["mountpoint"],
                                 s.data["fstype"], session=s.name,
                                 on_change=lambda devs: s.save(devices=devs))
        else:
            self.stack = FuseStack(self.volume, s.state_dir, s.data["mountpoint"],
                                   s.data["fstype"], on_change=lambda devs: s.save(devices=devs))
        self.stack.build()
        try:
            fault_point("app")
            handle = self.app.start()
        except BaseException:
            for e in self.stack.undo.unwind():
                log.error("%s", e)
            self.stack = None
            raise
        timings = dict(s.data.get("timings") or {})
        timings["app_started"] = time.time()
        s.set_state("restoring", app_handle=handle.to_dict(), app_started=True,
                    timings=timings)
        self.volume.start_restore()
        if self.on_started is not None:
            self.on_started(s)

    def loop(self) -> int:
        """Status every STATUS_INTERVAL; requests; the cutover once everything is restored."""
        s = self.sess
        while True:
            self.write_status()
            req = self.take_request()
            if self.stop_requested:
                return self.suspend()
            if req.get("request") == "abort":
                if self.abort(req.get("id")):
                    return 0
            elif req.get("request") == "cutover":
                self.cutover_request_id = req.get("id")
                self.auto_blocked = False
                s.save(cutover_requested=True,
                       **({"cutover": "online"} if req.get("online") else {}))
            v = self.volume
            rs = v.restorer.stats() if v.restorer is not None else {}
            if rs.get("error") and s.state == "restoring":
                # The restore cannot complete (corrupt chunk, repository gone past the
                # deadline). The application keeps its pseudo-volume; the operator decides.
                s.save(error=rs["error"])
            if v.restored_all() and (v.restorer is None or not v.restorer.running):
                timings = s.data.setdefault("timings", {})
                if "restored" not in timings:
                    timings["restored"] = self.restored_at or time.time()
                if s.data.get("backend") == "dm" and s.data["cutover"] == "online":
                    if self.cutover_online():
                        return 0
                elif ((s.data["cutover"] in ("auto", "online") and not self.auto_blocked)
                        or s.data.get("cutover_requested")):
                    if self.cutover():
                        return 0
                    self.auto_blocked = True  # refused: wait for `dmrecover cutover`
                elif s.state == "restoring":
                    v.flush()
                    s.set_state("ready")
            self.wake.wait(STATUS_INTERVAL)
            self.wake.clear()

    # ---------------------------------------------------------- requests

    def take_request(self) -> dict:
        """The pending control request ({} when none), consumed."""
        path = self.sess.file(CONTROL_FILE)
        try:
            req = read_json(path)
        except SessionError:
            req = None
        if req is None:
            return {}
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        log.info("request: %s", req)
        return req

    def refuse(self, request_id: str | None, message: str, **changes: object) -> None:
        """Record a refused request (the CLI that sent it waits for its id)."""
        log.error("%s", message)
        self.sess.save(error=message, request_result={"id": request_id, "ok": False,
                                                      "error": message}, **changes)

    def stray_holders(self) -> str | None:
        """Processes other than the application that hold the mount, described, or None."""
        from dmrecover.system.processes import describe, processes_holding

        mine = {p.pid for p in self.app.processes()}
        others = [p for p in processes_holding(self.sess.data["mountpoint"])
                  if p.pid not in mine]
        return describe(others) if others else None

    def suspend(self) -> int:
        """SIGTERM (e.g. shutdown): stop the app, take the stack down, keep the state."""
        log.info("stopping for shutdown; `dmrecover resume %s` continues", self.sess.name)
        self.app.stop()
        self.volume.stop_restore()
        self.volume.flush()
        self.stack.teardown()
        self.stack = None
        self.volume.close()
        self.sess.save(pid=None)
        return 0

    def abort(self, request_id: str | None = None) -> bool:
        """Stop the app, tear down, keep the overlay. False (and the reason recorded) when the
        mount is held by something other than the application."""
        s = self.sess
        stray = self.stray_holders()
        if stray:
            self.refuse(request_id, f"abort refused: {s.data['mountpoint']} is held by {stray}")
            return False
        self.app.stop()
        self.volume.stop_restore()
        self.volume.flush()
        try:
            self.stack.teardown()
        except StackError as err:
            self.refuse(request_id, f"abort refused: {err}")
            self.app.start()  # the application must not stay down because of a stray holder
            self.volume.start_restore()
            return False
        self.stack = None
        self.volume.close()
        s.set_state("aborted", pid=None, error=None)
        return True

    # ---------------------------------------------------------- cutover

    def cutover_online(self) -> bool:
        """dm backend, online mode: merge the COW into DEST under the running application.

        The pseudo-volume's table is swapped in place (snapshot -> snapshot-merge on DEST ->
        linear on DEST); the application is never stopped. A crash midway resumes as a restore:
        a chunk the merge has copied is on DEST and gone from the COW, which the snapshot over
        the origin (served from DEST) shows the same way.
        """
        from dmrecover.backends.dm.stack import discard_cow
        from dmrecover.engine.pseudovolume import MERGED_MARKER, _write_marker

        s = self.sess
        v = self.volume
        timings = dict(s.data.get("timings") or {})
        timings["cutover_started"] = time.time()
        s.set_state("cutting-over", cutover_phase="online-merge", error=None, timings=timings)
        v.stop_restore()
        if not v.restored_all():
            v.start_restore()
            v.wait_restored()
            v.stop_restore()
        v.flush()
        pause = self.stack.online_cutover(
            s.data["dest"], on_phase=lambda p: s.save(online_phase=p))
        from pathlib import Path

        _write_marker(Path(s.engine_dir) / MERGED_MARKER, f"{time.time():.3f}\n")
        discard_cow(s.engine_dir)
        timings["online_max_pause"] = pause
        timings["merged"] = timings["done"] = time.time()
        timings["cutover_downtime"] = 0.0
        s.set_state("done", cutover_phase=None, timings=timings, pid=None, error=None,
                    app_started=True, devices=self.stack.devices())
        return True

    def cutover(self, resume_phase: str | None = None) -> bool:
        """Stop app, unmount, merge overlay into DEST, mount DEST, start app, discard overlay.

        Returns True when done; False when the unmount was refused (something other than the
        application holds the mount): the application is started again on the pseudo-volume,
        the state is back to ready with the reason, and a `dmrecover cutover` retries.
        """
        from dmrecover.backends.fuse.stack import attach_loop, fault_point
        from dmrecover.system.mounts import mount, mount_at

        s = self.sess
        v = self.volume
        timings = dict(s.data.get("timings") or {})
        start = CUTOVER_PHASES.index(resume_phase) if resume_phase else 0
        if start == 0:
            stray = self.stray_holders()
            if stray:
                # Refuse before stopping anything: the application keeps running.
                self.refuse(self.cutover_request_id,
                            f"cutover refused: {s.data['mountpoint']} is held by {stray}",
                            cutover_requested=False)
                return False
            s.set_state("cutting-over", cutover_phase="stop-app", error=None)
            timings["cutover_started"] = time.time()
            warnings = self.app.stop()
            timings["app_stopped"] = time.time()
            if warnings:
                s.save(warnings=warnings)
            s.set_state("cutting-over", cutover_phase="unmount", timings=timings)
            try:
                fault_point("cutover-unmount")
                leftover = self.stack.teardown()
                if leftover:
                    # Unmounted here, but a layer stayed busy (e.g. another mount namespace
                    # holds a copy of the mount): DEST is safe (nothing writes through it),
                    # say so and go on.
                    s.save(warnings=list(s.data.get("warnings") or []) + leftover)
            except StackError as err:
                handle = self.app.start()
                s.set_state("ready", cutover_phase=None, app_handle=handle.to_dict())
                self.refuse(self.cutover_request_id, f"cutover refused: {err}",
                            cutover_requested=False)
                return False
            self.stack = None
        else:
            log.info("resuming the cutover at phase %s", resume_phase)
        if start <= 2:
            s.set_state("cutting-over", cutover_phase="merge", timings=timings)
            v.stop_restore()
            if not v.restored_all():
                # Crash right after the restore ended, before its map was synced: finish it.
                v.start_restore()
                v.wait_restored()
                v.stop_restore()
            fault_point("cutover-merge")
            if s.data.get("backend") == "dm":
                from dmrecover.backends.dm.stack import merge_into_dest

                copied = merge_into_dest(v, s.engine_dir, s.data["dest"], s.name)
            else:
                copied = v.merge_overlay_into_dest()
            timings["merged_bytes"] = copied
            timings["merged"] = time.time()
        if start <= 3:
            s.set_state("cutting-over", cutover_phase="mount-dest", timings=timings)
            mp = s.data["mountpoint"]
            dev = s.data["dest"]
            if stat.S_ISREG(os.stat(dev).st_mode):
                from dmrecover.system.loops import loop_of

                loops = loop_of(dev)
                dev = loops[0] if loops else attach_loop(dev)
                s.save(dest_loop=dev)
            current = mount_at(mp)
            if current is None or current.source != dev:
                mount(dev, mp, s.data["fstype"])
            if dev != s.data["dest"]:
                # Detaching a mounted loop only sets autoclear: it goes away by itself when
                # DEST is unmounted, so nothing of ours outlives the filesystem.
                from dmrecover.system.loops import detach as loop_detach

                loop_detach(dev)
        if start <= 4:
            s.set_state("cutting-over", cutover_phase="start-app", timings=timings)
            handle = self.app.start()
            timings["app_restarted"] = time.time()
            if "cutover_started" in timings:
                # downtime: from the moment the application is told to stop until it runs again
                timings["cutover_downtime"] = (timings["app_restarted"]
                                               - timings["cutover_started"])
            s.save(app_handle=handle.to_dict(), app_started=True)
        s.set_state("cutting-over", cutover_phase="discard", timings=timings)
        v.discard_overlay()
        timings["done"] = time.time()
        s.set_state("done", cutover_phase=None, timings=timings, pid=None, error=None,
                    app_started=True)
        return True

    # ---------------------------------------------------------- status

    def write_status(self) -> None:
        s = self.sess
        st: dict = {"session": s.name, "state": s.state, "phase": s.data.get("cutover_phase"),
                    "time": time.time(), "pid": os.getpid(), "error": s.data.get("error"),
                    "mountpoint": s.data["mountpoint"], "dest": s.data["dest"],
                    "backup": s.data["backup"], "cutover": s.data["cutover"],
                    "backend": s.data["backend"], "timings": s.data.get("timings") or {},
                    "warnings": s.data.get("warnings") or []}
        try:
            if self.volume is not None:
                try:
                    stats = self.volume.stats()
                except Exception as err:  # e.g. closed: the rest of the status still counts
                    stats = {"error": str(err)}
                if "restored_bytes" in stats:
                    now = time.monotonic()
                    self.rates.append((now, stats["restored_bytes"]))
                    t0, b0 = self.rates[0]
                    if now - t0 > 0.5:
                        stats["rate_recent"] = (stats["restored_bytes"] - b0) / (now - t0)
                st["stats"] = stats
            now = time.monotonic()
            if now - self._app_state_at > (2.0 if self.app.spec.unit else STATUS_INTERVAL):
                self._app_state = self.app.state()
                self._app_state_at = now
            st["app"] = {"state": self._app_state, "pid": self.app.handle.pid}
            write_json_atomic(s.file(STATUS_FILE), st, durable=False)
        except Exception as err:  # status must never take the session down
            if str(err) != self._status_error:
                log.warning("writing status: %s", err)
                self._status_error = str(err)


def run_session(name: str, *, state_dir: str | None = None, resume: bool = False,
                on_started=None) -> int:
    """The session process (`dmrecover session-run`, or in-process with --foreground)."""
    sess = Session.load(name, state_dir)
    lock_fd = os.open(sess.file(LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock_fd)
        raise SessionError(f"session {sess.name} is already running",
                           hint="`dmrecover status` shows it") from None
    root = logging.getLogger()
    handler: logging.Handler | None = None
    if on_started is not None or sys.stderr.isatty():
        handler = logging.FileHandler(sess.file(LOG_FILE))
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(name)s %(levelname)s: %(message)s"))
        root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    os.chdir("/")  # never hold a mount busy
    runner = SessionRunner(sess, on_started=on_started)

    def on_term(signum: int, frame: object) -> None:
        runner.stop_requested = True
        runner.wake.set()

    old_term = signal.signal(signal.SIGTERM, on_term)
    old_usr1 = signal.signal(signal.SIGUSR1, lambda *_: runner.wake.set())
    try:
        me = psutil.Process()
        sess.save(pid=me.pid, pid_create_time=me.create_time())
        log.info("session %s: process %d (%s)", sess.name, me.pid,
                 "resume" if resume else "start")
        return runner.run()
    finally:
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGUSR1, old_usr1)
        if handler is not None:
            root.removeHandler(handler)
            handler.close()
        os.close(lock_fd)


# ---------------------------------------------------------------- resume, cutover, abort


def _teardown_dead(sess: Session, *, stop_app: bool = True) -> list[str]:
    """Stop the app a dead session left and remove its stack (found by looking)."""
    from dmrecover.backends.fuse.stack import teardown_leftovers

    done = []
    if stop_app:
        app = sess.application()
        if app.processes():
            for w in app.stop():
                done.append(w)
            done.append("stopped the application")
    if sess.data.get("backend") == "dm":
        from dmrecover.backends.dm.stack import teardown_session_devices

        done += teardown_session_devices(sess.name)
    done += teardown_leftovers(sess.state_dir, sess.data["mountpoint"])
    for item in done:
        log.info("teardown: %s", item)
    return done


def resume_session(name: str, *, state_dir: str | None = None, foreground: bool = False) -> int:
    """`dmrecover resume`: tear down what a dead session left, then run it again."""
    sess = Session.load(name, state_dir)
    if sess.alive():
        raise SessionError(f"session {sess.name} is running", hint="nothing to resume")
    if sess.state == "done":
        print(f"session {sess.name} is done; nothing to resume")
        return 0
    phase = sess.data.get("cutover_phase")
    # In the last phase the application already runs on DEST: leave it alone.
    _teardown_dead(sess, stop_app=not (sess.state == "cutting-over" and phase == "discard"))
    if sess.state in ("failed", "aborted"):
        prev = sess.data.get("failed_in") if sess.state == "failed" else None
        if prev == "cutting-over" and phase in CUTOVER_PHASES[2:]:
            sess.set_state("cutting-over", error=None)
        else:
            sess.set_state("starting", cutover_phase=None, error=None)
    try:
        os.unlink(sess.file(CONTROL_FILE))  # a request the dead process never saw is void
    except FileNotFoundError:
        pass
    sess.save(app_started=False, resumed=time.time())
    return _launch(sess, foreground=foreground, resume=True)


def _request(sess: Session, request: str, **extra: object) -> str:
    """Hand a request to the live session process; returns its id."""
    rid = f"{os.getpid()}-{time.time():.6f}"
    write_json_atomic(sess.file(CONTROL_FILE), {"request": request, "id": rid,
                                                "time": time.time(), **extra})
    pid = sess.data.get("pid")
    if pid:
        try:
            os.kill(pid, signal.SIGUSR1)
        except ProcessLookupError:
            pass
    return rid


def _wait_state(sess: Session, states: tuple[str, ...], timeout: float,
                request_id: str | None = None) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        data = read_json(sess.path) or {}
        if data.get("state") in states:
            return data
        res = data.get("request_result") or {}
        if request_id and res.get("id") == request_id and not res.get("ok"):
            raise SessionError(res.get("error") or "request refused")
        if not sess.alive() and data.get("state") not in states:
            # the process ended: one last read
            data = read_json(sess.path) or {}
            if data.get("state") in states:
                return data
            raise SessionError(f"session {sess.name} stopped in state {data.get('state')}: "
                               f"{data.get('error') or 'see ' + sess.file(LOG_FILE)}")
        time.sleep(0.1)
    raise SessionError(f"session {sess.name} did not reach {'/'.join(states)} within "
                       f"{timeout:g}s", hint=f"see {sess.file(LOG_FILE)}")


def request_cutover(name: str, *, state_dir: str | None = None, online: bool = False,
                    wait: bool = True) -> int:
    """`dmrecover cutover`: ask the session to cut over (now if ready, else when restored)."""
    sess = Session.load(name, state_dir)
    if online and sess.data.get("backend") != "dm":
        raise UsageError("--online needs the dm backend", hint="run it without --online")
    if sess.state == "done":
        print(f"session {sess.name} is already done")
        return 0
    if not sess.alive():
        raise SessionError(f"session {sess.name} is not running ({sess.state})",
                           hint=f"dmrecover resume {sess.name}")
    if sess.state not in ("restoring", "ready"):
        raise SessionError(f"session {sess.name} is {sess.state}; cannot cut over now")
    rid = _request(sess, "cutover", online=online)
    if sess.state == "restoring":
        print(f"cutover requested: it runs when the restore of {sess.name} completes")
    if not wait:
        return 0
    data = _wait_state(sess, ("done", "failed"), timeout=7 * 24 * 3600, request_id=rid)
    if data["state"] != "done":
        raise SessionError(f"cutover of {sess.name} failed: {data.get('error')}")
    t = data.get("timings") or {}
    down = t.get("cutover_downtime")
    print(f"session {sess.name}: done; the application runs on {data['dest']} at "
          f"{data['mountpoint']}" + (f" (downtime {down:.2f} s)" if down is not None else ""))
    return 0


def abort_session(name: str, *, state_dir: str | None = None) -> int:
    """`dmrecover abort`: stop the app, tear the stack down, keep the overlay."""
    sess = Session.load(name, state_dir)
    if sess.state == "done":
        raise SessionError(f"session {sess.name} is done; nothing to abort")
    if sess.state == "aborted":
        print(f"session {sess.name} is already aborted")
        return 0
    if sess.state == "cutting-over":
        raise SessionError(f"session {sess.name} is cutting over; it cannot be aborted now",
                           hint=f"wait for it, or if its process died: dmrecover resume "
                                f"{sess.name}")
    if sess.alive():
        rid = _request(sess, "abort")
        _wait_state(sess, ("aborted",), timeout=300, request_id=rid)
    else:
        _teardown_dead(sess)
        sess.set_state("aborted", pid=None, error=None)
    eng = sess.engine_dir
    overlay = os.path.join(eng, "overlay.img")
    size = _allocated(overlay)
    print(f"session {sess.name} aborted; the application is stopped and {sess.data['mountpoint']}"
          f" unmounted")
    print(f"the overlay (application writes, {size} bytes allocated) is kept in {eng} "
          f"(overlay.img, overlay.map, overlay.log); `dmrecover resume {sess.name}` continues")
    return 0


def _allocated(path: str) -> int:
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return 0


def list_sessions() -> list[Session]:
    """Every session under the state root (those with a custom --state-dir are not listed)."""
    out = []
    root = state_root()
    try:
        names = sorted(os.listdir(root))
    except FileNotFoundError:
        return []
    for n in names:
        try:
            data = read_json(os.path.join(root, n, SESSION_FILE))
        except SessionError:
            continue
        if data is not None:
            out.append(Session(os.path.join(root, n), data))
    return out

