"""dmsetup.py and stack.py pure logic: names, UUIDs, tables, status parsing, COW sizing."""

import subprocess

import pytest

from dmrecover import DM_UUID_PREFIX
from dmrecover.backends.dm import dmsetup as dm
from dmrecover.backends.dm.stack import cow_size
from dmrecover.errors import StackError


def test_names_and_uuids_round_trip():
    assert dm.dm_name("db-1", "pseudo") == "dmrecover-db--1-pseudo"
    u = dm.dm_uuid("db-1", "pseudo")
    assert u.startswith(DM_UUID_PREFIX)
    assert dm.split_uuid(u) == ("db-1", "pseudo")
    assert dm.split_uuid("LVM-abc") is None
    assert dm.split_uuid(DM_UUID_PREFIX + "nolayer") is None
    assert str(dm.stable_path("db-1", "cow")) == "/dev/dmrecover/db-1/cow"


@pytest.mark.parametrize("session", ["", "a b", "x/y", "-lead", "a" * 65])
def test_bad_session_names_refused(session):
    with pytest.raises(StackError):
        dm.dm_name(session, "pseudo")


def test_splitname_escaping_matches_lvm():
    """dmsetup splitname (what the udev rules run) takes our names apart as we mean them."""
    if not dm.command.have("dmsetup"):
        pytest.skip("dmsetup not installed")
    name = dm.dm_name("my-db-2", "cow")
    out = subprocess.run([dm.command.find("dmsetup"), "splitname", "--nameprefixes",
                          "--noheadings", "--rows", name], capture_output=True, text=True,
                         check=True).stdout
    fields = dict(line.split("=", 1) for line in out.split())
    assert fields["DM_VG_NAME"].strip("'") == "dmrecover"
    assert fields["DM_LV_NAME"].strip("'") == "my-db-2"
    assert fields["DM_LV_LAYER"].strip("'") == "cow"


def test_tables():
    assert dm.snapshot_table("/dev/loop1", "/dev/loop2", 1 << 20) == \
        "0 2048 snapshot /dev/loop1 /dev/loop2 P 8"
    assert dm.snapshot_merge_table("/dev/a", "/dev/b", 4096) == \
        "0 8 snapshot-merge /dev/a /dev/b P 8"
    assert dm.linear_table("/dev/a", 4096) == "0 8 linear /dev/a 0"
    with pytest.raises(StackError):
        dm.linear_table("/dev/a", 1000)


def test_snapshot_status_parsing():
    st = dm.parse_snapshot_status("0 32768 snapshot 48/33024 16")
    assert (st.allocated, st.total, st.metadata) == (48, 33024, 16) and not st.merged
    assert dm.parse_snapshot_status("0 32768 snapshot-merge 16/33024 16").merged
    assert dm.parse_snapshot_status("0 32768 snapshot Invalid").invalid
    assert not dm.parse_snapshot_status("0 32768 snapshot Invalid").merged
    assert dm.parse_snapshot_status("0 8 snapshot-merge Merge failed").merge_failed
    with pytest.raises(StackError):
        dm.parse_snapshot_status("0 8 linear")


def test_info_line_parsing():
    i = dm._parse_info_line("dmrecover-a-pseudo|DMRECOVER-a-pseudo|254|3|1|L-sw|1")
    assert i.name == "dmrecover-a-pseudo" and i.minor == 3 and i.open_count == 1
    assert i.suspended and not i.read_only and i.owned
    assert dm._parse_info_line("garbage") is None


@pytest.mark.parametrize("size", [4096, 16 << 20, (1 << 30) + 512])
def test_cow_holds_every_chunk(size):
    # One 16-byte exception per 4 KiB chunk, 256 per metadata chunk, plus the header.
    c = cow_size(size)
    chunks = -(-size // 4096)
    assert c % 4096 == 0
    assert c >= size + (-(-chunks // 256) + 1) * 4096
    assert c < size * 1.01 + (2 << 20)
