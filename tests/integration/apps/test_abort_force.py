"""`abort` while a process other than the application holds the mount (root, portable backend):
plain abort stops the application, names the stranger and leaves the pseudo-volume mounted
(nothing under the stranger changes); `abort --force` names it too, does not signal it, and
unmounts lazily: nothing is mounted at the mount point, and once the stranger leaves nothing of
the session's stack is left."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

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


def test_abort_refuses_then_abort_force_unmounts_under_a_stranger(box: AppSandbox) -> None:
    start, stop, pidfile = toy_commands(box)
    r = box.live_restore_app("strg", start, stop, "--cutover", "manual", env=SLOW)
    assert r.returncode == 0, r.stderr
    daemon = wait_daemon(pidfile)
    stranger = subprocess.Popen(["sleep", "600"], cwd=box.mnt)
    try:
        r = box.cli("abort", "strg")
        assert r.returncode != 0
        assert f"{stranger.pid} (sleep)" in r.stderr and "abort --force" in r.stderr, r.stderr
        assert gone(daemon, 15), "abort stops the application even when refused"
        assert box.on_pseudo_volume(), "plain abort leaves the mount under the stranger"
        assert box.session("strg")["state"] != "aborted"

        r = box.cli("abort", "--force", "strg")
        assert r.returncode == 0, r.stderr
        assert f"{stranger.pid} (sleep)" in r.stderr and "unmounted lazily" in r.stderr
        assert mount_at(str(box.mnt)) is None, "nothing is mounted at the mount point"
        rec = box.session("strg")
        assert rec["state"] == "aborted"
        assert any("abort --force" in w and f"{stranger.pid} (sleep)" in w
                   for w in rec["warnings"]), rec["warnings"]
        assert stranger.poll() is None, "a stranger is never signalled"
    finally:
        stranger.kill()
        stranger.wait()
    # The stranger gone, the detached filesystem lets go of the session's loop and FUSE file.
    deadline = time.monotonic() + 60
    while (box.mounts_under() or box.loops_under()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not box.mounts_under() and not box.loops_under(), (box.mounts_under(),
                                                              box.loops_under())
