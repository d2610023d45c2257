"""LVM-backed overlay and DEST on a real volume group (two loop PVs over sparse files).

`--overlay VG` puts the dm COW (or the dm-clone metadata) on a new LV of the session, tagged
`dmrecover` + `dmrecover_session_<name>`, removed after the cutover; `--dest-vg VG` creates DEST
as an LV of the backup's size, which stays. An LV that dmrecover did not create is never
removed, and a name it would use is refused; a VG without room is refused in one line.
`cleanup` removes the LVs of a start killed between its lvcreate and its record (DEST's too),
and leaves those of a start paused there alone (it holds the state dir's lock).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from dmrecover import testhooks
from dmrecover.backends.dm import dmsetup as dm
from dmrecover.backends.dm.stack import cow_size
from dmrecover.backends.dm_clone import target
from dmrecover.system import lvm
from dmrecover.system.mounts import mount_at, umount
from tests.apps.livekit import ENV_KEYS, Sandbox
from tests.kernel.kernelutil import sh
from tests.kernel.test_dm_live_restore import SLOW, _read_unrestored_files, box  # noqa: F401

MiB = 1 << 20


def make_vg(tmp: Path, pv_size: int) -> Iterator[str]:
    name = f"dmrt{uuid.uuid4().hex[:6]}"
    devs = []
    try:
        for i in range(2):
            f = tmp / f"{name}-pv{i}.img"
            with open(f, "wb") as fh:
                fh.truncate(pv_size)
            devs.append(sh("losetup", "-f", "--show", str(f)).strip())
        sh("pvcreate", "-q", *devs)
        sh("vgcreate", "-q", name, *devs)
        yield name
    finally:
        subprocess.run(["vgremove", "-q", "-ff", name], capture_output=True)
        for dev in devs:
            subprocess.run(["pvremove", "-q", "-ff", dev], capture_output=True)
            subprocess.run(["losetup", "-d", dev], capture_output=True)


@pytest.fixture
def vg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A volume group on two 128 MiB loop PVs (outside the sandbox's tree)."""
    yield from make_vg(tmp_path_factory.mktemp("pv"), 128 * MiB)


@pytest.fixture
def small_vg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Two 24 MiB PVs: too little for a 48 MiB volume's COW."""
    yield from make_vg(tmp_path_factory.mktemp("pvs"), 24 * MiB)


def lvs(vg: str) -> dict[str, dict]:
    out = sh("lvs", "--reportformat", "json", "--units", "b", "--nosuffix",
             "-o", "lv_name,lv_tags,lv_size", vg)
    rows = json.loads(out)["report"][0]["lv"]
    return {r["lv_name"]: {"tags": set(filter(None, r["lv_tags"].split(","))),
                           "size": int(r["lv_size"])} for r in rows}


def assert_ours(info: dict, session: str, role: str) -> None:
    assert {"dmrecover", f"dmrecover_session_{session}", f"dmrecover_role_{role}"} \
        <= info["tags"], info


def dev_of(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return os.major(st.st_rdev), os.minor(st.st_rdev)


def test_cow_on_an_lv_restart_cutover(vg: str, box: Sandbox,  # noqa: F811
         fs_tools, request) -> None:
    box.prepare(fs_tools, request.getfixturevalue("ext4_image"))
    r = box.live_restore("lc", "--backend", "dm", "--overlay", vg, env=SLOW)
    assert r.returncode == 0, r.stderr
    assert "CRITICAL" not in r.stderr and "DBus" not in r.stderr, r.stderr
    box.wait_app(timeout=120)
    have = lvs(vg)
    info = have["dmrecover-lc-cow"]
    assert_ours(info, "lc", "cow")
    assert cow_size(box.size) <= info["size"] < cow_size(box.size) + 8 * MiB
    rec = box.session("lc")
    assert rec["lvs"] == [{"vg": vg, "name": "dmrecover-lc-cow", "role": "cow",
                           "size": info["size"]}]
    link = box.state_root / "lc" / "cow.img"
    assert os.readlink(link) == f"/dev/{vg}/dmrecover-lc-cow"
    # The snapshot's COW is the LV itself (no loop in between).
    deps = dm.dependencies(dm.dm_name("lc", "pseudo"))
    assert dev_of(f"/dev/{vg}/dmrecover-lc-cow") in deps, deps
    _read_unrestored_files(box)

    done = box.wait_state("lc", ("done", "failed"), timeout=600)
    assert done["state"] == "done", done.get("error")
    box.wait_app(timeout=120)
    assert "dmrecover-lc-cow" not in lvs(vg), "the merged COW's LV is removed"
    assert not link.exists() and not link.is_symlink()
    box.stop_app()
    umount(str(box.mnt))
    rows, acks = box.verify_dest(fs_tools)
    assert acks > 10 and rows >= acks


def test_clone_metadata_on_an_lv(vg: str, box: Sandbox,  # noqa: F811
         fs_tools, request) -> None:
    box.prepare(fs_tools, request.getfixturevalue("ext4_image"))
    r = box.live_restore("lm", "--backend", "dm-clone", "--overlay", vg, "--cutover",
                         "online", env=SLOW)
    assert r.returncode == 0, r.stderr
    pid = box.wait_app(timeout=120)["pid"]
    info = lvs(vg)["dmrecover-lm-meta"]
    assert_ours(info, "lm", "meta")
    assert target.metadata_size(box.size) <= info["size"]
    deps = dm.dependencies(dm.dm_name("lm", "clone"))
    assert dev_of(f"/dev/{vg}/dmrecover-lm-meta") in deps, deps
    _read_unrestored_files(box)
    done = box.wait_state("lm", ("done", "failed"), timeout=600)
    assert done["state"] == "done", done.get("error")
    assert box.query({"op": "ping"})["pid"] == pid
    assert "dmrecover-lm-meta" not in lvs(vg)
    box.stop_app()
    umount(str(box.mnt))
    name = dm.dm_name("lm", "clone")
    if dm.info(name) is not None:
        dm.remove(name)
    rows, acks = box.verify_dest(fs_tools)
    assert acks > 10 and rows >= acks


def test_dest_on_a_new_lv_stays_after_the_cutover(vg: str, box: Sandbox,  # noqa: F811
         fs_tools,
                                                   request) -> None:
    box.prepare(fs_tools, request.getfixturevalue("ext4_image"))
    r = box.cli("live-restore", "--repo", str(box.repo), box.backup_id, "--dest-vg", vg,
                "--mount", str(box.mnt), "--session", "ld", *box.app_args(),
                "--backend", "dm", "--overlay", vg, env=SLOW)
    assert r.returncode == 0, r.stderr
    box.wait_app(timeout=120)
    have = lvs(vg)
    assert_ours(have["ld"], "ld", "dest")
    assert box.size <= have["ld"]["size"] < box.size + 8 * MiB
    assert_ours(have["dmrecover-ld-cow"], "ld", "cow")
    assert box.session("ld")["dest"] == f"/dev/{vg}/ld"
    done = box.wait_state("ld", ("done", "failed"), timeout=600)
    assert done["state"] == "done", done.get("error")
    box.wait_app(timeout=120)
    have = lvs(vg)
    assert "ld" in have and "dmrecover-ld-cow" not in have
    m = mount_at(str(box.mnt))
    assert dev_of(m.source) == dev_of(f"/dev/{vg}/ld"), "the application runs on the LV"
    # Neither cleanup nor forget removes the DEST LV of a finished session.
    assert f"{vg}/ld" not in box.cli("cleanup", "--dry-run").stdout
    box.stop_app()
    umount(str(box.mnt))
    r = box.cli("forget", "ld")
    assert r.returncode == 0, r.stderr
    assert "ld" in lvs(vg)
    box.dest = Path(f"/dev/{vg}/ld")
    rows, acks = box.verify_dest(fs_tools)
    assert acks > 10 and rows >= acks
    sh("lvremove", "-q", "-f", f"{vg}/ld")  # the test's own: the box compares dm devices


def test_abort_keeps_lvs_forget_and_cleanup_remove_only_ours(vg: str, box: Sandbox,  # noqa: F811
         fs_tools,
                                                             request) -> None:
    box.prepare(fs_tools, request.getfixturevalue("ext4_image"))
    # An LV that dmrecover did not create, with the name a session "lx" would use.
    sh("lvcreate", "-q", "-y", "-n", "dmrecover-lx-cow", "-L", "8M", vg)
    try:
        _abort_forget_cleanup(vg, box)
    finally:  # the test's own LV (the box compares dm devices before and after)
        subprocess.run(["lvremove", "-q", "-f", f"{vg}/dmrecover-lx-cow"],
                       capture_output=True)


def _abort_forget_cleanup(vg: str, box: Sandbox) -> None:  # noqa: F811
    r = box.live_restore("lx", "--backend", "dm", "--overlay", vg)
    assert r.returncode != 0
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "not created by dmrecover" in err[0], r.stderr
    assert set(lvs(vg)) == {"dmrecover-lx-cow"}
    assert not (box.state_root / "lx" / "session.json").exists()

    r = box.live_restore("la", "--backend", "dm", "--overlay", vg, env=SLOW)
    assert r.returncode == 0, r.stderr
    box.wait_app(timeout=120)
    assert "dmrecover-la-cow" in lvs(vg)
    r = box.cli("abort", "la")
    assert r.returncode == 0, r.stderr
    # Aborted: the COW LV holds the application's writes (resume continues from them).
    assert "dmrecover-la-cow" in lvs(vg)
    r = box.cli("forget", "la")
    assert r.returncode != 0 and "--discard-overlay" in r.stderr, r.stderr
    r = box.cli("forget", "la", "--discard-overlay")
    assert r.returncode == 0, r.stderr
    assert "dmrecover-la-cow" not in lvs(vg)

    # An orphan (a start that died between lvcreate and its record): cleanup removes it;
    # the untagged LV stays whatever cleanup does.
    orphan_dir = box.state_root / "gone"
    sh("lvcreate", "-q", "-y", "-n", "dmrecover-gone-cow", "-L", "8M", "--addtag",
       "dmrecover", "--addtag", "dmrecover_session_gone", "--addtag", "dmrecover_role_cow",
       "--addtag", f"dmrecover_state_{orphan_dir}", vg)
    r = box.cli("cleanup", "--dry-run")
    assert f"{vg}/dmrecover-gone-cow" in r.stdout and "dmrecover-lx-cow" not in r.stdout
    r = box.cli("cleanup")
    assert r.returncode == 0, r.stderr
    assert set(lvs(vg)) == {"dmrecover-lx-cow"}


def test_vg_without_room_refused(small_vg: str, box: Sandbox,  # noqa: F811
         fs_tools, request) -> None:
    box.prepare(fs_tools, request.getfixturevalue("ext4_image"))
    r = box.live_restore("ln", "--backend", "dm", "--overlay", small_vg)
    assert r.returncode != 0
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and f"volume group {small_vg} has" in err[0], r.stderr
    assert lvs(small_vg) == {}
    r = box.live_restore("ln", "--backend", "dm", "--overlay", "novg" + uuid.uuid4().hex[:4])
    assert r.returncode != 0 and "no such LVM volume group" in r.stderr, r.stderr
    r = box.live_restore("ln", "--backend", "fuse", "--overlay", small_vg)
    assert r.returncode != 0 and "needs the dm or dm-clone backend" in r.stderr, r.stderr
    assert lvs(small_vg) == {}
    assert not (box.state_root / "ln" / "session.json").exists()


# ---------------------------------------------------------------- a start between lvcreate
# and its record (the test hook pauses it there: testhooks.pause_point("lvs-created"))

def start_paused(sb: Sandbox, session: str, mnt: Path, pause: Path,
                 *extra: str) -> subprocess.Popen[str]:
    """`live-restore` (dm backend, DEST and COW as new LVs: `extra`) as a process that pauses
    once its LVs exist, before its record is written, until `pause` is removed."""
    env = {k: v for k, v in os.environ.items() if k not in ENV_KEYS}
    env.update(sb.env)
    env.update({testhooks.PAUSE_AT_ENV: "lvs-created", testhooks.PAUSE_FILE_ENV: str(pause)})
    return subprocess.Popen(
        [sys.executable, "-m", "dmrecover", "live-restore", "--repo", str(sb.repo),
         sb.backup_id, "--mount", str(mnt), "--session", session, *sb.app_args(),
         "--backend", "dm", *extra], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, cwd="/")


def wait_paused(proc: subprocess.Popen[str], pause: Path, timeout: float = 300) -> int:
    """The paused start's pid, once it is in the window."""
    deadline = time.monotonic() + timeout
    while not pause.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the start ended ({proc.returncode}) before the pause: "
                                 f"{proc.stderr.read() if proc.stderr else ''}")
        assert time.monotonic() < deadline, "the start never reached the pause"
        time.sleep(0.05)
    return int(pause.read_text())


def test_cleanup_removes_the_lvs_of_a_start_killed_before_its_record(
        vg: str, box: Sandbox, fs_tools, request) -> None:  # noqa: F811
    box.prepare(fs_tools, request.getfixturevalue("ext4_image"))
    sh("lvcreate", "-q", "-y", "-n", "notours", "-L", "8M", vg)  # dmrecover's never to touch
    try:
        # Another session, running, with a DEST LV and a COW LV of its own.
        r = box.cli("live-restore", "--repo", str(box.repo), box.backup_id, "--dest-vg", vg,
                    "--mount", str(box.mnt), "--session", "lr", *box.app_args(),
                    "--backend", "dm", "--overlay", vg, "--cutover", "manual")
        assert r.returncode == 0, r.stderr
        box.wait_app(timeout=120)
        mnt2 = box.tmp / "mnt2"
        mnt2.mkdir()
        pause = box.tmp / "pause-lk"
        proc = start_paused(box, "lk", mnt2, pause, "--dest-vg", vg, "--overlay", vg)
        try:
            pid = wait_paused(proc, pause)
            assert pid == proc.pid
            have = lvs(vg)
            assert_ours(have["lk"], "lk", "dest")
            assert_ours(have["dmrecover-lk-cow"], "lk", "cow")
            os.kill(pid, signal.SIGKILL)  # a crash between lvcreate and the record
        finally:
            proc.kill()
            proc.communicate(timeout=60)
        sdir = box.state_root / "lk"
        assert not (sdir / "session.json").exists()
        assert (sdir / lvm.INTENT_FILE).exists()

        dry = box.cli("cleanup", "--dry-run")
        assert dry.returncode == 0, dry.stderr
        assert f"{vg}/lk" in dry.stdout and f"{vg}/dmrecover-lk-cow" in dry.stdout, dry.stdout
        assert f"{vg}/lr" not in dry.stdout and "dmrecover-lr-cow" not in dry.stdout
        assert "notours" not in dry.stdout
        r = box.cli("cleanup")
        assert r.returncode == 0, r.stdout + r.stderr
        assert set(lvs(vg)) == {"lr", "dmrecover-lr-cow", "notours"}, "only lk's LVs go"
        assert not (sdir / lvm.INTENT_FILE).exists()
        assert box.session("lr")["state"] in ("restoring", "ready")
        box.query({"op": "ping"})  # the other session's application runs on

        r = box.cli("abort", "lr")
        assert r.returncode == 0, r.stderr
        r = box.cli("forget", "lr", "--discard-overlay")
        assert r.returncode == 0, r.stderr
        assert set(lvs(vg)) == {"notours"}
    finally:  # the test's own LV (the box compares dm devices before and after)
        subprocess.run(["lvremove", "-q", "-f", f"{vg}/notours"], capture_output=True)


def test_cleanup_during_a_start_leaves_its_lvs_and_the_start_completes(
        vg: str, box: Sandbox, fs_tools, request) -> None:  # noqa: F811
    box.prepare(fs_tools, request.getfixturevalue("ext4_image"))
    pause = box.tmp / "pause-lp"
    # manual cutover: it stays running (ready) once restored, so abort then forget end it
    proc = start_paused(box, "lp", box.mnt, pause, "--dest-vg", vg, "--overlay", vg,
                        "--cutover", "manual")
    try:
        wait_paused(proc, pause)
        assert {"lp", "dmrecover-lp-cow"} <= set(lvs(vg))
        assert not (box.state_root / "lp" / "session.json").exists()
        dry = box.cli("cleanup", "--dry-run")
        assert dry.returncode == 0 and vg not in dry.stdout, dry.stdout + dry.stderr
        r = box.cli("cleanup")
        assert r.returncode == 0, r.stdout + r.stderr
        have = lvs(vg)
        assert_ours(have["lp"], "lp", "dest")
        assert_ours(have["dmrecover-lp-cow"], "lp", "cow")
        pause.unlink()  # the start goes on
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    box.wait_app(timeout=120)
    rec = box.session("lp")
    assert [d["name"] for d in rec["lvs"]] == ["lp", "dmrecover-lp-cow"]
    assert rec["state"] in ("restoring", "ready")
    assert not (box.state_root / "lp" / lvm.INTENT_FILE).exists()
    dry = box.cli("cleanup", "--dry-run")
    assert vg not in dry.stdout, dry.stdout
    r = box.cli("abort", "lp")
    assert r.returncode == 0, r.stderr
    r = box.cli("forget", "lp", "--discard-overlay")
    assert r.returncode == 0, r.stderr
    assert lvs(vg) == {}
