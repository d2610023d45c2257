"""Application cgroups on this host (root): real cgroup v2 (hybrid layout here), a named v1
hierarchy, and the process-group fallback, with a daemon that double-forks."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator

import pytest

from dmrecover.errors import CommandError
from dmrecover.system import cgroups, command
from dmrecover.system.cgroups import AppCgroup
from tests.apps import daemon_toy

pytestmark = pytest.mark.root

# kill -0 until the pid is gone, as init scripts wait for a daemon
STOP_SCRIPT = 'kill "$1"; while kill -0 "$1" 2>/dev/null; do sleep 0.05; done'


def _toy_log_lines(directory: str) -> int:
    try:
        with open(os.path.join(directory, "toy.log")) as f:
            return len(f.readlines())
    except FileNotFoundError:
        return 0


@pytest.fixture
def cg() -> Iterator[AppCgroup]:
    """A cgroup v2 for one test, killed and removed afterwards whatever happened."""
    if cgroups.cgroup2_root() is None:
        pytest.fail("no cgroup v2 hierarchy on this host")
    group = AppCgroup.create(f"test-{uuid.uuid4().hex[:8]}", kinds=("cgroup2",))
    try:
        yield group
    finally:
        group.kill(timeout=10)
        group.remove()


def test_double_forking_daemon_is_tracked(cg: AppCgroup, tmp_path) -> None:
    pidfile = str(tmp_path / "toy.pid")
    proc = cg.start(daemon_toy.start_argv(str(tmp_path), pidfile))
    assert proc.wait(timeout=10) == 0  # the start command returns once the daemon runs
    daemon = daemon_toy.read_pid(pidfile)
    assert daemon is not None
    with open(f"/proc/{daemon}/stat") as f:
        _state, ppid, _pgid, sid, _start = cgroups.parse_stat(f.read())
    assert ppid != os.getpid() and sid != os.getsid(0)  # reparented, its own session
    assert cg.pids() == [daemon] and cg.owns(daemon) and cg.populated()
    with open(f"/proc/{daemon}/cgroup") as f:
        assert cgroups.parse_proc_cgroup(f.read()).endswith(f"/dmrecover/{cg.name}")
    deadline = time.monotonic() + 5
    while _toy_log_lines(str(tmp_path)) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _toy_log_lines(str(tmp_path)) >= 3
    assert not cg.wait_empty(0.2)  # still running
    command.run(daemon_toy.stop_argv(pidfile, timeout=20), timeout=30)
    t0 = time.monotonic()
    assert cg.wait_empty(10)
    assert time.monotonic() - t0 < 2
    assert not cg.populated() and cg.pids() == []
    assert cg.exit_codes.get(proc.pid) == 0 or proc.returncode == 0
    cg.remove()
    assert not os.path.exists(cg.path)


def test_wait_empty_wakes_on_cgroup_events(cg: AppCgroup) -> None:
    cg.start(["sh", "-c", "(sleep 0.5 &); exit 0"])
    t0 = time.monotonic()
    assert cg.wait_empty(10)
    took = time.monotonic() - t0
    assert 0.3 < took < 1.5  # woken by the event, not by the 1 s safety cap after 10 s


def test_sigterm_then_sigkill(cg: AppCgroup, tmp_path) -> None:
    pidfile = str(tmp_path / "toy.pid")
    proc = cg.start(daemon_toy.start_argv(str(tmp_path), pidfile, ignore_term=True))
    assert proc.wait(timeout=10) == 0
    daemon = daemon_toy.read_pid(pidfile)
    assert cg.signal(signal.SIGTERM) == [daemon]
    assert not cg.wait_empty(0.5)  # it ignores SIGTERM
    assert cg.kill(timeout=10) == []
    assert not cg.populated()
    # dead: gone, or a zombie until its parent (PID 1 here) reaps it
    assert not os.path.exists(f"/proc/{daemon}") or _is_zombie(daemon)


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return cgroups.parse_stat(f.read())[0] == "Z"
    except FileNotFoundError:
        return False


def test_kill_without_cgroup_kill_signals_each_process(cg: AppCgroup,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # kernels before 5.14 have no cgroup.kill: SIGKILL each process until none is left
    real_exists = os.path.exists
    monkeypatch.setattr(cgroups.os.path, "exists",
                        lambda p: False if str(p).endswith("cgroup.kill") else real_exists(p))
    cg.start(["sh", "-c", "trap '' TERM; (trap '' TERM; sleep 60) & sleep 60"])
    deadline = time.monotonic() + 5
    while len(cg.pids()) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(cg.pids()) == 3
    assert cg.kill(timeout=10) == []
    assert cg.pids() == []


def test_stop_script_waiting_on_kill_0_finishes_because_we_reap(cg: AppCgroup) -> None:
    # A foreground server: the session is its parent, so only the session can reap it.
    proc = cg.start(["sleep", "60"])
    stop = ["sh", "-c", STOP_SCRIPT, "stop", str(proc.pid)]
    # without reaping, the zombie answers kill -0 and the stop script waits for ever
    with pytest.raises(CommandError, match="timed out"):
        command.run(stop, timeout=1)
    assert _is_zombie(proc.pid)
    cg.reap_children()
    assert cg.exit_codes[proc.pid] == -signal.SIGTERM
    # with reaping in a thread while the (blocking) stop command runs
    proc = cg.start(["sleep", "60"])
    t0 = time.monotonic()
    with cg.reaping():
        command.run(["sh", "-c", STOP_SCRIPT, "stop", str(proc.pid)], timeout=10)
    assert time.monotonic() - t0 < 3
    assert cg.exit_codes[proc.pid] == -signal.SIGTERM
    assert cg.wait_empty(5)


def test_reaping_never_steals_other_children(cg: AppCgroup) -> None:
    other = subprocess.Popen(["sh", "-c", "exit 7"])  # a child outside the application
    while not _is_zombie(other.pid):
        time.sleep(0.01)
    cg.start(["true"])
    cg.wait_empty(5)
    cg.reap_children()
    assert other.pid not in cg.exit_codes
    assert other.wait(timeout=5) == 7  # its exit code is still there for its owner


def test_start_failure_is_an_app_error(cg: AppCgroup) -> None:
    with pytest.raises(cgroups.AppError, match="not found"):
        cg.start(["/nonexistent/server"])
    assert not cg.populated()


def test_named_v1_hierarchy(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    # where no v2 hierarchy is mounted; a private name and mount point for the test
    name = f"dmrtest{uuid.uuid4().hex[:6]}"
    monkeypatch.setattr(cgroups, "V1_NAME", name)
    monkeypatch.setattr(cgroups, "V1_MOUNT", str(tmp_path / "v1"))
    group = AppCgroup.create("app1", kinds=("cgroup1",))
    try:
        assert group.kind == "cgroup1" and cgroups.v1_named_root() == str(tmp_path / "v1")
        pidfile = str(tmp_path / "toy.pid")
        proc = group.start(daemon_toy.start_argv(str(tmp_path), pidfile))
        assert proc.wait(timeout=10) == 0
        daemon = daemon_toy.read_pid(pidfile)
        assert group.pids() == [daemon]
        group.signal(signal.SIGTERM)
        assert group.wait_empty(10)
        group.remove()
    finally:
        group.kill(timeout=5)
        if os.path.isdir(group.path or ""):
            os.rmdir(group.path)
        command.run(["umount", str(tmp_path / "v1")], check=False, timeout=30)


def test_process_group_fallback(tmp_path) -> None:
    group = AppCgroup.create("pg", kinds=("pgroup",))
    assert group.warning
    try:
        proc = group.start(["sh", "-c", "sleep 60 & exit 0"])
        assert proc.wait(timeout=5) == 0
        pids = group.pids()
        assert len(pids) == 1 and pids[0] != proc.pid  # the background sleep
        assert group.kill(timeout=5) == []
        assert group.wait_empty(1)
    finally:
        group.kill(timeout=5)


def test_command_string_round_trips_through_shlex(tmp_path) -> None:
    argv = daemon_toy.start_argv(str(tmp_path / "with space"), str(tmp_path / "p"))
    assert shlex.split(daemon_toy.command_string(argv)) == argv
