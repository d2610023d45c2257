"""The dm-clone backend on a real kernel (the box builds dm-clone.ko: vagrant/build-box.sh).

Stack level: the clone over a read-only engine origin hydrates DEST in the kernel while writes
go to DEST directly; the clone re-created from its metadata after a teardown keeps what was
hydrated and written; the online cutover swaps to `linear` on DEST.
Session level (real CLI, real SQLite application): online cutover with the application
running, restart cutover, SIGKILL of the session then `dmrecover resume`, SIGKILL then
`dmrecover cleanup` (nothing left), the repository gone for 30 s mid-hydration (reads wait, no
I/O error). Power cuts during hydration and during the table swap: powercut.py, driven by
vagrant/run-kernel-tests.sh.
"""

from __future__ import annotations

import hashlib
import os
import signal
import time
from pathlib import Path

import pytest

from dmrecover.backends import registry
from dmrecover.backends.base import BackendContext
from dmrecover.backends.dm import dmsetup as dm
from dmrecover.backends.dm_clone import DmCloneBackend, target
from dmrecover.backends.dm_clone.stack import META_FILE, STAGING_FILE, wait_hydrated
from dmrecover.engine.fetcher import MemorySource
from dmrecover.engine.pseudovolume import PseudoVolume
from dmrecover.system.mounts import mount_at, umount
from tests.apps.livekit import Sandbox
from tests.helpers import images
from tests.kernel.kernelutil import (
    KilledSessionWrite,
    Waiters,
    dm_state,
    io_errors_since,
    kernel_log,
    repository_outage,
    ride_out_outage,
    sh,
    source_path_failed,
    verify_dest_alone,
)
from tests.kernel.test_dm_live_restore import SLOW, _read_unrestored_files

MiB = 1 << 20


def test_clone_target_probe_and_auto_prefers_it() -> None:
    DmCloneBackend().probe()
    assert "clone" in dm.targets()
    assert registry.choose("auto").name == "dm-clone"


def _source_image(path: Path, size: int) -> bytes:
    """An ext4 filesystem (so the stack can mount it) with random bytes in its last half."""
    with open(path, "wb") as f:
        f.truncate(size)
    sh("mkfs.ext4", "-q", "-F", "-E", "nodiscard", str(path))
    data = bytearray(path.read_bytes())
    data[size // 2:] = os.urandom(size // 2)
    return bytes(data)


def _read_dev(dev: str, offset: int, length: int) -> bytes:
    fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
    try:
        import mmap

        buf = mmap.mmap(-1, length)
        n = os.preadv(fd, [buf], offset)
        assert n == length
        return bytes(buf)
    finally:
        os.close(fd)


def _write_dev(dev: str, offset: int, data: bytes) -> None:
    fd = os.open(dev, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def test_clone_stack_hydrates_keeps_state_across_rebuild_and_cuts_over_online(
        tmp_path: Path, owned_cleanup: str) -> None:
    session = owned_cleanup
    size = 64 * MiB
    data = _source_image(tmp_path / "src.img", size)
    src = MemorySource(data, 1 * MiB)
    dest = tmp_path / "dest.img"
    with open(dest, "wb") as f:
        f.truncate(size)
    edir = tmp_path / "engine"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    ctx = BackendContext(session=session, state_dir=str(tmp_path), engine_dir=str(edir),
                         mountpoint=str(mnt), fstype="ext4", dest=str(dest), size=size,
                         mount_options=("ro", "noload"))  # the mount writes nothing
    backend = DmCloneBackend()

    def present(hydrate: bool):
        pv = PseudoVolume(src, backend.engine_dest(ctx), edir / "state", read_only=True)
        stack = backend.present(pv, ctx)
        stack.hydrate = hydrate
        stack.build()
        umount(str(mnt))  # raw block I/O below
        stack.undo.pop("mount")
        return pv, stack

    # The engine's refusal to write DEST: a volume on DEST itself is refused.
    bad = PseudoVolume(src, dest, tmp_path / "bad", read_only=True)
    with pytest.raises(Exception, match="must not write DEST"):
        backend.present(bad, ctx).build()
    bad.close()
    assert not dm.list_owned(session)

    pv, stack = present(hydrate=False)
    try:
        dev = stack.device
        assert dm.table(stack.clone_name).split()[2] == "clone"
        st = target.status(stack.clone_name)
        assert not st.hydration_enabled and st.regions == size // (64 * 1024)
        # Reads equal the source (fetched on demand through the origin).
        assert _read_dev(dev, 40 * MiB, 2 * MiB) == data[40 * MiB:42 * MiB]
        # An aligned 1 MiB write goes to DEST directly, a 4 KiB one after its region's copy.
        w1, w2 = os.urandom(MiB), os.urandom(4096)
        _write_dev(dev, 50 * MiB, w1)
        _write_dev(dev, 60 * MiB + 8192, w2)
        assert _read_dev(dev, 50 * MiB, MiB) == w1
        with open(dest, "rb") as f:
            f.seek(50 * MiB)
            assert f.read(MiB) == w1, "writes land on DEST itself"
        before = stack.stats()
        assert 0 < before["hydrated_regions"] < before["regions"]
    finally:
        errors = stack.teardown()
        pv.close()
    assert not errors and not dm.list_owned(session)
    assert (edir / META_FILE).exists()

    # Re-created from the same metadata (a resumed session): hydrated state and writes kept.
    pv, stack = present(hydrate=True)
    try:
        again = target.status(stack.clone_name)
        assert again.hydrated >= before["hydrated_regions"]
        assert _read_dev(stack.device, 50 * MiB, MiB) == w1
        t0 = time.monotonic()
        done = wait_hydrated(stack.clone_name, timeout=600)
        print(f"dm-clone hydration of {size // MiB} MiB: {time.monotonic() - t0:.1f} s")
        assert done.complete and stack.stats()["hydrated_fraction"] == 1.0
        mount_dir = str(mnt)
        pause = stack.online_cutover(str(dest))
        assert dm.table(stack.clone_name).split()[2] == "linear"
        assert pause < 5, pause
        assert stack.origin_loop is None and stack.meta_loop is None and stack.server is None
        print(f"dm-clone online cutover: I/O suspended {pause * 1000:.0f} ms ({mount_dir})")
    finally:
        stack.undo.unwind()
        if dm.info(stack.clone_name) is not None:
            dm.remove(stack.clone_name)
        pv.close()
    backend.finish_online_cutover(ctx)
    assert not (edir / META_FILE).exists() and not (edir / STAGING_FILE).exists()
    expect = bytearray(data)
    expect[50 * MiB:51 * MiB] = w1
    expect[60 * MiB + 8192:60 * MiB + 8192 + 4096] = w2
    assert hashlib.sha256(dest.read_bytes()).digest() == hashlib.sha256(expect).digest()


def _on_clone(sb: Sandbox, session: str) -> str:
    name = dm.dm_name(session, "clone")
    m = mount_at(str(sb.mnt))
    assert m is not None and Path(m.source).resolve() == dm.mapper_path(name).resolve()
    assert dm.table(name).split()[2] == "clone"
    return name


def _start_clone(box: Sandbox, fs_tools, image: Path, session: str, *extra: str
                 ) -> tuple[int, str]:
    """Back `image` up and live-restore it with `--backend dm-clone` (restore slowed by the
    test hook) and the sample application; returns the application's pid and the clone's dm
    name once the application answers on the clone."""
    box.prepare(fs_tools, image)
    r = box.live_restore(session, "--backend", "dm-clone", *extra, env=SLOW)
    assert r.returncode == 0, r.stderr
    pid = box.wait_app(timeout=120)["pid"]
    assert box.session(session)["backend"] == "dm-clone"
    return pid, _on_clone(box, session)


def _hydrate_at_full_speed(name: str) -> None:
    """The clone back to the backend's own hydration pace. The restore-delay hook holds the
    kernel to one region at a time (target.clone_table) so that hydration is still running
    when a test acts on it; under TCG that is ~6 regions a second, and the regions left after
    that point need not crawl: the target takes both settings as messages."""
    dm.message(name, f"hydration_threshold {target.HYDRATION_THRESHOLD}")
    dm.message(name, f"hydration_batch_size {target.HYDRATION_BATCH}")
    core = dm.status(name).split()
    assert core[core.index("hydration_threshold") + 1] == str(target.HYDRATION_THRESHOLD), core


def test_clone_session_online_cutover(box: Sandbox, fs_tools, ext4_image: Path) -> None:
    pid, name = _start_clone(box, fs_tools, ext4_image, "co", "--cutover", "online")
    _read_unrestored_files(box)
    _hydrate_at_full_speed(name)
    done = box.wait_state("co", ("done", "failed"), timeout=600)
    assert done["state"] == "done", done.get("error")
    assert box.query({"op": "ping"})["pid"] == pid, "online: the application kept running"
    assert dm.table(name).split()[2] == "linear"
    sdir = box.state_root / "co"
    assert not list(sdir.rglob(META_FILE)) and not list(sdir.rglob(STAGING_FILE))
    n0 = box.query({"op": "count"})["rows"]
    time.sleep(0.5)
    assert box.query({"op": "count"})["rows"] > n0
    _rows, acks = verify_dest_alone(box, fs_tools, name)
    print(f"dm-clone online: {acks} acknowledged writes, longest pause "
          f"{done['timings']['online_max_pause'] * 1000:.0f} ms")


def test_clone_session_killed_then_resumed(box: Sandbox, fs_tools, ext4_image: Path) -> None:
    """SIGKILL the session process mid-restore: the clone's source waits (a write smaller
    than a region needs its region from the source: it queues, it does not fail); `dmrecover
    resume` serves the source again before it stops the application, rebuilds the clone from
    its own metadata, and the session completes (restart cutover) with every acknowledged
    write on DEST, those made while no session ran included. Once this failed 1 run in 3:
    such writes failed with EIO, ext4 lost journaled metadata and the application could not
    start again."""
    import psutil

    _pid, name = _start_clone(box, fs_tools, ext4_image, "ck")
    time.sleep(2.0)
    hydrated = target.status(name).hydrated
    spid = box.session("ck")["pid"]
    log_before = len(kernel_log())
    proc = psutil.Process(spid)  # before the kill: a killed session is reaped at once
    os.kill(spid, signal.SIGKILL)
    psutil.wait_procs([proc], timeout=20)
    # Writes with no session: new files (blocks in regions not hydrated yet), then sync(2),
    # which holds no descriptor on the mount (the resume's unmount must not find it busy).
    def write_after_kill() -> None:
        for i in range(8):
            (box.mnt / f"after-kill-{i}").write_bytes(bytes([65 + i]) * 12288)
        os.sync()

    writer = KilledSessionWrite(write_after_kill)
    writer.started()
    source_path_failed("ck")
    for p in box.app_procs():
        p.send_signal(signal.SIGKILL)  # may wait in D state for its queued writes
    r = box.cli("resume", "ck")
    assert r.returncode == 0, r.stdout + r.stderr
    writer.finished()
    # Nothing failed for want of a source (before: "clone: hydration failed", EXT4 errors).
    bad = io_errors_since(log_before, "hydration failed", "EXT4-fs error")
    assert not bad, bad
    box.wait_app(timeout=180)
    name = _on_clone(box, "ck")
    assert target.status(name).hydrated >= hydrated, "hydrated regions survive the crash"
    done = box.wait_state("ck", ("done", "failed"), timeout=600)
    assert done["state"] == "done", done.get("error")
    box.wait_app(timeout=120)
    assert not dm.list_owned("ck")
    for i in range(8):  # on DEST now, where the application runs
        assert (box.mnt / f"after-kill-{i}").read_bytes() == bytes([65 + i]) * 12288
    verify_dest_alone(box, fs_tools)


@pytest.fixture(scope="module")
def clone_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 256 MiB ext4 image holding 24 MiB of data: under the restore delay the kernel
    hydrates one region at a time, so hydration still runs well after the application is up."""
    return images.make_fs_image(tmp_path_factory.mktemp("img") / "clone.img", "ext4",
                                size=256 * MiB, seed=3, budget=24 * MiB)


def _data_blocks(image: Path, block: int = 256 << 10) -> list[int]:
    """Offsets of the non-zero `block`-sized blocks of `image`. Read before the outage: a
    256 MiB scan takes many seconds under TCG, and in the outage they count against its
    30 s (once they took all of them)."""
    found = []
    with open(image, "rb") as f:
        for offset in range(0, image.stat().st_size, block):
            if f.read(block).strip(b"\0"):
                found.append(offset)
    return found


def _spread_above(blocks: list[int], start: int, count: int) -> list[int]:
    """Up to `count` of `blocks` at or above `start`, spread over the upper half of those
    (the restorer, going up, reaches them last)."""
    found = [b for b in blocks if b >= start]
    found = found[len(found) // 2:]
    step = max(len(found) // count, 1)
    return found[::step][:count]


def _mounts() -> set[str]:
    return {line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()}


def test_clone_killed_session_then_cleanup(box: Sandbox, fs_tools, ext4_image: Path) -> None:
    """SIGKILL the session process (and its application): `dmrecover cleanup` removes the
    clone, its source (FUSE, loop), its metadata loop and the loop on the DEST file: `dmsetup
    ls`, `losetup -a` and the mounts are as before the session."""
    import psutil

    before, mounts_before = dm_state(), _mounts()
    _pid, name = _start_clone(box, fs_tools, ext4_image, "kc")
    os.kill(box.session("kc")["pid"], signal.SIGKILL)
    for p in box.app_procs():
        p.send_signal(signal.SIGKILL)
    psutil.wait_procs(box.app_procs(), timeout=20)
    assert dm.list_owned("kc"), "the dead session's devices are still there"
    r = box.cli("cleanup", "--dry-run")
    assert r.returncode == 0 and name in r.stdout, r.stdout + r.stderr
    r = box.cli("cleanup")
    assert r.returncode == 0, r.stdout + r.stderr
    assert not dm.list_owned("kc")
    assert dm_state() == before, "dm devices or loops left behind"
    assert _mounts() == mounts_before, _mounts() ^ mounts_before
    assert "nothing to clean up" in box.cli("cleanup").stdout


def _clone_healthy(name: str) -> None:
    c = target.status(name)
    assert not (c.failed or c.needs_check or c.read_only_metadata), c


def test_clone_repository_unreachable_30s_no_io_error(box: Sandbox, clone_image: Path,
                                                      fs_tools) -> None:
    """The repository vanishes for 30 s (an empty tmpfs over it) while the kernel hydrates:
    direct reads of regions not hydrated yet, the application's read of an unrestored file and
    the hydration itself wait; no read fails, the kernel logs no I/O error, the clone does not
    fail, the application keeps running (the same process after the online cutover) and the
    session completes with every acknowledged write on DEST.

    Hydration crawls (one region at a time) only until the repository is back and the waiting
    reads are checked; the regions left then hydrate at the backend's own pace."""
    blocks = _data_blocks(clone_image)
    pid, name = _start_clone(box, fs_tools, clone_image, "out", "--cutover", "online")
    dev = str(dm.mapper_path(name))
    log_before = len(kernel_log())
    size = box.size
    last = sorted(box.checksums)[-1]
    waiting = Waiters()
    with repository_outage(box) as since:
        st = target.status(name)
        frontier = (st.hydrated + st.hydrating) * st.region_sectors * dm.SECTOR
        # Hydration goes up from region 0: data blocks well above the frontier are neither
        # hydrated nor (at 0.25 s a chunk) restored yet: reading them needs the repository.
        offsets = _spread_above(blocks, frontier + (16 << 20), 8)
        assert offsets, f"no data left above the hydration frontier ({frontier} of {size} bytes)"
        time.sleep(1.0)
        for offset in offsets:
            waiting.start(offset, _read_dev, dev, offset, 256 << 10)
        waiting.start("file", box.query, {"op": "sha256", "path": last}, 180)
        ride_out_outage(box, "out", since, check=lambda: _clone_healthy(name))
        read = set(waiting.answers) - {"file"}
        assert len(read) < len(offsets), "reads of unrestored data wait for the repository"
        stalled = target.status(name)
        assert not stalled.complete, "hydration still had regions to copy in the outage"
    waiting.join(180)
    assert waiting.answers.pop("file") == {"ok": True, "sha256": box.checksums[last]}
    with open(clone_image, "rb") as f:
        for offset in offsets:
            f.seek(offset)
            assert waiting.answers[offset] == f.read(256 << 10), f"bytes at {offset}"
    _hydrate_at_full_speed(name)
    t1 = time.monotonic()
    done = box.wait_state("out", ("done", "failed"), timeout=900)
    assert done["state"] == "done", done.get("error")
    print(f"dm-clone outage: {stalled.regions - stalled.hydrated} regions left at the end of "
          f"the outage, done {time.monotonic() - t1:.0f} s after it")
    assert box.query({"op": "ping"})["pid"] == pid, "the application ran through the outage"
    bad = [line for line in kernel_log()[log_before:]
           if "I/O error" in line or ("device-mapper: clone" in line
                                      and ("rror" in line or "ail" in line))]
    assert not bad, bad
    verify_dest_alone(box, fs_tools, name)
    app_log = (box.state_root / "out" / "app.log").read_text()
    assert "I/O error" not in app_log and "disk I/O" not in app_log, app_log[-2000:]
