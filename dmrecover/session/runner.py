"""The session process: brings the stack up, runs the application, restores, cuts over.

States: starting -> restoring -> [ready ->] cutting-over -> done; failed; aborted. The process
holds the state dir's lock while it lives; it rewrites status.json every STATUS_INTERVAL, takes
requests from control.json (the CLI sends SIGUSR1 after writing one), and on SIGTERM (shutdown)
stops the application and takes the stack down, keeping the state for `dmrecover resume`.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable

import psutil

from dmrecover.backends.base import Presentation
from dmrecover.engine.pseudovolume import PseudoVolume
from dmrecover.errors import DmrecoverError, SessionError, StackError
from dmrecover.session.cutover import RESUMABLE_PHASES, Cutover
from dmrecover.session.record import (
    CONTROL_FILE,
    LOCK_FILE,
    LOCK_HANDOFF_ENV,
    LOG_FILE,
    STATUS_FILE,
    CutoverMode,
    Phase,
    SessionRecord,
    State,
    adopt_state_lock,
    read_json,
    write_json_atomic,
)
from dmrecover.session.services import Services, ServicesFactory, default_services
from dmrecover.session.volume import claim_for_session, forget_key, release_claims
from dmrecover.system import claims, command, forked
from dmrecover.system.claims import Claim
from dmrecover.system.mounts import umount
from dmrecover.testhooks import fault_point

log = logging.getLogger(__name__)

STATUS_INTERVAL = 0.5
# An automatic cutover refused (a stranger holds the mount) is tried again after
# AUTO_RETRY_BASE seconds, doubling up to AUTO_RETRY_MAX.
AUTO_RETRY_BASE = 5.0
AUTO_RETRY_MAX = 300.0
OnStarted = Callable[[SessionRecord], None]


class SessionRunner:
    """One session process's work over a record and its services (fakes in the unit tests)."""

    def __init__(self, record: SessionRecord, services: Services, *,
                 on_started: OnStarted | None = None) -> None:
        self.record = record
        self.services = services
        self.backend = services.backend
        self.app = services.app
        self.on_started = on_started
        self.volume: PseudoVolume | None = None
        self.presentation: Presentation | None = None
        self.wake = threading.Event()
        self.stop_requested = False
        self.rates: deque[tuple[float, int]] = deque(maxlen=40)
        self._app_state = "stopped"
        self._app_state_at = 0.0
        self._status_error: str | None = None
        self.cutover_request_id: str | None = None
        self.restored_at: float | None = None
        self.claims: list[Claim] = []  # held by run_session for the process's life
        self.auto_retry_at = 0.0  # monotonic time of the next automatic cutover attempt
        self.auto_attempts = 0
        # When this process reached each step of its start (wall clock, into the record's
        # timings with app_started): where a live restore's RTO goes (bench/bench_s3.py).
        self.marks: dict[str, float] = {}

    # ---------------------------------------------------------- main

    def run(self) -> int:
        """The whole life of the process: 0 when it ended as it should, 1 when it failed."""
        r = self.record
        if r.state == State.DONE:
            log.info("session %s is done; nothing to do", r.name)
            return 0
        try:
            self.marks["session_process"] = time.time()
            self.open()
            self.marks["volume_opened"] = time.time()
            if r.state == State.CUTTING_OVER and r.phase in RESUMABLE_PHASES:
                self._cutover().run(resume=r.phase)
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
            if self.volume is not None and r.state in (State.DONE, State.ABORTED, State.FAILED):
                try:
                    self.volume.close()
                except Exception as err:  # closing must not hide the session's outcome
                    log.error("closing the pseudo-volume: %s", err)
            if r.state == State.DONE:
                forget_key(r)  # the repository's key is not needed again

    def open(self) -> None:
        """Open the pseudo-volume (its restorer reports back through `_on_restored`)."""
        self.volume = self.services.open_volume(self.record, self.backend, self._on_restored)

    def _on_restored(self) -> None:
        """Called by the restorer thread once every chunk is restored and synced."""
        self.restored_at = time.time()
        self.wake.set()

    def fail(self, message: str) -> None:
        """Persist failed (with the state it failed in); tear down what this process built."""
        r = self.record
        log.error("session %s failed: %s", r.name, message)
        if self.presentation is not None and r.state != State.CUTTING_OVER:
            try:
                self.app.stop()
                self.app.release()
            except DmrecoverError as err:
                log.error("stopping the application: %s", err)
            for e in self.presentation.undo.unwind():
                log.error("%s", e)
            self.presentation = None
        r.set_state(State.FAILED, error=message, failed_in=r.state, pid=None)

    def bring_up(self) -> None:
        """Presentation (the backend's stack), application, background restore: undone on
        failure."""
        r = self.record
        assert self.volume is not None
        if r.state != State.STARTING:
            r.set_state(State.STARTING, phase=None, error=None)
        presentation = self.backend.present(self.volume, r.context())
        presentation.build()  # undoes its own steps when one fails
        self.presentation = presentation
        self.marks["stack_built"] = time.time()
        try:
            fault_point("app")
            handle = self.app.start()
        except BaseException:
            for e in presentation.undo.unwind():
                log.error("%s", e)
            self.presentation = None
            raise
        warning = self.app.tracking_warning  # no cgroup could be made: say so in status
        if warning and warning not in r.warnings:
            r.add_warnings([warning])
        timings = dict(r.timings)
        timings.update(self.marks)
        if handle.started_at:
            timings["app_spawned"] = handle.started_at
        timings["app_started"] = time.time()
        r.set_state(State.RESTORING, app_handle=handle.to_dict(), app_started=True,
                    devices=presentation.devices(), timings=timings)
        self.volume.start_restore()
        if self.on_started is not None:
            self.on_started(r)

    def loop(self) -> int:
        """`step()` every STATUS_INTERVAL (or when woken) until the session's process ends."""
        while True:
            result = self.step()
            if result is not None:
                return result
            self.wake.wait(STATUS_INTERVAL)
            self.wake.clear()

    def step(self) -> int | None:
        """Status, requests, the cutover once everything is restored. Returns the process's
        exit code when it is to end, None to go on."""
        r = self.record
        v = self.volume
        assert v is not None
        self.write_status()
        req = self.take_request()
        if self.stop_requested:
            return self.suspend()
        if req.get("request") == "abort":
            if self.abort(req.get("id"), force=bool(req.get("force"))):
                return 0
        elif req.get("request") == "cutover":
            self.cutover_request_id = req.get("id")
            self.auto_retry_at = 0.0
            changes: dict = {"cutover_requested": True}
            if req.get("online"):
                changes["cutover_mode"] = CutoverMode.ONLINE
            r.save(**changes)
        rs = v.restorer.stats() if v.restorer is not None else {}
        if rs.get("error") and r.state == State.RESTORING:
            # The restore cannot complete (corrupt chunk, repository gone past the deadline).
            # The application keeps its pseudo-volume; the operator decides.
            r.save(error=rs["error"])
        if v.restored_all() and (v.restorer is None or not v.restorer.running):
            r.timings.setdefault("restored", self.restored_at or time.time())
            if r.cutover_mode == CutoverMode.ONLINE and self.backend.supports_online_cutover:
                if self._cutover().run_online():
                    return 0
            elif ((r.cutover_mode in (CutoverMode.AUTO, CutoverMode.ONLINE)
                   and time.monotonic() >= self.auto_retry_at) or r.cutover_requested):
                cut = self._cutover()
                try:
                    done = cut.run()
                finally:
                    self.presentation = cut.presentation  # None once torn down
                if done:
                    return 0
                self._schedule_auto_retry()
            elif r.state == State.RESTORING:
                self._flush_overlay()
                r.set_state(State.READY)
        return None

    def _schedule_auto_retry(self) -> None:
        """A refused cutover: in auto mode try again after a backoff (said in the error and
        in status); in manual mode wait for `dmrecover cutover`."""
        r = self.record
        if r.cutover_mode not in (CutoverMode.AUTO, CutoverMode.ONLINE):
            self.auto_retry_at = float("inf")
            return
        self.auto_attempts += 1
        delay = min(AUTO_RETRY_MAX, AUTO_RETRY_BASE * 2 ** (self.auto_attempts - 1))
        self.auto_retry_at = time.monotonic() + delay
        r.save(error=f"{r.error}; the automatic cutover retries in {delay:g}s "
                     f"(attempt {self.auto_attempts + 1})")

    def _yield_dest_device(self) -> None:
        """Before the cutover mounts DEST: close the claim's O_EXCL descriptor on a block
        DEST (the mount takes the kernel's claim); the claim's lock stays held."""
        for c in self.claims:
            c.release_device()

    def _cutover(self) -> Cutover:
        assert self.volume is not None
        self._yield_dest_device()
        return Cutover(self.record, self.services, self.volume, self.presentation,
                       refuse=lambda msg, **ch: self.refuse(self.cutover_request_id, msg, **ch))

    # ---------------------------------------------------------- requests

    def take_request(self) -> dict:
        """The pending control request ({} when none), consumed."""
        path = self.record.file(CONTROL_FILE)
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
        self.record.save(error=message, request_result={"id": request_id, "ok": False,
                                                        "error": message}, **changes)

    def suspend(self) -> int:
        """SIGTERM (e.g. shutdown): stop the app, take the stack down, keep the state."""
        assert self.volume is not None and self.presentation is not None
        log.info("stopping for shutdown; `dmrecover resume %s` continues", self.record.name)
        self.app.stop()
        self.volume.stop_restore()
        self._flush_overlay()
        self.presentation.teardown()
        self.presentation = None
        self.volume.close()
        self.record.save(pid=None)
        return 0

    def abort(self, request_id: str | None = None, *, force: bool = False) -> bool:
        """Stop the application whatever it does (stop command, SIGTERM, SIGKILL), tear down,
        keep the overlay. False (and the reason recorded) when something else still holds
        the mount: processes of the application that survived SIGKILL, or strangers, named.
        The application then stays stopped (that is what abort is for) and no automatic
        cutover restarts it; `abort` again once they are gone.

        force (`abort --force`): those processes are named in the warnings, never signalled
        (they are not the application), the filesystem is synced into the overlay and
        unmounted lazily: nothing stays mounted at the mount point, and their I/O on the
        detached filesystem fails once this process stops serving it (docs/architecture.md,
        'abort --force')."""
        r = self.record
        assert self.volume is not None and self.presentation is not None
        r.add_warnings(self.app.stop())
        r.save(app_handle=self.app.handle.to_dict())
        survivors = self.app.processes()
        stray = self.services.host.stray_holders(r.mountpoint, set())
        if stray:
            what = "processes of the application that survived SIGKILL" if survivors \
                else "processes other than the application"
            if not force:
                self._refuse_abort(request_id, f"abort refused: the application is stopped, "
                                               f"but {r.mountpoint} is held by {stray} "
                                               f"({what}); stop them and run `dmrecover abort "
                                               f"{r.name}` again, or `dmrecover abort --force "
                                               f"{r.name}` to unmount it lazily under them")
                return False
            self._unmount_under(stray, what)
        self.volume.stop_restore()
        self._flush_overlay()
        try:
            self.presentation.teardown()
        except StackError as err:
            if not stray:  # nothing forced: the stack is intact, say why
                self.volume.start_restore()
                self._refuse_abort(request_id, f"abort refused: the application is stopped, "
                                               f"but {err}")
                return False
            # Forced: the mount is gone; the layers under it stay busy until the processes
            # let go of the detached filesystem. Undo what can be undone, then the backend's
            # teardown of a dead session's stack (lazy where busy).
            problems = self.presentation.undo.unwind()
            try:
                problems += [f"left to cleanup: {x}" for x in
                             self.backend.teardown_dead(r.context())]
            except DmrecoverError as err2:
                problems.append(str(err2))
            log.warning("abort --force: %s; %s", err, problems)
        self.presentation = None
        self.volume.close()
        self.app.release()
        r.set_state(State.ABORTED, pid=None, error=None, app_handle=self.app.handle.to_dict())
        return True

    def _unmount_under(self, holders: str, what: str) -> None:
        """abort --force: sync the filesystem (everyone's writes into the overlay), then
        unmount it lazily under the processes that hold it, named in the warnings."""
        r = self.record
        r.add_warnings([f"abort --force: {r.mountpoint} was held by {holders} ({what}); they "
                        "were not signalled; it was unmounted lazily, and their I/O on it "
                        "fails from now on"])
        sync = command.run(["sync", "-f", r.mountpoint], check=False, timeout=600)
        if sync.returncode != 0:
            log.warning("sync -f %s: %s", r.mountpoint, sync.stderr.strip())
        umount(r.mountpoint, lazy=True)

    def _flush_overlay(self) -> None:
        """Flush before a teardown; a full overlay filesystem is no reason to fail it (the
        overlay's close keeps its journal durable without new room)."""
        assert self.volume is not None
        try:
            self.volume.flush()
        except OSError as err:
            log.warning("flushing the overlay: %s; its journal keeps the writes", err)

    def _refuse_abort(self, request_id: str | None, message: str) -> None:
        self.auto_retry_at = float("inf")  # no automatic cutover restarts it
        self.refuse(request_id, message, cutover_requested=False)

    # ---------------------------------------------------------- status

    def write_status(self) -> None:
        """status.json for `dmrecover status` (never raises: status must not end a session)."""
        r = self.record
        st: dict = {"session": r.name, "state": r.state, "phase": r.phase,
                    "time": time.time(), "pid": os.getpid(), "error": r.error,
                    "mountpoint": r.mountpoint, "dest": r.dest, "backup": r.backup,
                    "cutover": r.cutover_mode, "backend": r.backend, "timings": r.timings,
                    "warnings": r.warnings}
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
            unit = getattr(getattr(self.app, "spec", None), "unit", None)
            if now - self._app_state_at > (2.0 if unit else STATUS_INTERVAL):
                self._app_state = self.app.state()
                self._app_state_at = now
            st["app"] = {"state": self._app_state, "pid": self.app.handle.pid}
            st["app"].update(self.app.status())
            if r.state == State.READY and self.auto_retry_at > time.monotonic() and \
                    self.auto_retry_at != float("inf"):
                st["cutover_retry"] = {"attempt": self.auto_attempts + 1,
                                       "in": round(self.auto_retry_at - time.monotonic(), 1)}
            write_json_atomic(r.file(STATUS_FILE), st, durable=False)
        except Exception as err:  # status must never take the session down
            if str(err) != self._status_error:
                log.warning("writing status: %s", err)
                self._status_error = str(err)


def run_session(name: str, *, state_dir: str | None = None, resume: bool = False,
                on_started: OnStarted | None = None,
                services: ServicesFactory = default_services,
                held: list[Claim] | None = None, lock_fd: int | None = None) -> int:
    """The session process (`dmrecover session-run`, or in-process with --foreground): holds
    the lock (`lock_fd` already taken, or handed on by `resume`, or taken here) and the claims
    on DEST and the mount point (`held`, or handed on by the parent, or taken here), logs to
    session.log, handles SIGTERM (suspend) and SIGUSR1 (a request)."""
    inherited = claims.adopt_inherited(f"session {name}")
    held = held if held is not None else inherited
    if lock_fd is None:
        lock_fd = adopt_state_lock()  # `resume` took it and handed it on
    try:
        record = SessionRecord.load(name, state_dir)
        locked = lock_fd is not None
        if lock_fd is None:
            lock_fd = os.open(record.file(LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                              0o600)
    except BaseException:
        if lock_fd is not None:
            os.close(lock_fd)
        release_claims(held)
        raise
    try:
        if not locked:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if not held and record.state != State.DONE:
            held = claim_for_session(record.name, record.dest, record.mountpoint,
                                     exclusive=not _dest_mounted(record))
    except BaseException as err:
        os.close(lock_fd)
        release_claims(held)
        if isinstance(err, BlockingIOError):
            raise SessionError(f"session {record.name} is already running",
                               hint="`dmrecover status` shows it") from None
        raise
    root = logging.getLogger()
    handler: logging.Handler | None = None
    if on_started is not None or sys.stderr.isatty():
        handler = logging.FileHandler(record.file(LOG_FILE))
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(name)s %(levelname)s: %(message)s"))
        root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    in_main = threading.current_thread() is threading.main_thread()
    old_term = old_usr1 = None
    try:
        old_cwd: str | None = os.getcwd()  # a path, not an fd: holding it could pin a mount
    except OSError:
        old_cwd = None
    try:
        os.chdir("/")  # never hold a mount busy
        runner = SessionRunner(record, services(record), on_started=on_started)
        runner.claims = held

        def on_term(signum: int, frame: object) -> None:
            runner.stop_requested = True
            runner.wake.set()

        if in_main:  # signals can only be handled in the main thread
            old_term = signal.signal(signal.SIGTERM, on_term)
            old_usr1 = signal.signal(signal.SIGUSR1, lambda *_: runner.wake.set())
        me = psutil.Process()
        record.save(pid=me.pid, pid_create_time=me.create_time())
        log.info("session %s: process %d (%s)", record.name, me.pid,
                 "resume" if resume else "start")
        return runner.run()
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
        if old_usr1 is not None:
            signal.signal(signal.SIGUSR1, old_usr1)
        if handler is not None:
            root.removeHandler(handler)
            handler.close()
        if old_cwd is not None:
            try:
                os.chdir(old_cwd)  # in-process callers (--foreground, tests) get theirs back
            except OSError:
                pass
        release_claims(held)
        os.close(lock_fd)


def _dest_mounted(record: SessionRecord) -> bool:
    """True in the cutover phases where DEST is mounted (no O_EXCL claim is possible)."""
    return record.state == State.CUTTING_OVER and record.phase in (
        Phase.MOUNT_DEST, Phase.START_APP, Phase.DISCARD, Phase.ONLINE_MERGE)


# ---------------------------------------------------------------- launching it

START_TIMEOUT = 300.0
_STARTED_STATES = (State.RESTORING, State.READY, State.CUTTING_OVER, State.DONE)


def launch(record: SessionRecord, *, foreground: bool, resume: bool,
           on_started: OnStarted | None = None,
           services: ServicesFactory = default_services,
           held: list[Claim] | None = None,
           lock_fd: int | None = None) -> SessionRecord:
    """Run the session process: here (foreground: returns when it ends, `on_started` called
    once the application runs), or detached (returns once the application runs). The record
    returned is the one persisted at that point; SessionError when the session failed.
    `held`: the claims the caller took, and `lock_fd` the state lock it took, both handed to
    the session process with no gap."""
    held = held or []
    if foreground:
        old_umask = os.umask(0o077)  # what the session creates is private (logs, overlay)
        try:
            rc = run_session(record.name, state_dir=record.state_dir, resume=resume,
                             on_started=on_started, services=services, held=held,
                             lock_fd=lock_fd)
        finally:
            os.umask(old_umask)
        final = record.reload()
        if rc != 0 or final.state == State.FAILED:
            raise SessionError(f"session {record.name} failed: {final.error}",
                               hint=f"see {record.file(LOG_FILE)}")
        return final
    try:
        logfd = os.open(record.file(LOG_FILE), os.O_WRONLY | os.O_APPEND | os.O_CREAT
                        | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            pid = _fork_session(record, resume, held, lock_fd, logfd)
        finally:
            os.close(logfd)
    except BaseException:
        release_claims(held)
        if lock_fd is not None:
            os.close(lock_fd)
        raise
    for c in held:
        c.close()  # the child holds them now (flock and O_EXCL go with the open file)
    if lock_fd is not None:
        os.close(lock_fd)  # the child's copy keeps the state lock
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        current = record.reload()
        if current.app_started and current.state in _STARTED_STATES:
            break
        if current.state == State.FAILED:
            raise SessionError(f"session {record.name} failed: {current.error}",
                               hint=f"see {record.file(LOG_FILE)}")
        rc = _exited(pid)
        if rc is not None:
            current = record.reload()
            if current.app_started:
                break
            err = current.error or f"the session process exited with code {rc}"
            raise SessionError(f"session {record.name} failed: {err}",
                               hint=f"see {record.file(LOG_FILE)}")
        if time.monotonic() > deadline:
            raise SessionError(f"session {record.name} did not start its application within "
                               f"{START_TIMEOUT:g}s", hint=f"see {record.file(LOG_FILE)}")
        time.sleep(0.02)
    if on_started is not None:
        on_started(current)
    return current


def _fork_session(record: SessionRecord, resume: bool, held: list[Claim],
                  lock_fd: int | None, logfd: int) -> int:
    """Fork the detached session process; returns its pid.

    A fork, not an exec of `dmrecover session-run`: the child starts with this process's
    modules already imported (boto3, cryptography: ~0.3-0.6 s of a new interpreter's start)
    and the repository already opened (volume.open_volume), which is most of the RTO left
    once the engine is fast (issue 10). It is what the exec did otherwise: a new session,
    cwd /, umask 077, stdin /dev/null, stdout and stderr to session.log, the claims and the
    state lock handed on through the same environment entries (adopted by run_session as
    in `session-run`, which systemd and a reboot still use). Descriptors this process
    inherited from its caller (inheritable ones; Python's own are close-on-exec and owned
    by objects) are closed: a caller waiting for EOF on a pipe must not wait for the
    session."""
    keep = {fd for c in held for fd in c.fds()} | ({lock_fd} if lock_fd is not None else set())
    env = dict(claims.handoff_env(held))
    if lock_fd is not None:
        env[LOCK_HANDOFF_ENV] = str(lock_fd)
    forked.flush_std_streams()
    pid = os.fork()
    if pid:
        return pid
    rc = 1
    try:
        os.setsid()
        os.dup2(logfd, 1)
        os.dup2(logfd, 2)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        for fd in {devnull, logfd} - {0, 1, 2}:  # a caller that closed one gave us its number
            os.close(fd)
        for fd in _inherited_fds(keep):
            os.close(fd)
        for fd in keep:
            os.set_inheritable(fd, False)
        os.umask(0o077)
        os.chdir("/")
        os.environ.update(env)
        rc = run_session(record.name, state_dir=record.state_dir, resume=resume)
    except DmrecoverError as err:  # as `session-run` says it, into session.log
        print(f"dmrecover: error: {err}", file=sys.stderr)
        rc = err.exit_code
    except BaseException:  # noqa: BLE001 - the child must never return into the CLI
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(rc)


def _inherited_fds(keep: set[int]) -> list[int]:
    """Descriptors >= 3 that are inheritable and not in keep: what this process's caller
    handed it (Python opens its own close-on-exec)."""
    out = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd < 3 or fd in keep:
            continue
        try:
            if os.get_inheritable(fd):
                out.append(fd)
        except OSError:  # the listing's own descriptor, closed by now
            continue
    return out


def _exited(pid: int) -> int | None:
    """The exit code of our child pid once it ended (reaped), else None."""
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return 1
    if not done:
        return None
    return os.waitstatus_to_exitcode(status)
