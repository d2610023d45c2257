#!/usr/bin/env python3
"""Power cut during a dm live restore: the guest half (vagrant/run-kernel-tests.sh cuts the
power with `virsh destroy` between `start` and `check`).

    powercut.py start [restore|merge]
                        back up a real ext4 volume, live-restore it with --backend dm and the
                        sample application writing; return once it runs and has acknowledged
                        writes (its session's boot unit is enabled by live-restore)
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
from dmrecover.demo.sampleapp import acknowledged
from dmrecover.session import boot
from dmrecover.system.mounts import mount_at, umount
from tests.apps.livekit import Sandbox
from tests.helpers import images

ROOT = Path("/var/tmp/dmrecover-powercut")
SESSION = "pc"


def _write_durably(path: Path, text: str) -> None:
    """The power is cut right after `start`: what it records must be on disk."""
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.sync()


def start(during: str) -> int:
    if ROOT.exists():
        shutil.rmtree(ROOT)
    ROOT.mkdir(parents=True)
    image = images.make_fs_image(ROOT / "image.img", "ext4", seed=1)
    box = Sandbox(ROOT / "box")
    box.prepare(images, image)
    image.unlink()
    # Slow restore before the power cut (the unit resumes it at full speed after the boot);
    # for a cut during the merge, the merge phase is held open for a minute.
    env = {"DMRECOVER_TEST_RESTORE_DELAY": "0.3" if during == "restore" else "0.02"}
    if during == "merge":
        env["DMRECOVER_TEST_MERGE_PAUSE"] = "60"
    r = box.live_restore(SESSION, "--backend", "dm", env=env)
    assert r.returncode == 0, r.stderr
    box.wait_app(timeout=120)
    time.sleep(4)
    if during == "merge":
        deadline = time.monotonic() + 300
        while box.session(SESSION).get("cutover_phase") != "merge":
            assert time.monotonic() < deadline, box.session(SESSION)["state"]
            time.sleep(0.2)
        time.sleep(1)
    st = box.status(SESSION)
    if during == "restore":
        assert st["state"] == "restoring" and st["percent"] < 90, st
    else:
        assert st["state"] == "cutting-over" and st["phase"] == "merge", st
    acks = acknowledged(str(box.appstate))
    assert len(acks) > 5
    _write_durably(ROOT / "before.json", json.dumps({
        "checksums": box.checksums, "seed_digest": box.seed_digest,
        "backup_id": box.backup_id, "fstype": box.fstype, "acks": len(acks),
        "restored_bytes": st["restored_bytes"]}))
    unit = f"dmrecover-session@{SESSION}.service"
    enabled = Path(f"/etc/systemd/system/multi-user.target.wants/{unit}").exists()
    assert enabled, f"{unit} is not enabled"
    print(f"powercut start: {st['state']} ({st.get('phase') or ''}) at {st['percent']:.0f}%, "
          f"{len(acks)} acknowledged writes, {unit} enabled")
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
        assert not dm.list_owned(SESSION)
        rows, acks = box.verify_dest(images)
        assert acks >= before["acks"], (acks, before["acks"])
        print(f"powercut check: PASS: {acks} acknowledged writes on DEST "
              f"({before['acks']} before the power cut), {rows} rows")
        return 0
    finally:
        boot.disable(SESSION)
        box.teardown()
        if mount_at(str(box.mnt)) is None:
            shutil.rmtree(ROOT, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1] == "start":
        sys.exit(start(sys.argv[2] if len(sys.argv) > 2 else "restore"))
    sys.exit(check())
