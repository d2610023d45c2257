"""dmrecover's LVM rules (naming, tags, sizing, refusals) with blivet faked at the boundary
(the Lvm class); the real volume group is exercised in tests/kernel/test_lvm.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from dmrecover.errors import DeviceError, StackError, UsageError
from dmrecover.system import lvm

MiB = 1 << 20


class FakeLvm(lvm.Lvm):
    """LVM as a dict: VG name -> (free, extent); LVs with their tags."""

    def __init__(self, groups: dict[str, tuple[int, int]]) -> None:
        self.groups = dict(groups)
        self.lv: dict[tuple[str, str], lvm.LvInfo] = {}
        self.calls: list[tuple] = []

    def volume_group(self, name):
        if name not in self.groups:
            return None
        free, extent = self.groups[name]
        return lvm.VolumeGroup(name, free, extent)

    def create(self, vg, name, size, tags):
        self.calls.append(("create", vg, name, size, tuple(tags)))
        free, extent = self.groups[vg]
        assert size <= free and size % extent == 0
        self.groups[vg] = (free - size, extent)
        self.lv[(vg, name)] = lvm.LvInfo(vg, name, tuple(tags), size)

    def remove(self, vg, name):
        self.calls.append(("remove", vg, name))
        info = self.lv.pop((vg, name))
        free, extent = self.groups[vg]
        self.groups[vg] = (free + info.size, extent)

    def activate(self, vg, name):
        self.calls.append(("activate", vg, name))

    def lvs(self, vg=None):
        return [i for i in self.lv.values() if vg is None or i.vg == vg]


def untagged(fake: FakeLvm, vg: str, name: str, size: int = 8 * MiB) -> None:
    fake.lv[(vg, name)] = lvm.LvInfo(vg, name, ("backup",), size)


# ------------------------------------------------------------------ names and tags

def test_names_follow_lvm_rules():
    assert lvm.lv_name("db", "cow") == "dmrecover-db-cow"
    assert lvm.lv_name("db", "meta") == "dmrecover-db-meta"
    assert lvm.lv_name("db", "dest") == "db"
    # LVM refuses names holding its own suffixes, or named snapshot/pvmove
    assert "_tmeta" not in lvm.lv_name("a_tmeta", "cow")
    assert lvm.lv_name("snapshot1", "dest") == "dmrecover-snapshot1"
    assert lvm.lv_name("-x", "dest").startswith("dmrecover-")
    assert lvm.lv_name("a b/c", "dest") == "a_b_c"
    with pytest.raises(ValueError):
        lvm.lv_name("db", "origin")


def test_tags_name_session_role_and_state_dir():
    assert lvm.tags_for("db.1", "cow", "/var/lib/dmrecover/db.1") == [
        "dmrecover", "dmrecover_session_db.1", "dmrecover_role_cow",
        "dmrecover_state_/var/lib/dmrecover/db.1"]
    # a state dir LVM cannot spell in a tag is left out (cleanup then never removes the LV)
    assert len(lvm.tags_for("db", "cow", "/srv/my dir")) == 3
    assert lvm.session_tag("a b") == "dmrecover_session_a_b"


def test_vg_names():
    assert lvm.valid_vg_name("vg0") and lvm.valid_vg_name("data_vg.1")
    for bad in ("", "-vg", "a/b", ".", "..", "x" * 200):
        assert not lvm.valid_vg_name(bad)


# ------------------------------------------------------------------ plan: checks only

def test_plan_rounds_to_extents_and_changes_nothing():
    fake = FakeLvm({"vg0": (100 * MiB, 4 * MiB)})
    planned = lvm.plan("db", [("vg0", "dest", 10 * MiB + 1), ("vg0", "cow", 3 * MiB)],
                       lvm=fake)
    assert [(lv.name, lv.role, lv.size) for lv in planned] == [
        ("db", "dest", 12 * MiB), ("dmrecover-db-cow", "cow", 4 * MiB)]
    assert planned[0].path == "/dev/vg0/db"
    assert fake.calls == []


def test_plan_refuses_missing_vg_in_one_line():
    fake = FakeLvm({})
    with pytest.raises(DeviceError) as exc:
        lvm.plan("db", [("vg9", "cow", MiB)], lvm=fake)
    assert "\n" not in str(exc.value)
    assert str(exc.value).startswith("--overlay vg9: no such LVM volume group")
    with pytest.raises(DeviceError, match="--dest-vg vg9"):
        lvm.plan("db", [("vg9", "dest", MiB)], lvm=fake)
    with pytest.raises(UsageError, match="not a volume group name"):
        lvm.plan("db", [("-bad", "cow", MiB)], lvm=fake)


def test_plan_refuses_too_little_room_for_all_lvs_together():
    fake = FakeLvm({"vg0": (20 * MiB, 4 * MiB)})
    lvm.plan("db", [("vg0", "dest", 12 * MiB)], lvm=fake)  # alone it fits
    with pytest.raises(DeviceError) as exc:
        lvm.plan("db", [("vg0", "dest", 12 * MiB), ("vg0", "cow", 12 * MiB)], lvm=fake)
    msg = str(exc.value)
    assert "\n" not in msg
    assert "vg0 has 20.0 MiB free" in msg.replace("MiB", "MiB") or "vg0 has" in msg
    assert "needs" in msg and fake.calls == []


def test_plan_refuses_an_lv_of_that_name_not_ours_and_leaves_it():
    fake = FakeLvm({"vg0": (100 * MiB, 4 * MiB)})
    untagged(fake, "vg0", "dmrecover-db-cow")
    with pytest.raises(DeviceError, match="not created by dmrecover"):
        lvm.plan("db", [("vg0", "cow", MiB)], lvm=fake)
    with pytest.raises(DeviceError, match="not created by dmrecover"):
        lvm.create("db", lvm.LogicalVolume("vg0", "dmrecover-db-cow", "cow", 4 * MiB),
                   lvm=fake, wipe_header=False)
    assert ("vg0", "dmrecover-db-cow") in fake.lv and fake.calls == []


def test_plan_names_a_leftover_of_our_own():
    fake = FakeLvm({"vg0": (100 * MiB, 4 * MiB)})
    lv = lvm.LogicalVolume("vg0", "dmrecover-db-cow", "cow", 4 * MiB)
    lvm.create("db", lv, lvm=fake, wipe_header=False)
    with pytest.raises(DeviceError, match="earlier dmrecover session db.*cleanup"):
        lvm.plan("db", [("vg0", "cow", MiB)], lvm=fake)


# ------------------------------------------------------------------ create and remove

def test_create_tags_in_the_same_call_and_remove_only_ours():
    fake = FakeLvm({"vg0": (100 * MiB, 4 * MiB)})
    [lv] = lvm.plan("db", [("vg0", "cow", 5 * MiB)], lvm=fake)
    lvm.create("db", lv, state_dir="/var/lib/dmrecover/db", lvm=fake, wipe_header=False)
    assert fake.calls == [("create", "vg0", "dmrecover-db-cow", 8 * MiB, (
        "dmrecover", "dmrecover_session_db", "dmrecover_role_cow",
        "dmrecover_state_/var/lib/dmrecover/db"))]
    [info] = lvm.ours(lvm=fake)
    assert lvm.session_of(info) == "db" and lvm.role_of(info) == "cow"
    assert lvm.state_dir_of(info) == "/var/lib/dmrecover/db"
    # another session's name does not own it
    with pytest.raises(StackError, match="not tagged by dmrecover session other"):
        lvm.remove("other", lv, lvm=fake)
    assert lvm.remove("db", lv, lvm=fake) is True
    assert lvm.remove("db", lv, lvm=fake) is False  # gone: idempotent
    assert fake.groups["vg0"][0] == 100 * MiB


def test_remove_never_touches_an_untagged_lv_of_our_name():
    fake = FakeLvm({"vg0": (100 * MiB, 4 * MiB)})
    untagged(fake, "vg0", "db")
    lv = lvm.LogicalVolume("vg0", "db", "dest", 8 * MiB)
    with pytest.raises(StackError, match="left alone"):
        lvm.remove("db", lv, lvm=fake)
    problems = lvm.remove_all("db", [lv], lvm=fake)
    assert len(problems) == 1 and ("vg0", "db") in fake.lv
    assert not [c for c in fake.calls if c[0] == "remove"]
    assert lvm.ours(lvm=fake) == []


def test_remove_all_goes_on_past_a_failure():
    fake = FakeLvm({"vg0": (100 * MiB, 4 * MiB)})
    a, b = lvm.plan("db", [("vg0", "dest", MiB), ("vg0", "meta", MiB)], lvm=fake)
    lvm.create("db", a, lvm=fake, wipe_header=False)
    untagged(fake, "vg0", b.name)  # someone else's LV took the name meanwhile
    assert len(lvm.remove_all("db", [a, b], lvm=fake)) == 1
    assert ("vg0", a.name) not in fake.lv and ("vg0", b.name) in fake.lv


def test_zero_start_wipes_the_header(tmp_path):
    path = tmp_path / "dev"
    path.write_bytes(b"\xff" * (3 * MiB))
    lvm.zero_start(str(path), 2 * MiB)
    data = path.read_bytes()
    assert data[:2 * MiB] == bytes(2 * MiB) and data[2 * MiB:] == b"\xff" * MiB


def test_device_for_names_a_missing_lv(tmp_path):
    link = tmp_path / "cow.img"
    os.symlink("/dev/novg-xyz/dmrecover-db-cow", link)
    calls = []

    class Inactive(FakeLvm):
        def activate(self, vg, name):
            calls.append((vg, name))

    saved = lvm._default
    lvm._default = Inactive({})
    try:
        with pytest.raises(StackError, match="COW LV /dev/novg-xyz/dmrecover-db-cow is "
                           "missing"):
            lvm.device_for(str(link), MiB, "COW")
    finally:
        lvm._default = saved
    assert calls == [("novg-xyz", "dmrecover-db-cow")]  # activation was tried first


# ------------------------------------------------------------------ the real boundary

def test_lvs_report_is_parsed(monkeypatch):
    report = {"report": [{"lv": [
        {"vg_name": "vg0", "lv_name": "db", "lv_tags": "dmrecover,dmrecover_session_db,"
         "dmrecover_role_dest", "lv_size": "8388608"},
        {"vg_name": "vg0", "lv_name": "home", "lv_tags": "", "lv_size": "4194304"}]}]}
    seen = []

    def run(argv, **kw):
        if argv[0] == "lvmconfig":  # no global_filter in lvm.conf
            return subprocess.CompletedProcess(argv, 5, "", "not found")
        seen.append(argv)
        return subprocess.CompletedProcess(argv, 0, json.dumps(report), "")

    monkeypatch.setattr(lvm.command, "run", run)
    infos = lvm.Lvm().lvs("vg0")
    assert seen[0][0] == "lvs" and seen[0][-1] == "vg0"
    assert seen[0][1] == "--config" and "dmrecover" in seen[0][2]  # never scans ours
    assert infos[0] == lvm.LvInfo("vg0", "db", ("dmrecover", "dmrecover_session_db",
                                                "dmrecover_role_dest"), 8 * MiB)
    assert infos[1].tags == ()
    assert [i.name for i in lvm.ours(lvm=lvm.Lvm())] == ["db"]


def test_blivet_import_keeps_its_dbus_chatter_off_stderr():
    """blivet is imported lazily, and what its import prints on fd 2 (libblockdev's DBus
    complaint where no system bus runs) goes to the debug log, not to the terminal; the LVM
    plugin is the one that runs the LVM tools (the DBus one needs lvm2-dbusd)."""
    code = ("import logging, sys, warnings, dmrecover.system.lvm as l\n"
            "assert 'blivet' not in sys.modules\n"
            "before, show = warnings.filters[:], warnings.showwarning\n"
            "logging.basicConfig(level=logging.WARNING)\n"
            "l._import_blivet()\n"
            "assert 'blivet' in sys.modules\n"
            "assert warnings.filters == before and warnings.showwarning is show\n"
            "bd = l._blivet.blockdev\n"
            "assert bd.get_plugin_soname(bd.Plugin.LVM) == l.LVM_PLUGIN\n"
            "logging.getLogger('blivet').warning('not for the user')\n"
            "print('imported')\n")
    try:
        import importlib.util
        if importlib.util.find_spec("blivet") is None:
            pytest.fail("blivet is not installed: pip install -e .[lvm]")
    except ValueError:
        pass
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "imported"
    assert res.stderr == ""


def test_the_cli_does_not_import_blivet():
    res = subprocess.run([sys.executable, "-c", "import sys, dmrecover.cli.main\n"
                          "assert 'blivet' not in sys.modules"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr


# ------------------------------------------------------------------ what cleanup removes

def _info(name: str, role: str, state_dir: str | None = "/s", session: str = "db",
          tags: tuple[str, ...] | None = None) -> lvm.LvInfo:
    return lvm.LvInfo("vg0", name, tuple(tags if tags is not None
                                         else lvm.tags_for(session, role, state_dir)), MiB)


def _lv(name: str, role: str = "") -> lvm.LogicalVolume:
    return lvm.LogicalVolume("vg0", name, role, MiB)


@pytest.mark.parametrize("info, recorded, intended, orphan", [
    # an overlay LV the record does not list: a start that died before it, a lost state dir
    (_info("dmrecover-db-cow", "cow"), [], [], True),
    (_info("dmrecover-db-meta", "meta"), [], [_lv("dmrecover-db-meta")], True),
    # listed by its session's record: never
    (_info("dmrecover-db-cow", "cow"), [_lv("dmrecover-db-cow")], [], False),
    (_info("db", "dest"), [_lv("db")], [_lv("db")], False),
    # DEST: only when the start's intent names it and no record does
    (_info("db", "dest"), [], [_lv("db")], True),
    (_info("db", "dest"), [], [], False),
    (_info("db", "dest"), [], [_lv("other")], False),
    # not ours, or ours without the state dir's tag (cleanup cannot ask its session)
    (_info("db", "dest", tags=("backup",)), [], [_lv("db")], False),
    (_info("dmrecover-db-cow", "cow", state_dir=None), [], [], False),
    (_info("x", "", tags=("dmrecover", "dmrecover_session_db", "dmrecover_state_/s")), [],
     [_lv("x")], False),  # no role: not an LV this dmrecover made
])
def test_orphaned_decides_on_tags_record_and_intent(info, recorded, intended, orphan):
    assert lvm.orphaned(info, recorded, intended) is orphan


def test_intent_is_written_private_read_back_and_cleared(tmp_path):
    d = str(tmp_path)
    assert lvm.read_intent(d) == []
    lvs = [lvm.LogicalVolume("vg0", "db", "dest", 8 * MiB),
           lvm.LogicalVolume("vg0", "dmrecover-db-cow", "cow", 4 * MiB)]
    lvm.write_intent(d, lvs)
    path = tmp_path / lvm.INTENT_FILE
    assert path.stat().st_mode & 0o777 == 0o600
    assert lvm.read_intent(d) == lvs
    lvm.clear_intent(d)
    assert not path.exists()
    lvm.clear_intent(d)  # gone: nothing to do
    path.write_text('{"lvs": [{"name": "x"}]}')
    path.chmod(0o600)
    with pytest.raises(DeviceError, match="unreadable"):
        lvm.read_intent(d)
    path.chmod(0o666)
    with pytest.raises(DeviceError, match="not trusted"):
        lvm.read_intent(d)


def test_intended_left_names_only_what_is_there_ours_and_this_dirs(tmp_path):
    fake = FakeLvm({"vg0": (100 * MiB, 4 * MiB)})
    d = str(tmp_path)
    a, b, c = (lvm.LogicalVolume("vg0", n, "dest", 4 * MiB) for n in ("a", "b", "c"))
    lvm.create("a", a, state_dir=d, lvm=fake, wipe_header=False)
    lvm.create("b", b, state_dir="/elsewhere", lvm=fake, wipe_header=False)
    untagged(fake, "vg0", "c")
    lvm.write_intent(d, [a, b, c, lvm.LogicalVolume("vg0", "never", "cow", MiB)])
    assert lvm.intended_left(d, lvm=fake) == [a]


def test_check_free_refuses_a_name_taken_since_the_plan():
    fake = FakeLvm({"vg0": (100 * MiB, 4 * MiB)})
    planned = lvm.plan("db", [("vg0", "dest", MiB)], lvm=fake)
    lvm.check_free("db", planned, lvm=fake)
    untagged(fake, "vg0", "db")
    with pytest.raises(DeviceError, match="not created by dmrecover"):
        lvm.check_free("db", planned, lvm=fake)


def test_lvm_commands_never_scan_our_devices_and_keep_the_system_filter(monkeypatch) -> None:
    """A dead session's waiting source blocks reads until `resume`: an `lvs` scanning it
    never returned. Every name of our dm devices is rejected ahead of lvm.conf's filter."""
    from dmrecover.system import lvm as lvm_mod

    monkeypatch.setattr(lvm_mod, "dm_nodes_with_uuid_prefix", lambda prefix: ["/dev/dm-7"])
    monkeypatch.setattr(lvm_mod, "system_global_filter", lambda: ["a|.*|"])
    cfg = lvm_mod.config()
    patterns = lvm_mod.parse_filter("global_filter=" + cfg.split("global_filter = ")[1])
    assert patterns[0] == "r|^/dev/dm-7$|"
    assert "r|^/dev/mapper/dmrecover-|" in patterns and patterns[-1] == "a|.*|"
    assert lvm_mod.parse_filter('global_filter=["a|^/dev/sd.*|","r|.*|"]') == [
        "a|^/dev/sd.*|", "r|.*|"]
