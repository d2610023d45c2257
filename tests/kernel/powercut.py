#!/usr/bin/env python3
"""Power cut during a dm or dm-clone live restore: the guest half (vagrant/run-kernel-tests.sh
cuts the power with `virsh destroy` between `start` and `check`).

    powercut.py start WHEN [BACKEND]
                        back up a real ext4 volume, live-restore it with --backend BACKEND (dm
                        by default) and the sample application writing; return once it runs,
                        has acknowledged writes and WHEN has come (its session's boot unit is
                        enabled by live-restore):
                          restore    dm or dm-clone: the background restore is running
                          merge      dm: the restart cutover holds its merge phase open
                          hydration  dm-clone: the kernel is hydrating DEST (some regions
                                     hydrated, not all; restart cutover)
                          swap       dm-clone: the online cutover holds the linear table
                                     loaded, before the swap
    powercut.py check   after the boot: the unit resumed the session (stack rebuilt, the
                        application back, the restore resumed, not restarted), it completes,
                        and DEST alone holds every backed-up file and every acknowledged write

Runs as root in the VM, with the installed dmrecover. State in /var/tmp/dmrecover-powercut.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

from dmrecover.backends.dm import dmsetup as dm
from dmrecover.backends.dm_clone import target
from dmrecover.demo.sampleapp import acknowledged
from dmrecover.session import boot
from dmrecover.system.mounts import mount_at, umount
from tests.apps.livekit import Sandbox
from tests.helpers import images

ROOT = Path("/var/tmp/dmrecover-powercut")
SESSION = "pc"
MiB = 1 << 20
WHEN = {"dm": ("restore", "merge"), "dm-clone": ("restore", "hydration", "swap")}


def _write_durably(path: Path, text: str) -> None:
    """The power is cut right after `start`: what it records must be on disk."""
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.sync()


def _wait(what: str, ready, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert time.monotonic() < deadline, f"{what} did not come within {timeout:g} s"
        time.sleep(0.2)


def start(during: str, backend: str = "dm") -> int:
    assert during in WHEN.get(backend, ()), f"no power cut {during!r} for {backend!r}"
    if ROOT.exists():
        shutil.rmtree(ROOT)
    ROOT.mkdir(parents=True)
    # dm-clone cut during hydration: a larger, mostly empty volume, so that the kernel's copy
    # (one region at a time under the restore delay) is still running at the cut.
    size = 256 * MiB if during == "hydration" else 48 * MiB
    image = images.make_fs_image(ROOT / "image.img", "ext4", size=size, seed=1,
                                 budget=24 * MiB)
    box = Sandbox(ROOT / "box")
    box.prepare(images, image)
    image.unlink()
    # Slow restore before the power cut (the unit resumes it at full speed after the boot);
    # for a cut during the merge or the table swap, that phase is held open for a minute.
    slow = during in ("restore", "hydration")
    env = {"DMRECOVER_TEST_RESTORE_DELAY": "0.3" if slow else "0.02"}
    if not slow:
        env["DMRECOVER_TEST_MERGE_PAUSE"] = "60"
    extra = ["--cutover", "online"] if during == "swap" else []
    r = box.live_restore(SESSION, "--backend", backend, *extra, env=env)
    assert r.returncode == 0, r.stderr
    box.wait_app(timeout=120)
    time.sleep(4)
    clone = dm.dm_name(SESSION, "clone")
    if during == "merge":
        _wait("the merge phase", lambda: box.session(SESSION).get("cutover_phase") == "merge")
        time.sleep(1)
    elif during == "swap":
        _wait("the table swap", lambda: box.session(SESSION).get("online_phase")
              == "reload-linear")
        time.sleep(1)
        assert dm.table(clone).split()[2] == "clone", "the swap has not happened"
    elif during == "hydration":
        _wait("hydration", lambda: target.status(clone).hydrated > 0, timeout=120)
    st = box.status(SESSION)
    note = ""
    if during == "restore":
        assert st["state"] == "restoring" and st["percent"] < 90, st
    elif during == "hydration":  # a mostly empty volume: the percent counts zeros restored
        assert st["state"] == "restoring", st
    elif during == "merge":
        assert st["state"] == "cutting-over" and st["phase"] == "merge", st
    else:
        assert st["state"] == "cutting-over" and st["phase"] == "online-merge", st
    if backend == "dm-clone":
        h = target.status(clone)
        note = f", {h.hydrated}/{h.regions} regions hydrated"
        if during == "hydration":
            assert 0 < h.hydrated < h.regions, "the cut comes during hydration"
    acks = acknowledged(str(box.appstate))
    assert len(acks) > 5
    _write_durably(ROOT / "before.json", json.dumps({
        "checksums": box.checksums, "seed_digest": box.seed_digest,
        "backup_id": box.backup_id, "fstype": box.fstype, "acks": len(acks),
        "restored_bytes": st["restored_bytes"], "backend": backend, "during": during}))
    unit = f"dmrecover-session@{SESSION}.service"
    enabled = Path(f"/etc/systemd/system/multi-user.target.wants/{unit}").exists()
    assert enabled, f"{unit} is not enabled"
    print(f"powercut start ({backend}): {st['state']} ({st.get('phase') or ''}) at "
          f"{st['percent']:.0f}%{note}, {len(acks)} acknowledged writes, {unit} enabled")
    return 0


def check() -> int:
    before = json.loads((ROOT / "before.json").read_text())
    box = Sandbox(ROOT / "box")
    box.checksums = before["checksums"]
    box.seed_digest = before["seed_digest"]
    box.backup_id = before["backup_id"]
    box.fstype = before["fstype"]
    try:
        # The unit brings the session back by itself: the application answers again.
        ping = box.wait_app(timeout=300)
        data = box.session(SESSION)
        assert data.get("resumed"), "the session was resumed"
        print(f"powercut check: application back (pid {ping['pid']}), session "
              f"{data['state']}")
        done = box.wait_state(SESSION, ("done", "failed"), timeout=900)
        assert done["state"] == "done", done.get("error")
        # It resumed the restore instead of starting over: fewer chunks fetched than in all.
        st = box.status(SESSION)
        assert st["state"] == "done"
        box.wait_app(timeout=120)
        box.stop_app()
        umount(str(box.mnt))
        if before.get("during") == "swap":
            # Online: the application ran on the session's device, now linear on DEST.
            clone = dm.dm_name(SESSION, "clone")
            assert dm.table(clone).split()[2] == "linear"
            dm.remove(clone)
        assert not dm.list_owned(SESSION)
        rows, acks = box.verify_dest(images)
        assert acks >= before["acks"], (acks, before["acks"])
        print(f"powercut check ({before.get('backend', 'dm')}, {before.get('during')}): PASS: "
              f"{acks} acknowledged writes on DEST "
              f"({before['acks']} before the power cut), {rows} rows")
        return 0
    finally:
        boot.disable(SESSION)
        box.teardown()
        if mount_at(str(box.mnt)) is None:
            shutil.rmtree(ROOT, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1] == "start":
        sys.exit(start(*(sys.argv[2:4] or ["restore"])))
    sys.exit(check())
