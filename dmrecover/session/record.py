"""The persisted record of a live-restore session (session.json) and its state dir.

State dir (default /var/lib/dmrecover/<session>/, or --state-dir; the root can be moved with
DMRECOVER_STATE_ROOT, which the tests use):

    session.json   the record: config, state, cutover phase, pids, devices; written atomically,
                   every state change before it takes effect
    status.json    rewritten every ~0.5 s by the session process (engine stats, app state)
    control.json   a request (cutover, abort) from the CLI; the CLI then sends SIGUSR1
    lock           flock()ed by the live session process (and by its start, from before it
                   creates anything): "in use" means this lock is held
    lvs-intent.json  the LVs a start is about to create (system/lvm.py), until the record
                   names them: what cleanup removes after a start killed in between
    session.log    the session process's log;  app.log: the application's output
    overlay.*, restored.map, merged    the engine's files (PseudoVolume), unless --overlay DIR

The JSON keys are those the first version wrote (tools and tests read them); a record missing
keys loads with defaults, and keys this version does not know are kept as they were.
"""

from __future__ import annotations

import dataclasses
import enum
import fcntl
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from dmrecover.backends.base import BackendContext
from dmrecover.errors import SessionError, UsageError
from dmrecover.session.app import AppHandle, Application, AppSpec, cgroup_name
from dmrecover.system import files

log = logging.getLogger(__name__)

STATE_ROOT_ENV = "DMRECOVER_STATE_ROOT"
DEFAULT_STATE_ROOT = "/var/lib/dmrecover"

SESSION_FILE = "session.json"
STATUS_FILE = "status.json"
CONTROL_FILE = "control.json"
LOCK_FILE = "lock"
LOG_FILE = "session.log"
APP_LOG = "app.log"

FORMAT = "dmrecover-session"
VERSION = 2  # 1: the untyped dict; 2: same keys, written from SessionRecord
HISTORY_KEEP = 50
KEEP = object()  # set_state(phase=KEEP): leave the cutover phase as it is


class State(enum.StrEnum):
    """Session states: starting -> restoring -> [ready ->] cutting-over -> done."""

    STARTING = "starting"
    RESTORING = "restoring"
    READY = "ready"
    CUTTING_OVER = "cutting-over"
    DONE = "done"
    FAILED = "failed"
    ABORTED = "aborted"


ACTIVE_STATES = (State.STARTING, State.RESTORING, State.READY, State.CUTTING_OVER)


class Phase(enum.StrEnum):
    """Persisted cutover phases (restart mode in order, then the online one)."""

    STOP_APP = "stop-app"
    UNMOUNT = "unmount"
    MERGE = "merge"
    MOUNT_DEST = "mount-dest"
    START_APP = "start-app"
    DISCARD = "discard"
    ONLINE_MERGE = "online-merge"


class CutoverMode(enum.StrEnum):
    AUTO = "auto"
    MANUAL = "manual"
    ONLINE = "online"


# ---------------------------------------------------------------- files


def state_root() -> str:
    return os.environ.get(STATE_ROOT_ENV, DEFAULT_STATE_ROOT)


def session_dir(name: str, state_dir: str | None = None) -> str:
    """The state dir of session `name` (--state-dir wins)."""
    return os.path.abspath(state_dir) if state_dir else os.path.join(state_root(), name)


def write_json_atomic(path: str | os.PathLike[str], data: dict, *, durable: bool = True) -> None:
    """Write JSON atomically, private (0600: a record names devices, paths, commands)."""
    files.write_json_atomic(path, data, durable=durable, mode=0o600)


def read_json(path: str | os.PathLike[str]) -> dict | None:
    """The JSON object in path; None when the file does not exist; SessionError if unreadable
    or if another user than root could have written it (root runs what a record says)."""
    return files.read_trusted_json(path, error=SessionError)


def check_state_dir(d: str) -> None:
    """Refuse a state dir another user could write (owned by another, group or world
    writable, a symlink): root would run the command its session.json names."""
    if os.path.lexists(d):
        files.check_trusted(d, kind="state dir", error=SessionError)


# The state dir's lock taken by `resume` and handed to the session process it starts (an
# inherited descriptor: flock goes with the open file), so no second resume slips in between.
LOCK_HANDOFF_ENV = "DMRECOVER_STATE_LOCK_FD"


def take_state_lock(state_dir: str) -> int | None:
    """The state dir's lock, taken (a descriptor to keep, or hand on); None while another
    process holds it (the session runs, or another resume is starting it)."""
    fd = os.open(os.path.join(state_dir, LOCK_FILE),
                 os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def adopt_state_lock() -> int | None:
    """The state lock a parent (`resume`) handed to this process, or None (removes the entry
    from the environment, so it is adopted once)."""
    text = os.environ.pop(LOCK_HANDOFF_ENV, "")
    if not text:
        return None
    fd = int(text)
    os.set_inheritable(fd, False)
    return fd


def lock_held(state_dir: str) -> bool:
    """True when a live session process holds the state dir's lock."""
    path = os.path.join(state_dir, LOCK_FILE)
    try:  # read-only: flock needs no write access, and status runs as any user
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing releases a lock we just took
    return False


# ---------------------------------------------------------------- the record

# dataclass field -> session.json key, where they differ (the keys of version 1 stay).
_KEYS = {"phase": "cutover_phase", "cutover_mode": "cutover"}
_NOT_PERSISTED = ("state_dir", "extra")


@dataclass
class SessionRecord:
    """One session: its configuration (fixed at live-restore) and its runtime state."""

    state_dir: str  # not persisted: where the record was loaded from
    # ---- configuration
    name: str = ""
    repo: str = ""
    backup: str = ""
    backup_name: str | None = None
    size: int = 0
    chunk_size: int = 0
    fstype: str | None = None
    dest: str = ""
    mountpoint: str = ""
    app: AppSpec = field(default_factory=AppSpec)
    backend: str = ""
    cutover_mode: str = CutoverMode.AUTO
    fetch_deadline: float = 600.0
    on_repository_lost: str = "block"  # past the deadline: reads wait, or fail ("error")
    engine_dir: str | None = None
    #: LVs the session created (--overlay VG, --dest-vg VG): LogicalVolume.to_dict() each
    lvs: list[dict] = field(default_factory=list)
    created: float | None = None
    # ---- runtime
    state: str = State.STARTING
    phase: str | None = None
    failed_in: str | None = None
    error: str | None = None
    pid: int | None = None
    pid_create_time: float | None = None
    app_handle: dict | None = None
    app_started: bool = False
    devices: dict = field(default_factory=dict)
    dest_loop: str | None = None
    online_phase: str | None = None
    cutover_requested: bool = False
    request_result: dict | None = None
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, Any] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    resumed: float | None = None
    updated: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # keys we do not know: kept as read

    # ------------------------------------------------------------ JSON

    def to_dict(self) -> dict:
        """The session.json object (version-1 keys, plus format and version)."""
        out: dict[str, Any] = dict(self.extra)
        for f in dataclasses.fields(self):
            if f.name in _NOT_PERSISTED:
                continue
            value = getattr(self, f.name)
            if isinstance(value, AppSpec):
                value = value.to_dict()
            elif isinstance(value, enum.Enum):
                value = value.value
            out[_KEYS.get(f.name, f.name)] = value
        out["format"] = FORMAT
        out["version"] = VERSION
        return out

    @classmethod
    def from_dict(cls, data: dict, state_dir: str) -> SessionRecord:
        """A record from session.json of any version (missing keys take their defaults)."""
        fmt = data.get("format", FORMAT)
        if fmt != FORMAT:
            raise SessionError(f"{state_dir}/{SESSION_FILE} is not a dmrecover session "
                               f"(format {fmt!r})")
        version = data.get("version", 1)
        if not isinstance(version, int) or version > VERSION:
            raise SessionError(f"session in {state_dir} has record version {version}; this "
                               f"dmrecover reads up to {VERSION}", hint="upgrade dmrecover")
        known = {_KEYS.get(f.name, f.name): f for f in dataclasses.fields(cls)
                 if f.name not in _NOT_PERSISTED}
        kwargs: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, value in data.items():
            if key in ("format", "version"):
                continue
            f = known.get(key)
            if f is None:
                extra[key] = value
            elif value is None and f.default is dataclasses.MISSING:
                continue  # a null where a container is expected: keep the default
            else:
                kwargs[f.name] = value
        if isinstance(kwargs.get("app"), dict):
            kwargs["app"] = AppSpec.from_dict(kwargs["app"])
        elif "app" in kwargs:
            del kwargs["app"]
        for name, enum_type in (("state", State), ("phase", Phase)):
            try:
                if kwargs.get(name) is not None:
                    kwargs[name] = enum_type(kwargs[name])
            except ValueError as err:
                raise SessionError(f"session in {state_dir}: unknown {name} "
                                   f"{kwargs[name]!r}") from err
        for name in ("devices", "timings"):
            if not isinstance(kwargs.get(name, {}), dict):
                kwargs[name] = {}
        for name in ("warnings", "history", "lvs"):
            if not isinstance(kwargs.get(name, []), list):
                kwargs[name] = []
        return cls(state_dir=state_dir, extra=extra, **kwargs)

    # ------------------------------------------------------------ files

    @property
    def path(self) -> str:
        return os.path.join(self.state_dir, SESSION_FILE)

    @property
    def engine_path(self) -> str:
        """Where the engine keeps the overlay and the restored map (--overlay, else the
        state dir)."""
        return self.engine_dir or self.state_dir

    def file(self, name: str) -> str:
        return os.path.join(self.state_dir, name)

    @classmethod
    def load(cls, name: str | None, state_dir: str | None = None) -> SessionRecord:
        """Load session `name` (or the one in state_dir); SessionError when there is none."""
        if not name and not state_dir:
            raise UsageError("name a session (or --state-dir)")
        d = session_dir(name or "", state_dir)
        check_state_dir(d)
        data = read_json(os.path.join(d, SESSION_FILE))
        if data is None:
            raise SessionError(f"no session {name or ''} in {d}".replace("  ", " "),
                               hint="`dmrecover status` lists the sessions")
        if name and data.get("name") != name:
            raise SessionError(f"{d} holds session {data.get('name')}, not {name}")
        return cls.from_dict(data, d)

    def reload(self) -> SessionRecord:
        """The record as persisted now (another process may have changed it)."""
        data = read_json(self.path)
        if data is None:
            raise SessionError(f"session {self.name}: {self.path} is gone")
        return SessionRecord.from_dict(data, self.state_dir)

    def save(self, **changes: Any) -> None:
        """Apply changes and persist them durably (before they take effect)."""
        for key, value in changes.items():
            if not hasattr(self, key) or key in _NOT_PERSISTED:
                raise AttributeError(f"SessionRecord has no field {key}")
            setattr(self, key, value)
        self.updated = time.time()
        write_json_atomic(self.path, self.to_dict())

    def set_state(self, state: State, *, phase: Phase | None | object = KEEP,
                  **changes: Any) -> None:
        """Persist a new state with changes; `phase` (None: out of the cutover) is kept as it
        is unless given."""
        if phase is not KEEP:
            changes["phase"] = Phase(phase) if phase else None
        shown = changes.get("phase", self.phase)
        self.history.append({"state": str(state), "phase": shown and str(shown),
                             "time": time.time()})
        del self.history[:-HISTORY_KEEP]
        log.info("session %s: state %s%s", self.name, state, f" ({shown})" if shown else "")
        self.save(state=State(state), **changes)

    def add_warnings(self, items: list[str]) -> None:
        if items:
            self.save(warnings=[*self.warnings, *items])

    # ------------------------------------------------------------ what it refers to

    def alive(self) -> bool:
        """True when the session process runs (it holds the lock)."""
        return lock_held(self.state_dir)

    def status(self) -> dict | None:
        """The last status.json the session process wrote (None when unreadable)."""
        try:
            return read_json(self.file(STATUS_FILE))
        except SessionError:
            return None  # being replaced right now: callers poll again

    def application(self) -> Application:
        return Application(self.app, mountpoint=self.mountpoint, log_path=self.file(APP_LOG),
                           handle=AppHandle.from_dict(self.app_handle),
                           name=cgroup_name(self.name, self.state_dir))

    def context(self) -> BackendContext:
        """What a backend needs to know about this session."""
        return BackendContext(session=self.name, state_dir=self.state_dir,
                              engine_dir=self.engine_path, mountpoint=self.mountpoint,
                              fstype=self.fstype, dest=self.dest, size=self.size,
                              on_change=lambda devs: self.save(devices=devs))
