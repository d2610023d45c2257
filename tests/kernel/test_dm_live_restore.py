"""End to end with `--backend dm` on a real kernel: a real application (SQLite, fsync'd
commits) runs on the dm snapshot pseudo-volume while the restore goes on, then the cutover in
restart mode (stop, snapshot-merge into DEST, mount DEST, start) and in online mode (table
swapped in place under the running application). DEST alone is then checked: every backed-up
file, the seed table, every acknowledged write. Nothing of the stack is left behind."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "apps"))
from livekit import Sandbox  # noqa: E402

from dmrecover import dm  # noqa: E402
from dmrecover.mount import mount_at, umount  # noqa: E402

SLOW = {"DMRECOVER_TEST_RESTORE_DELAY": "0.05"}


def dm_state() -> tuple[str, str]:
    """What `dmsetup ls` and `losetup -a` say (compared before and after a session)."""
    ls = subprocess.run(["dmsetup", "ls"], capture_output=True, text=True).stdout
    lo = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    return "\n".join(sorted(ls.splitlines())), "\n".join(sorted(lo.splitlines()))


@pytest.fixture
def box(tmp_path: Path):
    sb = Sandbox(tmp_path)
    before = dm_state()
    try:
        yield sb
    finally:
        sb.teardown()
        # dm devices of this test's sessions (Sandbox.teardown knows mounts and loops only).
        for sdir in sb.state_root.glob("*"):
            for _ in range(3):
                try:
                    dm.remove_owned(sdir.name)
                    break
                except Exception:
                    time.sleep(0.5)
        sb.teardown()
        assert not sb.mounts_under(), "teardown left mounts"
        assert not sb.loops_under(), "teardown left loops"
        assert dm_state() == before, "dm devices or loops left behind"


def _read_unrestored_files(box: Sandbox, count: int = 6) -> None:
    names = sorted(box.checksums)
    for rel in names[-count:] + names[:2]:
        r = box.query({"op": "sha256", "path": rel}, timeout=60)
        assert r == {"ok": True, "sha256": box.checksums[rel]}, rel


def _on_pseudo(box: Sandbox, session: str) -> None:
    m = mount_at(str(box.mnt))
    assert m is not None
    name = dm.dm_name(session, "pseudo")
    assert Path(m.source).resolve() == dm.mapper_path(name).resolve(), m.source
    inf = dm.info(name)
    assert inf is not None and inf.uuid == dm.dm_uuid(session, "pseudo")
    assert " snapshot " in f" {dm.table(name)} "
    assert dm.stable_path(session, "pseudo").resolve() == dm.mapper_path(name).resolve()


@pytest.mark.parametrize("fstype", ["ext4"])
def test_dm_restart_cutover(box: Sandbox, fs_tools, request, fstype: str) -> None:
    box.prepare(fs_tools, request.getfixturevalue(f"{fstype}_image"))
    r = box.live_restore("dmr", "--backend", "dm", env=SLOW)
    assert r.returncode == 0, r.stderr
    pid_before = box.wait_app(timeout=120)["pid"]
    st = box.status("dmr")
    assert st["state"] == "restoring" and st["percent"] < 80
    assert box.session("dmr")["backend"] == "dm"
    _on_pseudo(box, "dmr")
    _read_unrestored_files(box)
    time.sleep(1.0)
    # The application's writes are in the kernel's COW.
    cow = dm.snapshot_status(dm.dm_name("dmr", "pseudo"))
    assert cow.allocated > cow.metadata and not cow.invalid
    mid = box.status("dmr")
    assert mid["demand_fetches"] > 0

    done = box.wait_state("dmr", ("done", "failed"), timeout=600)
    assert done["state"] == "done", done.get("error")
    ping = box.wait_app(timeout=120)
    assert ping["pid"] != pid_before, "restart mode restarts the application"
    # Now on DEST itself (a loop over the DEST file); no dm device of ours is left.
    m = mount_at(str(box.mnt))
    backing = Path(f"/sys/block/{os.path.basename(m.source)}/loop/backing_file").read_text()
    assert backing.strip() == str(box.dest)
    assert not dm.list_owned("dmr")
    assert not (box.state_root / "dmr" / "cow.img").exists()
    n0 = box.query({"op": "count"})["rows"]
    time.sleep(0.5)
    assert box.query({"op": "count"})["rows"] > n0, "the application writes on DEST"
    box.stop_app()
    umount(str(box.mnt))
    time.sleep(0.2)
    rows, acks = box.verify_dest(fs_tools)
    assert acks > 10 and rows >= acks
    print(f"dm restart: {acks} acknowledged writes, downtime "
          f"{done['timings']['cutover_downtime']:.2f} s")


def test_dm_online_cutover(box: Sandbox, fs_tools, request) -> None:
    box.prepare(fs_tools, request.getfixturevalue("ext4_image"))
    r = box.live_restore("dmo", "--backend", "dm", "--cutover", "online", env=SLOW)
    assert r.returncode == 0, r.stderr
    pid = box.wait_app(timeout=120)["pid"]
    _on_pseudo(box, "dmo")
    _read_unrestored_files(box)

    done = box.wait_state("dmo", ("done", "failed"), timeout=600)
    assert done["state"] == "done", done.get("error")
    # The same application process kept running on the same device, now linear on DEST.
    assert box.query({"op": "ping"})["pid"] == pid
    name = dm.dm_name("dmo", "pseudo")
    table = dm.table(name).split()
    assert table[2] == "linear", table
    m = mount_at(str(box.mnt))
    assert Path(m.source).resolve() == dm.mapper_path(name).resolve()
    # Its only dependency is DEST (a loop over the DEST file): origin, FUSE and COW are gone.
    deps = dm.dependencies(name)
    assert len(deps) == 1
    backing = Path(f"/sys/dev/block/{deps[0][0]}:{deps[0][1]}/loop/backing_file").read_text()
    assert backing.strip() == str(box.dest)
    sdir = box.state_root / "dmo"
    assert mount_at(str(sdir / "origin")) is None
    assert not (sdir / "cow.img").exists()
    assert done["timings"]["online_max_pause"] < 5
    n0 = box.query({"op": "count"})["rows"]
    time.sleep(0.5)
    assert box.query({"op": "count"})["rows"] > n0, "the application still writes"
    # cleanup leaves a finished session's device alone (the application runs on it).
    r = box.cli("cleanup", "--dry-run")
    assert name not in r.stdout, r.stdout
    box.stop_app()
    umount(str(box.mnt))
    dm.remove(name)
    time.sleep(0.2)
    rows, acks = box.verify_dest(fs_tools)
    assert acks > 10 and rows >= acks
    print(f"dm online: {acks} acknowledged writes, longest pause "
          f"{done['timings']['online_max_pause'] * 1000:.0f} ms")
