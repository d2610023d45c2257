"""The application the data agent starts and stops around the pseudo-volume.

Two kinds: start/stop commands (argv, split with shlex, never a shell) or a systemd unit. The
application is tracked by cgroup (`dmrecover.system.cgroups.AppCgroup`), not by process group:
everything the start command forks, daemonized or not (`pg_ctl start` puts the postmaster in a
session of its own), is the application. A unit (--app-unit) is its own cgroup, read from
`systemctl show -p ControlGroup`. The cgroup is persisted with the handle (session.json), so a
resumed session process finds the application again.

Stopping escalates, each step logged in `AppHandle.stop_log` (shown in status) and every step
past the first also returned as a warning:

    1. the stop command (or `systemctl stop UNIT`; without either, SIGTERM), while our exited
       children are reaped so a stop script waiting with `kill -0` sees its pid vanish;
    2. wait for the cgroup to empty, up to the stop timeout (--stop-timeout) in all;
    3. SIGTERM to every process left (at once when the stop command failed or hung), then
       wait TERM_GRACE;
    4. SIGKILL the cgroup; processes that survive even that are named.

A stop command that fails or hangs is a warning and the fallback, never an exception.

Which processes hold a mount is `dmrecover.system.processes`' job.
"""

from __future__ import annotations

import hashlib
import logging
import os
import select
import shlex
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import psutil

from dmrecover.errors import AppError, UsageError
from dmrecover.system import command, processes
from dmrecover.system.cgroups import AppCgroup

log = logging.getLogger(__name__)

START_GRACE = 0.25  # a start command still running after this long has "started"
STOP_TIMEOUT = 120.0  # default --stop-timeout: a database may take a while to checkpoint
TERM_GRACE = 10.0  # after SIGTERM, before SIGKILL (at most the stop timeout)
KILL_WAIT = 10.0  # after SIGKILL, before naming the survivors
STOP_LOG_KEEP = 20


def _exit_within(proc: subprocess.Popen, timeout: float) -> int | None:
    """The exit code of proc if it exits within timeout, else None: woken by its exit (a
    pidfd), so a start command that daemonizes returns as soon as it has, with no polling."""
    try:
        fd = os.pidfd_open(proc.pid)
    except OSError:  # no pidfd (Linux < 5.3) or already reaped: poll as subprocess does
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
    try:
        select.select([fd], [], [], timeout)
    finally:
        os.close(fd)
    return proc.poll()


def cgroup_name(session: str, state_dir: str) -> str:
    """The application's cgroup name for a session: its name plus a digest of its state dir,
    so two sessions of the same name (other state dirs) never share a cgroup."""
    digest = hashlib.sha256(os.path.abspath(state_dir).encode()).hexdigest()[:8]
    return f"{session}-{digest}"


@dataclass
class AppSpec:
    """How to start and stop the application (persisted in session.json)."""

    start: str | None = None
    stop: str | None = None
    unit: str | None = None
    stop_timeout: float = STOP_TIMEOUT

    def validate(self) -> None:
        """Raise UsageError when the spec is incomplete or ambiguous."""
        if self.unit and (self.start or self.stop):
            raise UsageError("give either --app-unit or --app-start/--app-stop, not both")
        if not self.unit and not self.start:
            raise UsageError("no application given",
                             hint="pass --app-start CMD [--app-stop CMD] or --app-unit UNIT")
        if not self.stop_timeout > 0:
            raise UsageError(f"--stop-timeout must be positive, not {self.stop_timeout:g}")
        for cmd in (self.start, self.stop):
            if cmd is not None:
                try:
                    argv = shlex.split(cmd)
                except ValueError as err:
                    raise UsageError(f"cannot parse command {cmd!r}: {err}") from err
                if not argv:
                    raise UsageError("empty application command")

    def to_dict(self) -> dict:
        d: dict = {"start": self.start, "stop": self.stop, "unit": self.unit}
        if self.stop_timeout != STOP_TIMEOUT:  # a first-version record reads back unchanged
            d["stop_timeout"] = self.stop_timeout
        return d

    @classmethod
    def from_dict(cls, d: dict) -> AppSpec:
        timeout = d.get("stop_timeout")
        return cls(start=d.get("start"), stop=d.get("stop"), unit=d.get("unit"),
                   stop_timeout=float(timeout) if isinstance(timeout, (int, float))
                   else STOP_TIMEOUT)


@dataclass
class AppHandle:
    """What is known about a started application (persisted so a new process can stop it)."""

    pid: int | None = None  # the start command
    pgid: int | None = None  # kept for records of version 1 (tracked by cgroup now)
    create_time: float | None = None
    started_at: float | None = None
    exit_code: int | None = None
    cgroup: dict | None = None  # AppCgroup.to_dict()
    stop_log: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"pid": self.pid, "pgid": self.pgid, "create_time": self.create_time,
                "started_at": self.started_at, "exit_code": self.exit_code,
                "cgroup": self.cgroup, "stop_log": self.stop_log}

    @classmethod
    def from_dict(cls, d: dict | None) -> AppHandle:
        d = d or {}
        log_ = d.get("stop_log")
        return cls(pid=d.get("pid"), pgid=d.get("pgid"), create_time=d.get("create_time"),
                   started_at=d.get("started_at"), exit_code=d.get("exit_code"),
                   cgroup=d.get("cgroup") if isinstance(d.get("cgroup"), dict) else None,
                   stop_log=list(log_) if isinstance(log_, list) else [])


def processes_holding(mountpoint: str) -> list[psutil.Process]:
    """Thin wrapper: moved to dmrecover.system.processes (kept until its callers move)."""
    return processes.processes_holding(mountpoint)


class Application:
    """Starts, stops and watches the application described by an AppSpec."""

    def __init__(self, spec: AppSpec, *, mountpoint: str, log_path: str | None = None,
                 handle: AppHandle | None = None, env: dict[str, str] | None = None,
                 stop_timeout: float | None = None, name: str = "app",
                 kinds: Sequence[str] | None = None) -> None:
        self.spec = spec
        self.mountpoint = os.path.abspath(mountpoint)
        self.log_path = log_path
        self.handle = handle or AppHandle()
        self.env = env
        self.stop_timeout = spec.stop_timeout if stop_timeout is None else stop_timeout
        self.name = name
        self.kinds = kinds  # cgroup kinds to try (tests pin one); default: the best there is
        self._cg: AppCgroup | None = None
        if self.handle.cgroup:
            self._cg = AppCgroup.from_dict(self.handle.cgroup)
        self._popen: subprocess.Popen | None = None
        self._stopped = False  # stopped by us: its exit code is not a failure

    # ------------------------------------------------------------------ cgroup

    @property
    def cgroup(self) -> AppCgroup:
        """The application's cgroup (made on first use, then kept in the handle)."""
        if self._cg is None:
            if self.spec.unit:
                self._cg = AppCgroup.for_unit(self.spec.unit)
            else:
                self._cg = AppCgroup.create(self.name, kinds=self.kinds)
            self.handle.cgroup = self._cg.to_dict()
        return self._cg

    @property
    def tracking_warning(self) -> str | None:
        """Set when no cgroup could be made (tracked by process group: weaker)."""
        return self._cg.warning if self._cg is not None else None

    def _tracked(self) -> AppCgroup | None:
        """The cgroup when there can be processes in it (a unit always can)."""
        if self._cg is None and self.spec.unit:
            return self.cgroup
        return self._cg

    # ------------------------------------------------------------------ start

    def start(self) -> AppHandle:
        """Start the application inside its cgroup; return once it runs (AppError if the start
        command fails at once)."""
        self._stopped = False
        if self._cg is not None and self._cg.path and not os.path.isdir(self._cg.path):
            self._cg = None  # removed since (abort, reboot): made again
        cg = self.cgroup
        if self.spec.unit:
            command.run(["systemctl", "start", self.spec.unit], error=AppError,
                        what=f"starting unit {self.spec.unit}", timeout=300)
            self.handle = AppHandle(started_at=time.time(), cgroup=cg.to_dict(),
                                    stop_log=self.handle.stop_log)
            return self.handle
        assert self.spec.start
        argv = shlex.split(self.spec.start)
        env = dict(os.environ)
        if self.env:
            env.update(self.env)
        out = (os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                       0o600) if self.log_path else None)
        try:
            proc = cg.start(argv, cwd="/", env=env, stdout=out,
                            stderr=subprocess.STDOUT if out is not None else None)
        except AppError:
            self.release()
            raise
        finally:
            if out is not None:
                os.close(out)
        self._popen = proc
        try:
            created = psutil.Process(proc.pid).create_time()
        except psutil.Error:
            created = None
        # the last stop's log stays (status shows how the cutover's stop went)
        self.handle = AppHandle(pid=proc.pid, create_time=created, started_at=time.time(),
                                cgroup=cg.to_dict(), stop_log=self.handle.stop_log)
        # A start command that fails at once is a failed start; one that exits 0 has
        # daemonized; one still running after the grace period is a foreground server.
        rc = _exit_within(proc, START_GRACE)
        if rc is not None:
            self.handle.exit_code = rc
            if rc != 0:
                cg.kill(timeout=KILL_WAIT)  # whatever it forked before failing
                self.release()
                raise AppError(f"the application's start command exited with code {rc}",
                               hint=f"see {self.log_path}" if self.log_path else None)
        return self.handle

    # ------------------------------------------------------------------ state

    def _reap(self) -> None:
        """Reap our exited application children (no zombie for a stop script to wait on)."""
        cg = self._cg
        if cg is None or cg.kind == "systemd-unit":
            return
        cg.reap_children()
        if self.handle.pid in cg.exit_codes:
            self.handle.exit_code = cg.exit_codes[self.handle.pid]

    def processes(self) -> list[psutil.Process]:
        """The application's live processes: everything in its cgroup."""
        cg = self._tracked()
        if cg is None:
            return []
        self._reap()
        out = []
        for pid in cg.pids():
            try:
                out.append(psutil.Process(pid))
            except psutil.Error:
                continue
        return out

    def state(self) -> str:
        """'running', 'stopped', or 'exited (N)'."""
        if self.spec.unit:
            r = command.run(["systemctl", "is-active", self.spec.unit], check=False,
                            timeout=10)
            return "running" if r.stdout.strip() in ("active", "activating", "reloading") \
                else r.stdout.strip() or "stopped"
        self._reap()
        if self._cg is not None and self._cg.populated():
            return "running"
        if self._stopped:
            return "stopped"
        if self.handle.exit_code not in (None, 0):
            return f"exited ({self.handle.exit_code})"
        return "stopped"

    def status(self) -> dict:
        """For status.json: how the application is tracked and how its last stop went."""
        cg = self._cg
        return {"tracking": cg.describe() if cg is not None else None,
                "tracking_warning": self.tracking_warning,
                "stop_log": self.handle.stop_log}

    # ------------------------------------------------------------------ stop

    def stop(self, *, timeout: float | None = None) -> list[str]:
        """Stop the application (escalating, see the module doc) and wait for its processes.

        Returns warnings: every step past the stop command, and what survived SIGKILL. Never
        raises because the application misbehaves.
        """
        timeout = self.stop_timeout if timeout is None else timeout
        self._stopped = True
        stop_log = self.handle.stop_log = []
        warnings: list[str] = []
        t0 = time.monotonic()

        def step(msg: str, warn: bool = False) -> None:
            (log.warning if warn else log.info)("application stop: %s", msg)
            stop_log.append(f"{time.monotonic() - t0:6.1f}s {msg}")
            del stop_log[:-STOP_LOG_KEEP]
            if warn:
                warnings.append(msg)

        cg = self._tracked()
        if cg is None:
            step("never started: nothing to stop")
            return warnings
        deadline = t0 + timeout
        argv: list[str] | None = None
        what = ""
        if self.spec.unit:
            argv, what = ["systemctl", "stop", self.spec.unit], f"systemctl stop {self.spec.unit}"
        elif self.spec.stop:
            argv, what = shlex.split(self.spec.stop), "the stop command"
        term_sent = failed = False
        if argv is None:
            step(f"no stop command: sending SIGTERM to {cg.describe()}")
            cg.signal(signal.SIGTERM)
            term_sent = True
        elif not cg.populated() and not self.spec.unit:
            step("no process left: the stop command is not needed")
        else:
            step(f"running {what}")
            try:
                with cg.reaping():
                    command.run(argv, error=AppError, what=what, timeout=timeout)
                step(f"{what} exited 0")
            except AppError as err:
                # It failed or hung: the application may still run. Fall back at once.
                step(f"{err}: falling back to SIGTERM", warn=True)
                deadline = time.monotonic()
                failed = True
        if cg.wait_empty(max(0.0, deadline - time.monotonic())):
            step("stopped")
            self._reap()
            return warnings
        if not term_sent:
            left = _describe_pids(cg.pids())
            if failed:
                step(f"sending SIGTERM to {left}", warn=True)
            else:
                step(f"still running after {timeout:g}s: {left}; sending SIGTERM", warn=True)
            cg.signal(signal.SIGTERM)
            if cg.wait_empty(min(TERM_GRACE, timeout)):
                step("stopped by SIGTERM")
                self._reap()
                return warnings
        left = _describe_pids(cg.pids())
        step(f"still running: {left}; killing {cg.describe()} with SIGKILL", warn=True)
        survivors = cg.kill(timeout=KILL_WAIT)
        self._reap()
        if survivors:
            names = _describe_pids(survivors)
            step(f"could not stop {names}: alive {KILL_WAIT:g}s after SIGKILL", warn=True)
        else:
            step("killed")
        return warnings

    def release(self) -> None:
        """Remove the application's cgroup once nothing runs in it (abort): our directory or
        scope only, never a unit of the user's. Problems are logged, not raised."""
        cg = self._cg
        if cg is None or cg.kind == "systemd-unit":
            return
        try:
            cg.remove()
        except AppError as err:
            log.warning("%s", err)
            return
        self._cg = None
        self.handle.cgroup = None


def _describe_pids(pids: list[int]) -> str:
    """'123 (postgres), 456' for pids that may be gone by now."""
    parts = []
    for pid in pids:
        try:
            parts.append(f"{pid} ({psutil.Process(pid).name()})")
        except psutil.Error:
            parts.append(str(pid))
    return ", ".join(parts)
