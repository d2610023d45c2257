"""The one mountinfo parser: fields, octal escapes, malformed lines, lookups."""

from __future__ import annotations

import os

from dmrecover.system import mounts

SAMPLE = (
    "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw,errors=remount-ro\n"
    "36 22 0:45 /sub /mnt/with\\040space\\134x rw,nosuid master:2 shared:3 - fuse.dmr "
    "dmr\\011src rw,user_id=0\n"
    "37 22 7:3 / /mnt/no-optional ro - xfs /dev/loop3 ro,nouuid\n"
    "garbage line\n"
    "38 22 x:y / /bad rw - ext4 /dev/x rw\n"
)


def test_parse_fields_and_escapes() -> None:
    entries = mounts.parse_mountinfo(SAMPLE)
    assert [e.mount_id for e in entries] == [22, 36, 37]
    fuse = entries[1]
    assert (fuse.parent_id, fuse.major, fuse.minor, fuse.major_minor) == (22, 0, 45, "0:45")
    assert fuse.root == "/sub"
    assert fuse.target == "/mnt/with space\\x"
    assert fuse.options == "rw,nosuid"
    assert fuse.fstype == "fuse.dmr"
    assert fuse.source == "dmr\tsrc"
    assert fuse.super_options == "rw,user_id=0"
    assert entries[2].options == "ro" and entries[2].super_options == "ro,nouuid"


def test_mount_at_takes_the_topmost(monkeypatch) -> None:
    text = SAMPLE + "40 37 7:4 / /mnt/no-optional rw - ext4 /dev/loop4 rw\n"
    monkeypatch.setattr(mounts, "mounts", lambda: mounts.parse_mountinfo(text))
    assert mounts.mount_at("/mnt/no-optional").source == "/dev/loop4"
    assert mounts.is_mountpoint("/mnt/with space\\x")
    assert not mounts.is_mountpoint("/mnt")


def test_real_mountinfo_has_root() -> None:
    root = mounts.mount_at("/")
    assert root is not None and root.target == "/"
    assert mounts.is_mountpoint("/proc")


def test_mounts_of_a_file_without_loops(tmp_path) -> None:
    f = tmp_path / "img"
    f.write_bytes(b"\0" * 4096)
    assert mounts.mounts_of(f) == []


def test_mounts_of_the_root_device() -> None:
    root = mounts.mount_at("/")
    dev = f"/dev/block/{root.major}:{root.minor}"
    if os.path.exists(dev):
        assert "/" in mounts.mounts_of(dev)
