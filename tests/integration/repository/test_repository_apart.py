"""Issue 9 item 3 and the DEST claim, with the real things (root): a bind mount of the
repository, a block device holding it, a DEST claimed by a live-restore."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from dmrecover.errors import DeviceError, UsageError
from dmrecover.repository.backup import backup
from dmrecover.repository.repo import Repository
from dmrecover.repository.restore import restore
from dmrecover.system import claims

pytestmark = pytest.mark.root

MiB = 1 << 20


@pytest.fixture
def repo_and_backup(tmp_path: Path):
    repo = Repository.init(tmp_path / "repo")
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(MiB) + bytes(MiB))
    return repo, backup(src, repo, chunk_size=256 << 10)


def _mount_bind(src: Path, dst: Path) -> None:
    subprocess.run(["mount", "--bind", str(src), str(dst)], check=True)


def _umount(dst: Path) -> None:
    subprocess.run(["umount", str(dst)], check=False)


def test_bind_mount_does_not_get_around_it(repo_and_backup, tmp_path: Path) -> None:
    repo, m = repo_and_backup
    config = (repo.path / "config.json").read_bytes()
    bind = tmp_path / "bind"
    bind.mkdir()
    one = tmp_path / "one.img"
    one.write_bytes(b"")
    _mount_bind(repo.path, bind)
    try:
        _mount_bind(repo.path / "config.json", one)
        try:
            for dest in (bind / "config.json", bind / "tmp" / "new.img", one):
                assert repo.contains(dest)
                with pytest.raises(UsageError, match="inside repository"):
                    restore(repo, m, dest)
            # a folder bind-mounted over one holding the repository holds it too
            assert repo.is_within(bind) and not repo.contains(tmp_path / "other.img")
        finally:
            _umount(one)
    finally:
        _umount(bind)
    assert (repo.path / "config.json").read_bytes() == config
    assert not (repo.path / "tmp" / "new.img").exists()


def test_block_device_holding_the_repository(tmp_path: Path, fs_tools, loop_device) -> None:
    img = tmp_path / "fs.img"
    with open(img, "wb") as f:
        f.truncate(64 * MiB)
    fs_tools.mkfs(img, "ext4")
    dev = loop_device(img)
    with fs_tools.mounted(dev) as mnt:
        repo = Repository.init(Path(mnt) / "repo")
        src = tmp_path / "src.img"
        src.write_bytes(os.urandom(MiB))
        m = backup(src, repo, chunk_size=256 << 10)
        assert repo.is_within(dev)
        with pytest.raises(UsageError, match="holds repository"):
            restore(repo, m, dev, force=True)
        assert [b.id for b in repo.backups()] == [m.id]


def test_restore_refused_while_a_session_claims_dest(repo_and_backup, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    repo, m = repo_and_backup
    monkeypatch.setenv(claims.CLAIMS_DIR_ENV, str(tmp_path / "claims"))
    dest = tmp_path / "dest.img"
    dest.write_bytes(b"\xee" * (2 * MiB))
    held = claims.claim_destination(dest, "session db")
    try:
        with pytest.raises(DeviceError, match="in use by session db"):
            restore(repo, m, dest)
        assert dest.read_bytes() == b"\xee" * (2 * MiB)
        # another name of the same file (a hard link) is the same claim
        alias = tmp_path / "alias.img"
        os.link(dest, alias)
        with pytest.raises(DeviceError, match="in use by session db"):
            restore(repo, m, alias)
    finally:
        held.release()
    restore(repo, m, dest)
    assert dest.read_bytes() == (tmp_path / "src.img").read_bytes()
    # and a restore holds the claim while it runs: nothing is left behind once done
    assert os.listdir(tmp_path / "claims") == []
