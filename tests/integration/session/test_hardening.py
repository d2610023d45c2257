"""Hardening of the session side (issue 9), on this host's portable backend: claims held for
the whole session, private files, DEST marked while incomplete, no wedged session."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.apps.livekit import ENV_KEYS, Sandbox

pytestmark = [pytest.mark.root, pytest.mark.slow]

SLOW = {"DMRECOVER_TEST_RESTORE_DELAY": "0.06"}


@pytest.fixture
def box(tmp_path: Path):
    sb = Sandbox(tmp_path)
    try:
        yield sb
    finally:
        sb.teardown()


def _popen_live_restore(box: Sandbox, session: str, mnt: Path, appstate: Path
                        ) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k not in ENV_KEYS}
    env.update(box.env)
    env.update(SLOW)
    py = sys.executable
    args = ["live-restore", "--repo", str(box.repo), box.backup_id, str(box.dest),
            "--mount", str(mnt), "--session", session, "--app-start",
            f"{py} -m dmrecover.demo.sampleapp serve --data {mnt} --state {appstate}",
            "--app-stop", f"{py} -m dmrecover.demo.sampleapp stop --state {appstate}"]
    return subprocess.Popen([py, "-m", "dmrecover", *args], env=env, cwd="/", text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _abort_all(box: Sandbox) -> None:
    for d in box.state_root.glob("*"):
        if (d / "session.json").exists():
            box.cli("abort", d.name)


def test_two_live_restores_on_one_dest_at_once_exactly_one_is_accepted(
        box: Sandbox, fs_tools, ext4_image, tmp_path: Path) -> None:
    box.prepare(fs_tools, ext4_image)
    mnt2, app2 = tmp_path / "mnt2", tmp_path / "appstate2"
    mnt2.mkdir()
    app2.mkdir()
    try:
        procs = [_popen_live_restore(box, "one", box.mnt, box.appstate),
                 _popen_live_restore(box, "two", mnt2, app2)]
        results = [p.communicate(timeout=300) for p in procs]
        codes = [p.returncode for p in procs]
        assert sorted(codes)[0] == 0 and codes.count(0) == 1, (codes, results)
        loser = results[codes.index(0) ^ 1][1]
        assert "in use by session" in loser and "Traceback" not in loser, loser
    finally:
        _abort_all(box)


def test_two_live_restores_on_one_mount_point_at_once_exactly_one_is_accepted(
        box: Sandbox, fs_tools, ext4_image, tmp_path: Path) -> None:
    box.prepare(fs_tools, ext4_image)
    app2 = tmp_path / "appstate2"
    app2.mkdir()
    other_dest = tmp_path / "dest2.img"
    try:
        p1 = _popen_live_restore(box, "one", box.mnt, box.appstate)
        box.dest, keep = other_dest, box.dest
        p2 = _popen_live_restore(box, "two", box.mnt, app2)
        box.dest = keep
        results = [p.communicate(timeout=300) for p in (p1, p2)]
        codes = [p1.returncode, p2.returncode]
        assert codes.count(0) == 1, (codes, results)
        loser = results[codes.index(0) ^ 1][1]
        assert ("in use by session" in loser or "already a mount point" in loser), loser
        assert "Traceback" not in loser
        # The loser changed nothing: its DEST was not left behind.
        if codes[1] != 0:
            assert not other_dest.exists()
    finally:
        _abort_all(box)


def _mode(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


def test_everything_the_session_creates_is_private(box: Sandbox, fs_tools, ext4_image,
                                                   tmp_path: Path) -> None:
    box.prepare(fs_tools, ext4_image)
    box.dest.unlink()  # dmrecover creates DEST
    ovl = tmp_path / "ovl"
    try:
        r = box.live_restore("priv", "--overlay", str(ovl), env=SLOW)
        assert r.returncode == 0, r.stderr
        box.wait_app()
        sdir = box.state_root / "priv"
        deadline = time.monotonic() + 30
        while not (sdir / "status.json").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _mode(box.dest) == 0o600
        assert _mode(sdir) == 0o700 and _mode(ovl) == 0o700
        for p in [*sdir.iterdir(), *ovl.iterdir()]:
            if p.is_file() and not p.is_symlink():
                assert _mode(p) & 0o077 == 0, f"{p} is {_mode(p):o}"
    finally:
        _abort_all(box)


def test_status_as_another_user_is_one_clear_line(box: Sandbox, fs_tools, ext4_image) -> None:
    box.prepare(fs_tools, ext4_image)
    try:
        r = box.live_restore("st", env=SLOW)
        assert r.returncode == 0, r.stderr
        env = {k: v for k, v in os.environ.items() if k not in ENV_KEYS}
        env.update(box.env)
        env["PYTHONPATH"] = str(Path(__file__).resolve().parents[3])
        os.chmod(box.tmp, 0o755)
        os.chmod(box.tmp.parent, 0o755)
        res = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                              sys.executable, "-m", "dmrecover", "status", "st"], env=env,
                             capture_output=True, text=True, cwd="/", timeout=120)
        assert res.returncode != 0
        assert "Traceback" not in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert "st" in res.stderr
    finally:
        _abort_all(box)


def test_a_state_dir_another_user_can_write_is_refused(box: Sandbox, fs_tools, ext4_image,
                                                       tmp_path: Path) -> None:
    box.prepare(fs_tools, ext4_image)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    os.chown(foreign, 65534, 65534)
    r = box.live_restore("fx", "--state-dir", str(foreign))
    assert r.returncode != 0 and "owned by uid 65534" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert not (foreign / "session.json").exists()
    link = tmp_path / "link"
    os.symlink(box.state_root, link)
    r = box.live_restore("fx", "--state-dir", str(link))
    assert r.returncode != 0 and "symbolic link" in r.stderr, r.stderr


def test_a_session_json_another_user_could_change_is_not_trusted(
        box: Sandbox, fs_tools, ext4_image) -> None:
    box.prepare(fs_tools, ext4_image)
    r = box.live_restore("tr", env=SLOW)
    assert r.returncode == 0, r.stderr
    r = box.cli("abort", "tr")
    assert r.returncode == 0, r.stderr
    sj = box.state_root / "tr" / "session.json"
    os.chown(sj, 65534, 65534)
    r = box.cli("resume", "tr")
    assert r.returncode != 0 and "not trusted" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    os.chown(sj, 0, 0)
    os.chmod(sj, 0o666)
    r = box.cli("resume", "tr")
    assert r.returncode != 0 and "not trusted" in r.stderr, r.stderr


def test_a_file_dest_without_room_is_refused_up_front_and_one_with_room_is_preallocated(
        box: Sandbox, fs_tools, ext4_image, tmp_path: Path) -> None:
    from dmrecover.system.mounts import umount

    box.prepare(fs_tools, ext4_image)
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(small)], check=True)
    try:
        keep, box.dest = box.dest, small / "dest.img"
        r = box.live_restore("room")
        box.dest = keep
        assert r.returncode != 0 and "needs" in r.stderr and "free" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
        assert not (small / "dest.img").exists(), "nothing changed"
        assert not (box.state_root / "room").exists()
    finally:
        umount(str(small))
    box.dest.unlink()
    try:
        r = box.live_restore("room", env=SLOW)
        assert r.returncode == 0, r.stderr
        assert box.dest.stat().st_blocks * 512 >= box.size, "DEST is preallocated, not sparse"
    finally:
        _abort_all(box)


def _finish_done(box: Sandbox, fs_tools) -> None:
    """A done session: stop its application, unmount DEST, check every file on DEST."""
    from dmrecover.system.mounts import umount

    box.wait_app()
    box.stop_app()
    umount(str(box.mnt))
    box.verify_dest(fs_tools)


def _read_direct(dev: str, offset: int, length: int) -> bytes:
    """length bytes of a block device at offset, past the page cache (O_DIRECT)."""
    r = subprocess.run(["dd", f"if={dev}", "of=/dev/stdout", f"bs={length}",
                        f"skip={offset // length}", "count=1", "iflag=direct", "status=none"],
                       capture_output=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_past_the_fetch_deadline_the_session_waits_and_recovers_by_itself(
        box: Sandbox, fs_tools, ext4_image) -> None:
    import threading

    from dmrecover.repository.repo import Repository

    box.prepare(fs_tools, ext4_image)
    r = box.live_restore("lost", "--fetch-deadline", "1", "--cutover", "manual",
                         env={"DMRECOVER_TEST_RESTORE_DELAY": "0.2"})
    assert r.returncode == 0, r.stderr
    try:
        box.wait_app()
        loop = box.session("lost")["devices"]["loop"]
        repo = Repository.open(box.repo)
        manifest = repo.manifest(box.backup_id)
        cs = manifest.chunk_size
        hidden = box.repo.with_name("repo.hidden")
        box.repo.rename(hidden)
        # From the end, a chunk that needs the repository and is not restored yet: its read
        # blocks (a restored one is served from DEST at once; an EIO fails the test).
        reader: threading.Thread | None = None
        got: list[tuple[int, bytes | str]] = []

        def read(index: int) -> None:
            try:
                got.append((index, _read_direct(loop, index * cs, cs)))
            except AssertionError as err:
                got.append((index, str(err)))

        for index in range(len(manifest.chunks) - 1, 0, -1):
            if manifest.chunks[index] is None:
                continue
            reader = threading.Thread(target=read, args=(index,))
            reader.start()
            reader.join(3)
            if reader.is_alive():
                break
            assert isinstance(got[-1][1], bytes), f"the read failed: {got[-1][1]}"
        assert reader is not None and reader.is_alive()
        last = index
        got.clear()
        deadline = time.monotonic() + 120
        while not box.status("lost").get("repository_lost_since"):
            assert time.monotonic() < deadline, box.status("lost")
            time.sleep(0.2)
        text = box.cli("status", "lost").stdout
        assert "waiting for repository since" in text, text
        time.sleep(2)
        assert reader.is_alive() and not got, ("the read waits for the repository",
                                               got and got[0][:64])
        assert box.session("lost")["state"] == "restoring"
        r = box.cli("resume", "lost")
        assert r.returncode != 0 and "is running" in r.stderr and "Traceback" not in r.stderr
        hidden.rename(box.repo)
        reader.join(300)
        assert got and got[0] == (last, repo.read_chunk(manifest, last)), "the right bytes"
        box.wait_state("lost", ("ready",), timeout=600)
        assert box.status("lost").get("repository_lost_since") is None
        r = box.cli("cutover", "lost")
        assert r.returncode == 0, r.stderr
        _finish_done(box, fs_tools)
    finally:
        if box.repo.with_name("repo.hidden").exists():
            box.repo.with_name("repo.hidden").rename(box.repo)
        _abort_all(box)


def _fill_to(path: Path, leave: int) -> None:
    """Fill path's filesystem, then give `leave` bytes back."""
    import errno

    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(bytes(1 << 16))
        except OSError as err:
            assert err.errno == errno.ENOSPC
        f.truncate(max(0, f.tell() - leave))


def _write_file(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        block = os.urandom(1 << 16)
        for _ in range(size // len(block)):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())


def test_a_full_overlay_filesystem_fails_only_the_writes_and_the_restore_goes_on(
        box: Sandbox, fs_tools, ext4_image, tmp_path: Path) -> None:
    from dmrecover.system.mounts import umount

    box.prepare(fs_tools, ext4_image)
    ovl = tmp_path / "ovl"
    ovl.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m,mode=0700", "tmpfs", str(ovl)],
                   check=True)
    try:
        r = box.live_restore("full", "--overlay", str(ovl), "--overlay-reserve", "1M",
                             "--cutover", "manual", env=SLOW)
        assert r.returncode == 0, r.stderr
        box.wait_app()
        assert not (ovl / "restored.map").exists(), "the map is not on the overlay's space"
        _fill_to(ovl / "filler", 1 << 20)
        with pytest.raises(OSError):
            _write_file(box.mnt / "big", 8 << 20)
        deadline = time.monotonic() + 60
        while not any("room" in w for w in box.status("full")["warnings"]):
            assert time.monotonic() < deadline, box.status("full")
            time.sleep(0.2)
        s = box.wait_state("full", ("ready", "failed"), timeout=600)
        assert s["state"] == "ready", s.get("error")
        st = box.status("full")
        assert st["percent"] == 100.0 and not st["engine_errors"], st
        # Freeing space is enough: the pseudo-volume takes writes again. (The filesystem
        # above may have gone read-only on its failed writes: that is ext4's answer to a
        # write error, remounting it is the administrator's.)
        (ovl / "filler").unlink()
        vol = box.session("full")["devices"]["fuse_dir"] + "/volume"
        fd = os.open(vol, os.O_WRONLY)
        try:
            data = os.urandom(1 << 20)
            assert os.pwrite(fd, data, box.size - len(data)) == len(data)
            os.fsync(fd)
        finally:
            os.close(fd)
        with open(vol, "rb") as f:
            f.seek(box.size - len(data))
            assert f.read(len(data)) == data
        assert box.session("full")["state"] == "ready"
        r = box.cli("abort", "full")
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
        assert box.session("full")["state"] == "aborted"
    finally:
        _abort_all(box)
        umount(str(ovl))


def test_dest_overlay_and_state_dir_inside_the_repository_or_holding_it_are_refused(
        box: Sandbox, fs_tools, ext4_image, tmp_path: Path) -> None:
    box.prepare(fs_tools, ext4_image)
    config = box.repo / "config.json"
    before = config.read_bytes()
    manifests = sorted(p.name for p in (box.repo / "backups").iterdir())
    keep = box.dest
    cases = [("--dest", str(config)), ("--dest", str(box.repo / "new.img")),
             ("--overlay", str(box.repo / "ovl")), ("--state-dir", str(box.repo / "st")),
             ("--state-dir", str(tmp_path))]
    for opt, value in cases:
        extra: list[str] = []
        if opt == "--dest":
            box.dest = Path(value)
        else:
            extra = [opt, value]
        r = box.live_restore("inrepo", *extra)
        box.dest = keep
        assert r.returncode != 0, (opt, value, r.stdout)
        assert "repository" in r.stderr and "Traceback" not in r.stderr, (opt, r.stderr)
        assert len(r.stderr.strip().splitlines()) <= 2, r.stderr
    assert config.read_bytes() == before
    assert sorted(p.name for p in (box.repo / "backups").iterdir()) == manifests
    for name in ("new.img", "ovl", "st"):
        assert not (box.repo / name).exists(), name


def test_the_boot_unit_runs_the_session_under_umask_0077() -> None:
    unit = Path(__file__).resolve().parents[3] / "systemd" / "dmrecover-session@.service"
    lines = [ln.strip() for ln in unit.read_text().splitlines()]
    assert "UMask=0077" in lines


def _blkid(path: Path) -> str:
    r = subprocess.run(["blkid", "-p", "-o", "value", "-s", "TYPE", str(path)],
                       capture_output=True, text=True, timeout=60)
    return r.stdout.strip()


def test_an_aborted_dest_is_marked_and_resume_completes_it(box: Sandbox, fs_tools,
                                                           ext4_image) -> None:
    box.prepare(fs_tools, ext4_image)
    try:
        r = box.live_restore("mark", env=SLOW)
        assert r.returncode == 0, r.stderr
        box.wait_app()
        assert _blkid(box.dest) == "", "no filesystem on DEST while it is incomplete"
        assert "marked" in box.status("mark")["dest_state"]
        r = box.cli("abort", "mark")
        assert r.returncode == 0, r.stderr
        st = box.status("mark")
        assert st["restored_bytes"] < st["total_bytes"], "aborted mid-restore"
        assert _blkid(box.dest) == "", "an aborted DEST holds no filesystem"
        assert "marked" in st["dest_state"]
        r = subprocess.run(["mount", "-o", "ro", str(box.dest), str(box.mnt)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode != 0, "an aborted DEST does not mount"
        r = box.cli("resume", "mark")
        assert r.returncode == 0, r.stderr
        done = box.wait_state("mark", ("done", "failed"), timeout=600)
        assert done["state"] == "done", done.get("error")
        assert box.status("mark")["dest_state"] == "complete"
        assert not (box.state_root / "mark" / "dest-head").exists()
        _finish_done(box, fs_tools)
    finally:
        _abort_all(box)


@pytest.fixture(scope="module")
def small_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository with one 16 MiB ext4 backup named vol, and a playground beside it."""
    from dmrecover.repository.backup import backup
    from dmrecover.repository.repo import Repository

    base = tmp_path_factory.mktemp("bad")
    src = base / "src.img"
    with open(src, "wb") as f:
        f.truncate(16 << 20)
    subprocess.run(["mkfs.ext4", "-q", str(src)], check=True)
    backup(src, Repository.init(base / "repo"), name="vol", chunk_size=256 << 10)
    for d in ("mnt", "dir", "state"):
        (base / d).mkdir()
    (base / "file").write_text("x")
    os.chmod(base, 0o755)
    return base


_LR = "live-restore --repo {b}/repo vol {b}/d.img --mount {b}/mnt --app-start true"
BAD_INPUTS = [
    ("live-restore --repo {b}/none vol {b}/d.img --mount {b}/mnt --app-start true", True),
    ("live-restore --repo {b}/file vol {b}/d.img --mount {b}/mnt --app-start true", True),
    ("live-restore --repo {b}/repo nosuch {b}/d.img --mount {b}/mnt --app-start true", True),
    ("live-restore --repo {b}/repo vol {b}/dir --mount {b}/mnt --app-start true", True),
    ("live-restore --repo {b}/repo vol {b}/d.img --mount {b}/file --app-start true", True),
    ("live-restore --repo {b}/repo vol {b}/d.img --mount {b}/none --app-start true", True),
    (_LR + " --fetch-deadline inf", True),
    (_LR + " --fetch-deadline -1", True),
    (_LR + " --stop-timeout nan", True),
    (_LR + " --overlay-reserve 1Q", True),
    (_LR + " --overlay-reserve inf", True),
    (_LR + " --overlay {b}/file", True),
    (_LR + " --state-dir {b}/file", True),
    (_LR + " --session ../x", True),
    (_LR + " --on-repository-lost maybe", True),
    ("resume nosuch", True), ("status nosuch", False), ("cutover nosuch", True),
    ("abort nosuch", True), ("status --state-dir {b}/file", False), ("cleanup", True),
    ("session-run nosuch", True),
]


@pytest.mark.parametrize("as_root", [True, False], ids=["root", "nobody"])
@pytest.mark.parametrize("argv,needs_root", BAD_INPUTS, ids=[a[0].split(" --")[0][:30] +
                                                               str(i) for i, a in
                                                               enumerate(BAD_INPUTS)])
def test_every_bad_input_is_one_clear_line(small_repo: Path, argv: str, needs_root: bool,
                                           as_root: bool) -> None:
    if argv == "cleanup" and as_root:
        return  # not a bad input as root: it looks at the whole machine
    env = {k: v for k, v in os.environ.items() if k not in ENV_KEYS}
    env.update({"DMRECOVER_STATE_ROOT": str(small_repo / "state"),
                "PYTHONPATH": str(Path(__file__).resolve().parents[3])})
    prefix = [] if as_root else ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    before = sorted(p.name for p in small_repo.iterdir())
    r = subprocess.run([*prefix, sys.executable, "-m", "dmrecover",
                        *argv.format(b=small_repo).split()], env=env, capture_output=True,
                       text=True, cwd="/", timeout=120)
    assert r.returncode != 0, r.stdout
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dmrecover: "), r.stderr
    if not as_root and needs_root:
        # (a malformed option is said before: the parser runs first)
        assert "needs root" in lines[0] or ": argument " in lines[0], lines[0]
    assert sorted(p.name for p in small_repo.iterdir()) == before, "nothing changed"


def test_cutover_is_refused_at_once_when_a_corrupt_chunk_stops_the_restore(
        box: Sandbox, fs_tools, ext4_image) -> None:
    """Issue 9, item 8, on real parts: a chunk of the backup is damaged in the repository, the
    background restore ends with an error naming it, and `cutover` says so at once (it used to
    wait for a completion that could never come, up to seven days)."""
    from dmrecover.repository.manifest import chunk_key
    from dmrecover.repository.repo import Repository

    box.prepare(fs_tools, ext4_image)
    manifest = Repository.open(box.repo).manifest(box.backup_id)
    # A chunk of a data file the sample application never reads (found with debugfs).
    out = subprocess.run(["debugfs", "-R", "blocks /random/blob000.bin", str(ext4_image)],
                         capture_output=True, text=True, check=True).stdout.split()
    info = subprocess.run(["dumpe2fs", "-h", str(ext4_image)], capture_output=True, text=True,
                          check=True).stdout
    block = int(next(ln.split()[-1] for ln in info.splitlines() if ln.startswith("Block size")))
    index = int(out[len(out) // 2]) * block // manifest.chunk_size
    digest = manifest.chunks[index]
    assert digest, "the file's chunk is stored"
    chunk = box.repo / chunk_key(digest)
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.chmod(0o600)
    chunk.write_bytes(bytes(data))
    r = box.live_restore("bad", "--cutover", "manual")
    assert r.returncode == 0, r.stderr
    box.wait_app()
    deadline = time.monotonic() + 120
    while not box.session("bad").get("error"):
        assert time.monotonic() < deadline, "the restore never reported the corrupt chunk"
        time.sleep(0.2)
    t0 = time.monotonic()
    r = box.cli("cutover", "bad", timeout=60)
    took = time.monotonic() - t0
    assert r.returncode != 0
    assert "corrupt" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert took < 30, f"cutover took {took:.1f} s to refuse"
    st = box.status("bad")
    assert st["state"] == "restoring" and st["alive"]  # the application keeps its volume
    assert box.query({"op": "ping"})["pid"]
    r = box.cli("abort", "bad")
    assert r.returncode == 0, r.stderr
