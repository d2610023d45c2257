"""The data agent with a daemonizing application (double fork, pid file, a stop script that
waits with `kill -0`), on this host's portable backend: live-restore under load, a cold read,
automatic cutover, every fsync'd line on DEST; a stop command that exits 1, one that hangs
past --stop-timeout (with an application that ignores SIGTERM), a stranger holding the mount
at cutover (refused, the application restarted on the pseudo-volume, then the automatic
retry succeeds once the stranger leaves), and abort of an application that will not stop."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from dmrecover.system.mounts import mount_at
from tests.integration.apps.appkit import SLOW, AppSandbox, gone, toy_commands, wait_daemon
from tests.integration.sandboxes import torn_down

pytestmark = [pytest.mark.root, pytest.mark.slow]


@pytest.fixture
def box(tmp_path: Path, fs_tools, ext4_image: Path):
    with torn_down(AppSandbox(tmp_path)) as sb:
        sb.prepare(fs_tools, ext4_image)
        yield sb


def _toy_lines(path: Path) -> dict[int, list[int]]:
    """pid -> the line numbers it wrote (fsync'd each)."""
    out: dict[int, list[int]] = {}
    for line in path.read_text().splitlines():
        pid, n, _ = line.split()
        out.setdefault(int(pid), []).append(int(n))
    return out


def test_daemon_live_restore_and_auto_cutover(box: AppSandbox) -> None:
    start, stop, pidfile = toy_commands(box)
    r = box.live_restore_app("toy", start, stop, env=SLOW)
    assert r.returncode == 0, r.stderr
    daemon = wait_daemon(pidfile)
    rec = box.session("toy")
    assert rec["state"] == "restoring" and box.on_pseudo_volume()
    assert rec["app_handle"]["cgroup"]["kind"] in ("cgroup2", "systemd-scope")
    assert box.raw_status("toy")["app"]["state"] == "running"  # the daemon, not its starter
    box.cold_read()
    log = box.mnt / "toy.log"
    time.sleep(1)
    seen = len(_toy_lines(log)[daemon])
    assert seen > 5
    done = box.wait_state("toy", ("done", "failed"))
    assert done["state"] == "done", done.get("error")
    assert done["warnings"] == [], done["warnings"]  # the kill -0 stop script just worked
    stop_log = done["app_handle"]["stop_log"] if done["app_handle"].get("stop_log") else []
    assert not box.on_pseudo_volume()
    after = wait_daemon(pidfile, not_pid=daemon)
    assert gone(daemon)
    time.sleep(0.5)
    lines = _toy_lines(log)
    # Every line the first daemon fsync'd is on DEST, in order, and the second writes on.
    first = lines[daemon]
    assert first == list(range(1, len(first) + 1)) and len(first) >= seen
    assert len(lines.get(after, [])) > 0
    assert box.session("toy")["timings"]["cutover_downtime"] < 15
    print(f"daemon: {len(first)} lines before the cutover, stop log {stop_log}")


def test_stop_command_that_exits_1_falls_back_to_sigterm(box: AppSandbox) -> None:
    start, _, pidfile = toy_commands(box)
    r = box.live_restore_app("fail1", start, "false", env=SLOW)
    assert r.returncode == 0, r.stderr
    daemon = wait_daemon(pidfile)
    done = box.wait_state("fail1", ("done", "failed"))
    assert done["state"] == "done", done.get("error")
    w = done["warnings"]
    assert any("failed (exit 1)" in x and "falling back to SIGTERM" in x for x in w), w
    assert gone(daemon)
    assert wait_daemon(pidfile, not_pid=daemon) and not box.on_pseudo_volume()


def test_stop_command_that_hangs_then_sigterm_ignored_then_sigkill(box: AppSandbox) -> None:
    start, _, pidfile = toy_commands(box, ignore_term=True)
    r = box.live_restore_app("hang", start, "sleep 600", "--stop-timeout", "2", env=SLOW)
    assert r.returncode == 0, r.stderr
    daemon = wait_daemon(pidfile)
    done = box.wait_state("hang", ("done", "failed"))
    assert done["state"] == "done", done.get("error")
    w = done["warnings"]
    assert any("timed out after 2s" in x for x in w), w
    assert any("SIGKILL" in x for x in w), w
    assert gone(daemon)
    # stop command (2 s) + SIGTERM grace (2 s) + SIGKILL: well under the stop command's 600
    assert done["timings"]["app_stopped"] - done["timings"]["cutover_started"] < 20
    assert wait_daemon(pidfile, not_pid=daemon) and not box.on_pseudo_volume()


def test_stranger_refuses_the_cutover_then_auto_retry_succeeds(box: AppSandbox) -> None:
    start, stop, pidfile = toy_commands(box)
    r = box.live_restore_app("strange", start, stop, env=SLOW)
    assert r.returncode == 0, r.stderr
    daemon = wait_daemon(pidfile)
    stranger = subprocess.Popen(["sleep", "600"], cwd=box.mnt)
    try:
        rec = box.wait_for("strange", lambda s: "refused" in (s.get("error") or ""),
                           what="refused cutover")
        assert f"{stranger.pid} (sleep)" in rec["error"], rec["error"]
        assert "automatic cutover retries in" in rec["error"]
        assert rec["state"] == "ready"
        # The application was stopped, then started again on the pseudo-volume.
        again = wait_daemon(pidfile, not_pid=daemon)
        assert gone(daemon) and psutil.pid_exists(again)
        assert box.on_pseudo_volume()
        deadline = time.monotonic() + 10
        while "cutover_retry" not in box.raw_status("strange"):  # rewritten every 0.5 s
            assert time.monotonic() < deadline, box.raw_status("strange")
            time.sleep(0.1)
        assert box.raw_status("strange")["cutover_retry"]["attempt"] >= 2
        assert box.status("strange")["app"] == "running"
    finally:
        stranger.kill()
        stranger.wait()
    done = box.wait_state("strange", ("done", "failed"), timeout=120)
    assert done["state"] == "done", done.get("error")
    assert not box.on_pseudo_volume()
    assert wait_daemon(pidfile, not_pid=again)


def test_abort_stops_an_application_that_will_not_stop(box: AppSandbox) -> None:
    start, _, pidfile = toy_commands(box, ignore_term=True)
    r = box.live_restore_app("ab", start, "false", "--stop-timeout", "1", "--cutover",
                             "manual", env=SLOW)
    assert r.returncode == 0, r.stderr
    daemon = wait_daemon(pidfile)
    cg_path = (box.session("ab")["app_handle"].get("cgroup") or {}).get("path")
    r = box.cli("abort", "ab")
    assert r.returncode == 0, r.stderr
    assert gone(daemon)
    assert mount_at(str(box.mnt)) is None and not box.mounts_under()
    rec = box.session("ab")
    assert rec["state"] == "aborted"
    assert any("SIGKILL" in x for x in rec["warnings"]), rec["warnings"]
    # Abort releases the application's cgroup (resume makes a new one): its directory is gone.
    assert (rec["app_handle"] or {}).get("cgroup") is None
    if cg_path:
        assert not os.path.exists(cg_path), "abort removes the application's cgroup"
