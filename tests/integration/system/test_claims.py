"""Claims on real block devices: the lock names the owner, O_EXCL keeps mounts away."""

from __future__ import annotations

import os
import subprocess

import pytest

from dmrecover.system import claims

MiB = 1 << 20

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (loop devices)")


def test_a_block_destination_is_claimed_exclusively(tmp_path, loop_device, monkeypatch) -> None:
    monkeypatch.setenv(claims.CLAIMS_DIR_ENV, str(tmp_path / "claims"))
    img = tmp_path / "dev.img"
    img.write_bytes(b"")
    os.truncate(img, 8 * MiB)
    dev = loop_device(img)
    subprocess.run(["mkfs.ext4", "-q", dev], check=True)
    with claims.claim_destination(dev, "session blk") as c:
        assert c.is_block
        with pytest.raises(claims.ClaimRefused, match="session blk"):
            claims.claim_destination(dev, "restore")
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        # The kernel's claim: nobody mounts DEST under a running restore.
        res = subprocess.run(["mount", dev, str(mnt)], capture_output=True)
        if res.returncode == 0:
            subprocess.run(["umount", str(mnt)], check=False)
        assert res.returncode != 0
        c.release_device()  # the cutover's turn: it may mount DEST now, the lock stays
        with pytest.raises(claims.ClaimRefused):
            claims.claim_destination(dev, "restore")


def test_a_udev_symlink_under_dev_is_opened_by_its_node(tmp_path, loop_device,
                                                        monkeypatch) -> None:
    """/dev/VG/LV and /dev/mapper/NAME are udev's symlinks (made by root): a DEST named so is
    claimed through its node. Before, O_NOFOLLOW refused every LV named that way. A symlink
    anywhere else is still refused."""
    monkeypatch.setenv(claims.CLAIMS_DIR_ENV, str(tmp_path / "claims"))
    img = tmp_path / "dev.img"
    img.write_bytes(b"")
    os.truncate(img, 8 * MiB)
    dev = loop_device(img)
    link = f"/dev/dmrecover-test-claim-{os.getpid()}"
    os.symlink(dev, link)
    try:
        with claims.claim_destination(link, "session lv") as c:
            assert c.is_block
            with pytest.raises(claims.ClaimRefused, match="session lv"):
                claims.claim_destination(link, "restore")
    finally:
        os.unlink(link)
    outside = tmp_path / "dest-link"
    os.symlink(dev, outside)
    with pytest.raises(claims.DeviceError, match="symbolic link"):
        claims.claim_destination(outside, "session x")
