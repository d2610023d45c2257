"""The application the data agent starts and stops around the pseudo-volume.

Two kinds: start/stop commands (argv, split with shlex, never a shell) or a systemd unit.
A start command may run in the foreground or daemonize; it is started in a new session, so its
process group (pgid = the started pid) names every process it forks unless one of them calls
setsid itself. Stopping runs the stop command (or sends SIGTERM to the process group), waits for
the processes to exit, and after a timeout kills them with SIGKILL and says so.

Which processes hold a mount is `dmrecover.system.processes`' job.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass, field

import psutil

from dmrecover.errors import AppError, UsageError
from dmrecover.system import command, processes
from dmrecover.system.processes import describe

log = logging.getLogger(__name__)

START_GRACE = 0.1  # a start command still running after this long has "started"
STOP_TIMEOUT = 30.0


@dataclass
class AppSpec:
    """How to start and stop the application (persisted in session.json)."""

    start: str | None = None
    stop: str | None = None
    unit: str | None = None

    def validate(self) -> None:
        """Raise UsageError when the spec is incomplete or ambiguous."""
        if self.unit and (self.start or self.stop):
            raise UsageError("give either --app-unit or --app-start/--app-stop, not both")
        if not self.unit and not self.start:
            raise UsageError("no application given",
                             hint="pass --app-start CMD [--app-stop CMD] or --app-unit UNIT")
        for cmd in (self.start, self.stop):
            if cmd is not None:
                try:
                    argv = shlex.split(cmd)
                except ValueError as err:
                    raise UsageError(f"cannot parse command {cmd!r}: {err}") from err
                if not argv:
                    raise UsageError("empty application command")

    def to_dict(self) -> dict:
        return {"start": self.start, "stop": self.stop, "unit": self.unit}

    @classmethod
    def from_dict(cls, d: dict) -> AppSpec:
        return cls(start=d.get("start"), stop=d.get("stop"), unit=d.get("unit"))


@dataclass
class AppHandle:
    """What is known about a started application (persisted so a new process can stop it)."""

    pid: int | None = None
    pgid: int | None = None
    create_time: float | None = None
    started_at: float | None = None
    exit_code: int | None = None
    extra_pids: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"pid": self.pid, "pgid": self.pgid, "create_time": self.create_time,
                "started_at": self.started_at, "exit_code": self.exit_code}

    @classmethod
    def from_dict(cls, d: dict | None) -> AppHandle:
        d = d or {}
        return cls(pid=d.get("pid"), pgid=d.get("pgid"), create_time=d.get("create_time"),
                   started_at=d.get("started_at"), exit_code=d.get("exit_code"))


def processes_holding(mountpoint: str) -> list[psutil.Process]:
    """Thin wrapper: moved to dmrecover.system.processes (kept until its callers move)."""
    return processes.processes_holding(mountpoint)


def group_members(pgid: int) -> list[psutil.Process]:
    """Live (non-zombie) processes in process group pgid."""
    out = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc)
        except (ProcessLookupError, psutil.Error, OSError):
            continue
    return out


def unit_processes(unit: str) -> list[psutil.Process]:
    """Processes in the cgroup of systemd unit `unit` (from /proc/PID/cgroup)."""
    name = unit if "." in unit else f"{unit}.service"
    out = []
    for proc in psutil.process_iter():
        try:
            with open(f"/proc/{proc.pid}/cgroup") as f:
                cg = f.read()
        except OSError:
            continue
        if any(line.rstrip().endswith(f"/{name}") or f"/{name}/" in line
               for line in cg.splitlines()):
            out.append(proc)
    return out


class Application:
    """Starts, stops and watches the application described by an AppSpec."""

    def __init__(self, spec: AppSpec, *, mountpoint: str, log_path: str | None = None,
                 handle: AppHandle | None = None, env: dict[str, str] | None = None,
                 stop_timeout: float = STOP_TIMEOUT) -> None:
        self.spec = spec
        self.mountpoint = os.path.abspath(mountpoint)
        self.log_path = log_path
        self.handle = handle or AppHandle()
        self.env = env
        self.stop_timeout = stop_timeout
        self._popen: psutil.Popen | None = None
        self._stopped = False  # stopped by us: its exit code is not a failure

    # ------------------------------------------------------------------ start

    def start(self) -> AppHandle:
        """Start the application; return once it runs (or raise AppError if it failed)."""
        if self.spec.unit:
            command.run(["systemctl", "start", self.spec.unit], error=AppError,
                        what=f"starting unit {self.spec.unit}", timeout=300)
            self.handle = AppHandle(started_at=time.time())
            return self.handle
        assert self.spec.start
        argv = shlex.split(self.spec.start)
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        env = dict(os.environ)
        if self.env:
            env.update(self.env)
        try:
            log.info("starting application: %s", argv)
            proc = psutil.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, cwd="/", start_new_session=True,
                                close_fds=True, env=env)
        except OSError as err:
            raise AppError(f"cannot start the application {argv[0]}: {err.strerror}",
                           hint="check --app-start") from err
        finally:
            if out is not subprocess.DEVNULL:
                out.close()
        self._popen = proc
        self._stopped = False
        self.handle = AppHandle(pid=proc.pid, pgid=proc.pid, create_time=proc.create_time(),
                                started_at=time.time())
        # A start command that fails at once is a failed start; one that exits 0 has
        # daemonized; one still running after the grace period is a foreground server.
        deadline = time.monotonic() + START_GRACE
        while time.monotonic() < deadline:
            rc = proc.poll()
            if rc is not None:
                self.handle.exit_code = rc
                if rc != 0:
                    raise AppError(f"the application's start command exited with code {rc}",
                                   hint=f"see {self.log_path}" if self.log_path else None)
                break
            time.sleep(0.02)
        return self.handle

    # ------------------------------------------------------------------ state

    def _leader(self) -> psutil.Process | None:
        h = self.handle
        if not h.pid:
            return None
        try:
            p = psutil.Process(h.pid)
            if h.create_time and abs(p.create_time() - h.create_time) > 0.01:
                return None  # pid reused
            if p.status() == psutil.STATUS_ZOMBIE:
                return None
            return p
        except psutil.Error:
            return None

    def processes(self) -> list[psutil.Process]:
        """The application's live processes: the started process and its process group
        (for a systemd unit: the processes in the unit's cgroup)."""
        if self.spec.unit:
            return unit_processes(self.spec.unit)
        procs: dict[int, psutil.Process] = {}
        if self._popen is not None:
            self._popen.poll()  # reap a finished child so it is not counted as a zombie
        leader = self._leader()
        if leader is not None:
            procs[leader.pid] = leader
        if self.handle.pgid:
            for p in group_members(self.handle.pgid):
                procs[p.pid] = p
        return list(procs.values())

    def state(self) -> str:
        """'running', 'stopped', or 'exited (N)'."""
        if self.spec.unit:
            r = command.run(["systemctl", "is-active", self.spec.unit], check=False,
                            timeout=10)
            return "running" if r.stdout.strip() in ("active", "activating", "reloading") \
                else r.stdout.strip() or "stopped"
        if self.processes():
            return "running"
        if self._stopped:
            return "stopped"
        if self._popen is not None:
            rc = self._popen.poll()
            if rc is not None and (self.handle.exit_code is None or rc != 0):
                self.handle.exit_code = rc
        if self.handle.exit_code not in (None, 0):
            return f"exited ({self.handle.exit_code})"
        return "stopped"

    # ------------------------------------------------------------------ stop

    def stop(self, *, timeout: float | None = None) -> list[str]:
        """Stop the application and wait for its processes to exit.

        Returns warnings (e.g. processes that had to be killed). Never leaves a process of the
        application's process group running.
        """
        timeout = self.stop_timeout if timeout is None else timeout
        warnings: list[str] = []
        self._stopped = True
        if self.spec.unit:
            command.run(["systemctl", "stop", self.spec.unit], error=AppError,
                        what=f"stopping unit {self.spec.unit}", timeout=timeout + 30)
        else:
            procs = self.processes()
            # The stop command runs even when no process of ours is seen: a start command
            # whose server left the process group (setsid) is still stopped by it.
            if self.spec.stop:
                try:
                    command.run(shlex.split(self.spec.stop), error=AppError,
                                what="the application's stop command", timeout=timeout)
                except AppError as err:
                    warnings.append(f"{err}; sending SIGTERM")
                    self._signal(procs, signal.SIGTERM)
            elif procs:
                self._signal(procs, signal.SIGTERM)
        # Wait for the application's processes; anything else still holding the mount makes
        # the unmount refuse (and name it) rather than being killed here.
        deadline = time.monotonic() + timeout
        while True:
            procs = self.processes()
            if not procs:
                break
            if time.monotonic() >= deadline:
                msg = (f"application processes did not exit within {timeout:g}s; "
                       f"killed {describe(procs)} with SIGKILL")
                log.warning(msg)
                warnings.append(msg)
                self._signal(procs, signal.SIGKILL)
                psutil.wait_procs(procs, timeout=5)
                break
            time.sleep(0.05)
        if self._popen is not None:
            try:
                self._popen.wait(timeout=1)
            except (psutil.TimeoutExpired, subprocess.TimeoutExpired):
                pass
        return warnings

    @staticmethod
    def _signal(procs: list[psutil.Process], sig: int) -> None:
        for p in procs:
            try:
                p.send_signal(sig)
            except psutil.Error:
                pass
