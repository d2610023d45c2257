"""The application agent (no root): the stop escalation with a fake cgroup (stop command,
wait, SIGTERM, SIGKILL, each step in the stop log; a failing or hanging stop command is a
warning, never an exception), and real processes tracked by process group (the fallback kind,
the only one a non-root test can make): foreground and daemonizing start commands, a stop
script that waits with `kill -0` for the start command's pid, failed starts, the handle
persisted and restored."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from dmrecover.errors import AppError, UsageError
from dmrecover.session import app as appmod
from dmrecover.session.app import AppHandle, Application, AppSpec, cgroup_name, processes_holding
from dmrecover.system.cgroups import AppCgroup

PY = sys.executable


class FakeCgroup:
    """An AppCgroup stand-in: `alive` processes that go away when told to (by the stop
    command having run, by SIGTERM, by SIGKILL) or never."""

    kind = "cgroup2"
    warning = None

    def __init__(self, *, stops_on: set[str], survive_kill: bool = False) -> None:
        self.stops_on = stops_on  # "command", "SIGTERM", "SIGKILL"
        self.survive_kill = survive_kill
        self.alive = [4242]
        self.events: list[str] = []
        self.exit_codes: dict[int, int] = {}
        self.reaping_active = False

    def describe(self) -> str:
        return "cgroup2 /fake"

    def to_dict(self) -> dict:
        return {"kind": "cgroup2", "name": "fake", "path": "/fake"}

    def populated(self) -> bool:
        return bool(self.alive)

    def pids(self) -> list[int]:
        return list(self.alive)

    def wait_empty(self, timeout: float) -> bool:
        self.events.append(f"wait {timeout:.0f}")
        return not self.alive

    def signal(self, sig: int) -> list[int]:
        name = signal.Signals(sig).name
        self.events.append(name)
        if name in self.stops_on:
            self.alive = []
        return [4242]

    def kill(self, timeout: float = 10.0) -> list[int]:
        self.events.append("SIGKILL")
        if not self.survive_kill:
            self.alive = []
        return list(self.alive)

    def reap_children(self) -> dict[int, int]:
        return {}

    @contextlib.contextmanager
    def reaping(self) -> Iterator[None]:
        self.events.append("reaping")
        self.reaping_active = True
        try:
            yield
        finally:
            self.reaping_active = False
            if "command" in self.stops_on:
                self.alive = []


def _with_fake(stop: str | None, cg: FakeCgroup, timeout: float = 5.0) -> Application:
    app = Application(AppSpec(start="unused", stop=stop, stop_timeout=timeout),
                      mountpoint="/nonexistent")
    app._cg = cg  # type: ignore[assignment]
    return app


def test_spec_validation() -> None:
    with pytest.raises(UsageError, match="no application"):
        AppSpec().validate()
    with pytest.raises(UsageError, match="not both"):
        AppSpec(start="a", unit="b.service").validate()
    with pytest.raises(UsageError, match="cannot parse"):
        AppSpec(start="echo 'unterminated").validate()
    with pytest.raises(UsageError, match="stop-timeout"):
        AppSpec(start="a", stop_timeout=0).validate()
    AppSpec(start="sleep 1", stop="true").validate()
    AppSpec(unit="x.service").validate()
    spec = AppSpec(start="a b", stop="c", stop_timeout=7.5)
    assert AppSpec.from_dict(spec.to_dict()) == spec
    assert AppSpec.from_dict({"start": "a"}).stop_timeout == appmod.STOP_TIMEOUT  # version 1


def test_cgroup_name_is_unique_per_state_dir() -> None:
    a, b = cgroup_name("db", "/var/lib/dmrecover/db"), cgroup_name("db", "/tmp/x/db")
    assert a != b and a.startswith("db-") and a == cgroup_name("db", "/var/lib/dmrecover/db/")


def test_stop_command_that_works_is_all_it_takes() -> None:
    cg = FakeCgroup(stops_on={"command"})
    app = _with_fake("true", cg)
    assert app.stop() == []
    assert cg.events == ["reaping", "wait 5"]
    assert [line.split(maxsplit=1)[1] for line in app.handle.stop_log] == [
        "running the stop command", "the stop command exited 0", "stopped"]


def test_stop_command_that_exits_1_falls_back_to_sigterm_at_once() -> None:
    cg = FakeCgroup(stops_on={"SIGTERM"})
    app = _with_fake("false", cg, timeout=60)
    t = time.monotonic()
    warnings = app.stop()
    assert time.monotonic() - t < 10  # not the whole stop timeout
    assert cg.events == ["reaping", "wait 0", "SIGTERM", "wait 10"]
    assert "exit" in warnings[0] and "falling back to SIGTERM" in warnings[0]
    assert warnings[1].startswith("sending SIGTERM to")
    assert app.handle.stop_log[-1].endswith("stopped by SIGTERM")


def test_stop_command_that_hangs_is_cut_at_the_timeout_then_killed() -> None:
    cg = FakeCgroup(stops_on={"SIGKILL"})
    app = _with_fake("sleep 30", cg, timeout=0.5)
    t = time.monotonic()
    warnings = app.stop()
    assert time.monotonic() - t < 10
    assert cg.events == ["reaping", "wait 0", "SIGTERM", "wait 0", "SIGKILL"]
    assert "timed out after 0.5s" in warnings[0]
    assert "SIGKILL" in warnings[-1]
    assert app.handle.stop_log[-1].endswith("killed")


def test_application_ignoring_its_stop_command_is_terminated_after_the_timeout() -> None:
    cg = FakeCgroup(stops_on={"SIGTERM"})
    app = _with_fake("true", cg, timeout=3)
    warnings = app.stop()
    assert cg.events == ["reaping", "wait 3", "SIGTERM", "wait 3"]
    assert warnings and "still running after 3s" in warnings[0]


def test_no_stop_command_means_sigterm_then_sigkill() -> None:
    cg = FakeCgroup(stops_on=set())
    app = _with_fake(None, cg, timeout=2)
    warnings = app.stop()
    assert cg.events == ["SIGTERM", "wait 2", "SIGKILL"]  # no second SIGTERM
    assert len(warnings) == 1 and "SIGKILL" in warnings[0]


def test_survivors_of_sigkill_are_named() -> None:
    cg = FakeCgroup(stops_on=set(), survive_kill=True)
    app = _with_fake("false", cg, timeout=1)
    warnings = app.stop()
    assert warnings[-1].startswith("could not stop 4242")


def test_never_started_has_nothing_to_stop() -> None:
    app = Application(AppSpec(start="x"), mountpoint="/nonexistent")
    assert app.stop() == [] and app.processes() == [] and app.state() == "stopped"


# ---------------------------------------------------------------- real processes (pgroup)

def _app(tmp_path: Path, start: str, stop: str | None = None, timeout: float = 5.0
         ) -> Application:
    return Application(AppSpec(start=start, stop=stop, stop_timeout=timeout),
                       mountpoint=str(tmp_path), log_path=str(tmp_path / "app.log"),
                       name="unit-test", kinds=("pgroup",))


def test_foreground_app_stopped_with_sigterm(tmp_path: Path) -> None:
    app = _app(tmp_path, "sleep 60")
    h = app.start()
    assert h.pid and h.cgroup and h.cgroup["kind"] == "pgroup"
    assert app.state() == "running"
    assert "process group" in (app.tracking_warning or "") or app.tracking_warning
    t = time.monotonic()
    assert app.stop() == []
    assert time.monotonic() - t < 4
    assert app.state() == "stopped"
    assert not psutil.pid_exists(h.pid)  # reaped, not a zombie


def test_stop_script_waiting_with_kill_0_on_our_child_finishes(tmp_path: Path) -> None:
    """The start command stays our child; the stop script kills it and waits for its pid
    to vanish: only our reaping makes that happen."""
    start = f"{PY} -c 'import time; time.sleep(60)'"
    app = _app(tmp_path, start, timeout=20)
    h = app.start()
    stop = (f"{PY} -c 'import os,signal,time\nos.kill({h.pid}, signal.SIGTERM)\n"
            f"while True:\n  try: os.kill({h.pid}, 0)\n  except ProcessLookupError: break\n"
            "  time.sleep(0.05)'")
    app.spec.stop = stop
    t = time.monotonic()
    assert app.stop() == []
    assert time.monotonic() - t < 10
    assert any(line.endswith("the stop command exited 0") for line in app.handle.stop_log)


def test_daemonizing_start_command_is_tracked_and_restored_from_the_handle(tmp_path: Path
                                                                           ) -> None:
    code = "import os,time\nif os.fork(): os._exit(0)\ntime.sleep(60)"
    app = _app(tmp_path, f"{PY} -c '{code}'")
    h = app.start()
    deadline = time.monotonic() + 5
    while h.exit_code is None and time.monotonic() < deadline:
        app.state()  # reaps the start command
        time.sleep(0.05)
    assert h.exit_code == 0
    procs = app.processes()
    assert len(procs) == 1 and procs[0].pid != h.pid  # the daemon
    assert app.state() == "running"
    # A new Application built from the persisted handle (a resumed session) can stop it.
    again = Application(app.spec, mountpoint=str(tmp_path),
                        handle=AppHandle.from_dict(h.to_dict()))
    assert [p.pid for p in again.processes()] == [procs[0].pid]
    assert again.stop() == []
    assert again.processes() == []


def test_failed_start_raises(tmp_path: Path) -> None:
    app = _app(tmp_path, "sh -c 'exit 3'")
    with pytest.raises(AppError, match="code 3"):
        app.start()
    with pytest.raises(AppError, match="cannot start"):
        _app(tmp_path, "/nonexistent/program").start()


def test_handle_round_trip() -> None:
    cg = AppCgroup("cgroup2", "x", path="/sys/fs/cgroup/dmrecover/x")
    h = AppHandle(pid=5, started_at=1.0, cgroup=cg.to_dict(), stop_log=["  0.0s stopped"])
    assert AppHandle.from_dict(h.to_dict()) == h
    assert AppHandle.from_dict({"pid": 3, "pgid": 3}).cgroup is None  # a version-1 record


def test_processes_holding(tmp_path: Path) -> None:
    inside = tmp_path / "mnt"
    inside.mkdir()
    (inside / "f").write_text("x")
    cwd_holder = subprocess.Popen(["sleep", "30"], cwd=inside)
    file_holder = subprocess.Popen([PY, "-c", f"f=open('{inside / 'f'}'); import time; "
                                    "print('ok', flush=True); time.sleep(30)"],
                                   stdout=subprocess.PIPE, cwd="/")
    other = subprocess.Popen(["sleep", "30"], cwd="/")
    try:
        assert file_holder.stdout.readline().strip() == b"ok"
        pids = {p.pid for p in processes_holding(str(inside))}
        assert cwd_holder.pid in pids and file_holder.pid in pids
        assert other.pid not in pids
        # A sibling with a common prefix is not "inside".
        assert not processes_holding(str(tmp_path / "mn"))
    finally:
        for p in (cwd_holder, file_holder, other):
            p.kill()
            p.wait()
