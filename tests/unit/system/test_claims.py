"""Claims on destinations and mount points: one holder, named on refusal, passed to a child."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from dmrecover.system import claims


@pytest.fixture(autouse=True)
def _claims_dir(tmp_path, monkeypatch) -> None:
    d = tmp_path / "claims"
    monkeypatch.setenv(claims.CLAIMS_DIR_ENV, str(d))


def test_a_file_destination_is_claimed_once_and_the_refusal_names_the_owner(tmp_path) -> None:
    dest = tmp_path / "dest.img"
    with claims.claim_destination(dest, "session one") as c:
        assert c.created and c.fd is not None and not c.is_block
        assert stat.S_IMODE(os.stat(dest).st_mode) == 0o600
        with pytest.raises(claims.ClaimRefused, match="in use by session one"):
            claims.claim_destination(dest, "session two")
        # Another name of the same file is the same claim.
        os.link(dest, tmp_path / "alias.img")
        with pytest.raises(claims.ClaimRefused):
            claims.claim_destination(tmp_path / "alias.img", "restore")
    with claims.claim_destination(dest, "session two") as c2:
        assert not c2.created
    assert stat.S_IMODE(os.stat(claims.claims_dir()).st_mode) == 0o700


def test_a_refused_claim_removes_the_file_it_created(tmp_path) -> None:
    dest = tmp_path / "dest.img"
    with claims.claim_destination(dest, "a"):
        with pytest.raises(claims.ClaimRefused):
            claims.claim_destination(dest, "b")
        assert dest.exists()


def test_a_destination_symlink_is_refused(tmp_path) -> None:
    (tmp_path / "real").write_bytes(b"")
    os.symlink(tmp_path / "real", tmp_path / "link")
    with pytest.raises(claims.DeviceError, match="symbolic link"):
        claims.claim_destination(tmp_path / "link", "a")


def test_a_missing_destination_is_not_created_when_asked_not_to(tmp_path) -> None:
    with pytest.raises(claims.DeviceError, match="does not exist"):
        claims.claim_destination(tmp_path / "nope", "a", create=False)


def test_a_mount_point_is_claimed_by_path_and_inode(tmp_path) -> None:
    mp = tmp_path / "mnt"
    mp.mkdir()
    os.symlink(mp, tmp_path / "alias")
    with claims.claim_mountpoint(mp, "session one"):
        with pytest.raises(claims.ClaimRefused, match="mount point .* in use by session one"):
            claims.claim_mountpoint(tmp_path / "alias", "session two")
    claims.claim_mountpoint(mp, "session two").release()


def test_a_claim_handed_to_a_child_is_held_with_no_gap(tmp_path) -> None:
    dest = tmp_path / "dest.img"
    c = claims.claim_destination(dest, "cli")
    env = {**os.environ, **claims.handoff_env([c])}
    code = ("import sys,time; from dmrecover.system import claims; "
            "cs = claims.adopt_inherited('session child'); print(len(cs), flush=True); "
            "sys.stdin.read()")
    child = subprocess.Popen([sys.executable, "-c", code], env=env, pass_fds=c.fds(),
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline().strip() == b"1"
        c.close()  # the parent lets go: the child still holds it
        with pytest.raises(claims.ClaimRefused, match="session child"):
            claims.claim_destination(dest, "other")
    finally:
        child.communicate(b"")
    claims.claim_destination(dest, "other").release()  # released with the child's death


def _fds_on(path) -> list[str]:
    st = os.stat(path)
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            s = os.stat(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if (s.st_dev, s.st_ino) == (st.st_dev, st.st_ino):
            out.append(fd)
    return out


def test_a_refused_claim_never_has_the_destination_open(tmp_path) -> None:
    """The winner of two claims at once refuses DEST when another process has it open: a
    loser must not hold it open while it reads who holds the lock (CI: both refused)."""
    import fcntl
    import threading
    import time

    dest = tmp_path / "dest.img"
    dest.write_bytes(b"")
    st = os.stat(dest)
    # A holder that has taken the lock but not yet written its name: the loser waits to
    # read it (claims._holder), the window in which it must not have DEST open.
    lock = os.open(os.path.join(claims.claims_dir(), f"file-{st.st_dev:x}-{st.st_ino:x}.lock"),
                   os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)
    errors: list[BaseException] = []

    def contend() -> None:
        try:
            claims.claim_destination(dest, "loser")
        except BaseException as err:  # noqa: BLE001 - handed to the test thread
            errors.append(err)

    t = threading.Thread(target=contend)
    t.start()
    seen = []
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline and t.is_alive():
        seen += _fds_on(dest)
        time.sleep(0.01)
    t.join()
    os.close(lock)
    assert seen == []
    assert len(errors) == 1 and isinstance(errors[0], claims.ClaimRefused)
    assert "another dmrecover process" in str(errors[0])
