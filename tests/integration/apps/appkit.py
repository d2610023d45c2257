"""Shared by the application tests: a live-restore sandbox for any application (start and stop
commands given as strings), the application's cgroup removed at the end, and the checks every
scenario makes (the pseudo-volume mounted, a cold read, DEST mounted after the cutover)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from dmrecover.system.cgroups import AppCgroup
from dmrecover.system.mounts import mount_at
from tests.apps.livekit import Sandbox

# Seconds the background restorer sleeps per chunk: the application runs during the restore.
SLOW = {"DMRECOVER_TEST_RESTORE_DELAY": "0.06"}


class AppSandbox(Sandbox):
    """A Sandbox whose application is given by --app-start/--app-stop strings."""

    def live_restore_app(self, session: str, start: str, stop: str | None, *extra: str,
                         env: dict[str, str] | None = None):
        args = ["--app-start", start] + (["--app-stop", stop] if stop else [])
        return self.cli("live-restore", "--repo", str(self.repo), self.backup_id,
                        str(self.dest), "--mount", str(self.mnt), "--session", session,
                        *args, *extra, env=env)

    def raw_status(self, name: str) -> dict:
        """status.json as the session process wrote it (app tracking, cutover retry)."""
        return json.loads((self.state_root / name / "status.json").read_text())

    def wait_for(self, name: str, check, timeout: float = 120, what: str = "condition"
                 ) -> dict:
        """Poll session.json until check(record) is true."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = self.session(name)
            if check(s):
                return s
            time.sleep(0.1)
        log = (self.state_root / name / "session.log").read_text()[-3000:]
        raise AssertionError(f"session {name}: no {what} within {timeout}s: "
                             f"{self.session(name)}\n{log}")

    def on_pseudo_volume(self) -> bool:
        """True when the mount point holds the pseudo-volume (a loop over the FUSE file in
        the state dir), False when it holds DEST."""
        m = mount_at(str(self.mnt))
        assert m is not None and m.source.startswith("/dev/loop"), m
        backing = Path(f"/sys/block/{os.path.basename(m.source)}/loop/backing_file")
        return backing.read_text().strip() != str(self.dest)

    def cold_read(self, count: int = 4) -> None:
        """Read backed-up files the restore has likely not reached (the last ones) through
        the mount: fetched on demand, and right."""
        from tests.apps.livekit import sha256_file

        names = sorted(self.checksums)
        for rel in names[-count:]:
            assert sha256_file(self.mnt / rel) == self.checksums[rel], rel

    def teardown(self) -> None:
        super().teardown()
        for sdir in self.state_root.glob("*"):
            try:
                handle = json.loads((sdir / "session.json").read_text()).get("app_handle")
                cg = (handle or {}).get("cgroup")
                if cg and cg.get("kind") != "systemd-unit":
                    group = AppCgroup.from_dict(cg)
                    group.kill(timeout=15)
                    group.remove()
            except (OSError, ValueError) as err:
                print(f"cleanup of the application's cgroup in {sdir}: {err}")
