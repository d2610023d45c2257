"""The application agent with real processes (no root needed): start in the foreground or
daemonized, stop by command or SIGTERM, SIGKILL after the timeout (and saying so), failed
starts, and processes_holding() finding cwd and open-file holders."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from dmrecover.errors import AppError, UsageError
from dmrecover.session.app import AppHandle, Application, AppSpec, processes_holding

PY = sys.executable


def _app(tmp_path: Path, start: str, stop: str | None = None, timeout: float = 5.0
         ) -> Application:
    return Application(AppSpec(start=start, stop=stop), mountpoint=str(tmp_path),
                       log_path=str(tmp_path / "app.log"), stop_timeout=timeout)


def test_spec_validation() -> None:
    with pytest.raises(UsageError, match="no application"):
        AppSpec().validate()
    with pytest.raises(UsageError, match="not both"):
        AppSpec(start="a", unit="b.service").validate()
    with pytest.raises(UsageError, match="cannot parse"):
        AppSpec(start="echo 'unterminated").validate()
    AppSpec(start="sleep 1", stop="true").validate()
    AppSpec(unit="x.service").validate()
    spec = AppSpec(start="a b", stop="c")
    assert AppSpec.from_dict(spec.to_dict()) == spec


def test_foreground_app_stopped_with_sigterm(tmp_path: Path) -> None:
    app = _app(tmp_path, "sleep 60")
    h = app.start()
    assert h.pid and h.pgid == h.pid
    assert app.state() == "running"
    t = time.monotonic()
    assert app.stop() == []
    assert time.monotonic() - t < 3
    assert app.state() == "stopped"
    assert not psutil.pid_exists(h.pid) or psutil.Process(h.pid).status() == "zombie"


def test_stop_command_is_used(tmp_path: Path) -> None:
    flag = tmp_path / "stop-ran"
    # The app exits when the flag appears; the stop command creates it.
    app = _app(tmp_path,
               f"{PY} -c \"import os,time\nwhile not os.path.exists('{flag}'): time.sleep(0.02)\"",
               stop=f"touch {flag}")
    app.start()
    assert app.state() == "running"
    assert app.stop() == []
    assert flag.exists()
    assert app.state() == "stopped"


def test_stubborn_app_is_killed_and_reported(tmp_path: Path) -> None:
    code = "import signal,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    app = _app(tmp_path, f"{PY} -c '{code}'", timeout=0.7)
    h = app.start()
    time.sleep(0.2)  # let it install its handler
    warnings = app.stop()
    assert len(warnings) == 1 and "SIGKILL" in warnings[0] and str(h.pid) in warnings[0]
    assert app.processes() == []


def test_daemonizing_start_command_is_tracked_by_process_group(tmp_path: Path) -> None:
    code = "import os,time\nif os.fork(): os._exit(0)\ntime.sleep(60)"
    app = _app(tmp_path, f"{PY} -c '{code}'")
    h = app.start()
    time.sleep(0.3)
    assert h.exit_code == 0
    procs = app.processes()
    assert len(procs) == 1 and procs[0].pid != h.pid  # the daemon child, same group
    assert app.state() == "running"
    # A new Application built from the persisted handle (a resumed session) can stop it.
    again = Application(app.spec, mountpoint=str(tmp_path),
                        handle=AppHandle.from_dict(h.to_dict()), stop_timeout=5)
    assert [p.pid for p in again.processes()] == [procs[0].pid]
    again.stop()
    assert again.processes() == []


def test_failed_start_raises(tmp_path: Path) -> None:
    app = _app(tmp_path, f"{PY} -c 'import sys; sys.exit(3)'")
    with pytest.raises(AppError, match="code 3"):
        app.start()
    with pytest.raises(AppError, match="cannot start"):
        _app(tmp_path, "/nonexistent/program").start()


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


def test_stop_command_reaches_a_daemon_that_left_the_process_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "daemon.pid"
    start = ("import os,time\nif os.fork(): os._exit(0)\nos.setsid()\n"
             f'open("{pidfile}","w").write(str(os.getpid()))\ntime.sleep(60)')
    stop = f'import os,signal; os.kill(int(open("{pidfile}").read()), signal.SIGTERM)'
    app = _app(tmp_path, f"{PY} -c '{start}'", stop=f"{PY} -c '{stop}'")
    app.start()
    deadline = time.monotonic() + 5
    while not pidfile.exists() or not pidfile.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    daemon = psutil.Process(int(pidfile.read_text()))
    assert app.processes() == []  # out of our sight: its own session and group
    app.stop()
    daemon.wait(5)
    assert not daemon.is_running()
