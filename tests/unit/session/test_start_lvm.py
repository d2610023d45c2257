"""live-restore's LVM choices (--overlay VG, --dest-vg VG): which form --overlay is, the
refusals (one line, nothing created), the LV created, linked and recorded. LVM itself is faked
at the boundary (system.lvm.Lvm); tests/kernel/test_lvm.py runs a real volume group."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dmrecover.backends.base import Backend
from dmrecover.errors import DeviceError, StackError, UsageError
from dmrecover.repository.backup import backup
from dmrecover.repository.repo import Repository
from dmrecover.session.app import AppSpec
from dmrecover.session.record import lock_held
from dmrecover.session.start import LiveRestoreRequest, overlay_vg, prepare
from dmrecover.session.volume import release_claims
from dmrecover.system import claims, lvm
from tests.unit.system.test_lvm import FakeLvm

MiB = 1 << 20


class KernelOverlay(Backend):
    """A backend whose overlay file may be a block device (as dm's COW)."""

    name = "dm"
    description = "test"
    kernel_takes_writes = True

    def __init__(self, lv_capable: bool = True) -> None:
        self.lv_capable = lv_capable

    def probe(self) -> None:
        return None

    def overlay_file(self, size: int):
        return ("cow.img", size + MiB) if self.lv_capable else None

    def present(self, volume, ctx):  # pragma: no cover - never reached
        raise AssertionError

    def merge_into_dest(self, volume, ctx):  # pragma: no cover
        raise AssertionError

    def teardown_dead(self, ctx):  # pragma: no cover
        return []

    def leftovers(self, sessions):  # pragma: no cover
        return []

    def remove_leftover(self, leftover):  # pragma: no cover
        raise AssertionError


@pytest.fixture
def fake_lvm(monkeypatch, tmp_path):
    fake = FakeLvm({"vg0": (64 * MiB, 4 * MiB), "tiny": (8 * MiB, 4 * MiB)})
    monkeypatch.setattr(lvm, "_default", fake)
    # No real block device behind the fake LV: the header wipe is the kernel test's, and
    # DEST's claim (--dest-vg) is taken on a file standing in for the LV.
    monkeypatch.setattr(lvm, "zero_start", lambda path, length: None)
    real_claim = claims.claim_destination

    def claim_destination(path, owner, **kw):
        if str(path).startswith("/dev/vg0/"):
            return real_claim(tmp_path / ("lv-" + os.path.basename(path)), owner)
        return real_claim(path, owner, **kw)

    monkeypatch.setattr(claims, "claim_destination", claim_destination)
    return fake


@pytest.fixture
def repo(tmp_path: Path, fs_tools) -> tuple[str, str]:
    img = tmp_path / "vol.img"
    with open(img, "wb") as f:
        f.truncate(16 * MiB)
    fs_tools.mkfs(img, "ext4")
    r = Repository.init(str(tmp_path / "repo"), encryption="none")
    return str(tmp_path / "repo"), backup(str(img), r, name="vol", chunk_size=1 << 20).id


def request(tmp_path: Path, repo, **kw) -> LiveRestoreRequest:
    (tmp_path / "mnt").mkdir(exist_ok=True)
    base = dict(repo=repo[0], backup=repo[1], dest=str(tmp_path / "dest.img"),
                mountpoint=str(tmp_path / "mnt"), app=AppSpec(start="true"), session="db",
                state_dir=str(tmp_path / "state"))
    base.update(kw)
    return LiveRestoreRequest(**base)


def test_overlay_names_a_directory_or_a_volume_group(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "spool").mkdir()
    assert overlay_vg(None) is None
    assert overlay_vg("/srv/overlay") is None and overlay_vg("./new") is None
    assert overlay_vg("spool") is None  # an existing directory stays a directory
    assert overlay_vg("vg0") == "vg0"


def test_the_cow_on_a_new_tagged_lv_linked_and_recorded(tmp_path, repo, fake_lvm) -> None:
    record, held, lock_fd = prepare(request(tmp_path, repo, overlay="vg0"),
                                    choose_backend=lambda n: KernelOverlay())
    try:
        [(call, vg, name, size, tags)] = fake_lvm.calls
        assert (call, vg, name) == ("create", "vg0", "dmrecover-db-cow")
        assert size == 20 * MiB  # 16 MiB + 1 MiB, rounded up to 4 MiB extents
        assert tags == ("dmrecover", "dmrecover_session_db", "dmrecover_role_cow",
                        f"dmrecover_state_{tmp_path}/state")
        assert os.readlink(tmp_path / "state" / "cow.img") == "/dev/vg0/dmrecover-db-cow"
        assert record.lvs == [{"vg": "vg0", "name": "dmrecover-db-cow", "role": "cow",
                               "size": 20 * MiB}]
        assert record.engine_dir == str(tmp_path / "state")
        # the record lists the LV: the start's intent file is gone
        assert not (tmp_path / "state" / lvm.INTENT_FILE).exists()
    finally:
        release_claims(held)
        os.close(lock_fd)


@pytest.mark.parametrize("kw, backend, error, text", [
    ({"overlay": "tiny"}, KernelOverlay(), DeviceError, "volume group tiny has 8.0 MiB free"),
    ({"overlay": "nope"}, KernelOverlay(), DeviceError, "--overlay nope: no such LVM volume"),
    ({"overlay": "vg0"}, KernelOverlay(lv_capable=False), UsageError,
     "needs the dm or dm-clone backend"),
    ({"dest_vg": "vg0"}, KernelOverlay(), UsageError, "name DEST or --dest-vg VG"),
    ({"dest": "", "dest_vg": None}, KernelOverlay(), UsageError, "name DEST or --dest-vg"),
])
def test_refusals_are_one_line_and_create_nothing(tmp_path, repo, fake_lvm, kw, backend,
                                                  error, text) -> None:
    with pytest.raises(error) as exc:
        prepare(request(tmp_path, repo, **kw), choose_backend=lambda n: backend)
    assert text in str(exc.value) and "\n" not in str(exc.value)
    assert fake_lvm.calls == []
    assert not (tmp_path / "state" / "session.json").exists()
    assert not os.path.lexists(tmp_path / "state" / "cow.img")


def test_an_lv_not_ours_with_our_name_is_refused_and_kept(tmp_path, repo, fake_lvm) -> None:
    fake_lvm.lv[("vg0", "dmrecover-db-cow")] = lvm.LvInfo("vg0", "dmrecover-db-cow", (),
                                                          4 * MiB)
    with pytest.raises(DeviceError, match="not created by dmrecover"):
        prepare(request(tmp_path, repo, overlay="vg0"),
                choose_backend=lambda n: KernelOverlay())
    assert fake_lvm.calls == [] and ("vg0", "dmrecover-db-cow") in fake_lvm.lv


def test_the_lvs_are_created_under_the_state_lock_and_named_first(tmp_path, repo,
                                                                   fake_lvm) -> None:
    """Each lvcreate happens while this process holds the state dir's lock (cleanup judges no
    LV of a locked state dir) and after the intent file names it (cleanup's record of what a
    start that dies before its record made); the lock is handed to the caller."""
    state = tmp_path / "state"
    seen = []
    create = fake_lvm.create

    def checked_create(vg, name, size, tags):
        seen.append((name, lock_held(str(state)),
                     [lv.name for lv in lvm.read_intent(str(state))]))
        create(vg, name, size, tags)

    fake_lvm.create = checked_create
    record, held, lock_fd = prepare(request(tmp_path, repo, dest="", dest_vg="vg0",
                                            overlay="vg0"),
                                    choose_backend=lambda n: KernelOverlay())
    try:
        assert seen == [("db", True, ["db", "dmrecover-db-cow"]),
                        ("dmrecover-db-cow", True, ["db", "dmrecover-db-cow"])]
        assert lock_held(str(state))  # held on, for the session process
        assert [d["name"] for d in record.lvs] == ["db", "dmrecover-db-cow"]
        assert not (state / lvm.INTENT_FILE).exists()
    finally:
        release_claims(held)
        os.close(lock_fd)
    assert not lock_held(str(state))


def test_a_failed_start_removes_its_lvs_and_its_intent(tmp_path, repo, fake_lvm,
                                                        monkeypatch) -> None:
    def fail(*a, **kw):
        raise StackError("the record could not be written")

    monkeypatch.setattr("dmrecover.session.start._write_session", fail)
    with pytest.raises(StackError):
        prepare(request(tmp_path, repo, dest="", dest_vg="vg0", overlay="vg0"),
                choose_backend=lambda n: KernelOverlay())
    assert fake_lvm.lv == {}
    assert [c[0] for c in fake_lvm.calls] == ["create", "create", "remove", "remove"]
    assert not (tmp_path / "state" / lvm.INTENT_FILE).exists()
    assert not lock_held(str(tmp_path / "state"))


def test_an_lv_the_undo_cannot_remove_stays_named_for_cleanup(tmp_path, repo, fake_lvm,
                                                               monkeypatch) -> None:
    def fail(*a, **kw):
        raise StackError("the record could not be written")

    def stuck(vg, name):
        raise StackError(f"removing LV {vg}/{name}: in use")

    monkeypatch.setattr("dmrecover.session.start._write_session", fail)
    fake_lvm.remove = stuck
    with pytest.raises(StackError):
        prepare(request(tmp_path, repo, dest="", dest_vg="vg0", overlay="vg0"),
                choose_backend=lambda n: KernelOverlay())
    assert set(fake_lvm.lv) == {("vg0", "db"), ("vg0", "dmrecover-db-cow")}
    assert [lv.name for lv in lvm.read_intent(str(tmp_path / "state"))] == [
        "db", "dmrecover-db-cow"]


def test_a_header_wipe_that_fails_leaves_no_lv(tmp_path, repo, fake_lvm,
                                               monkeypatch) -> None:
    """The LV exists once lvcreate returned, even when its header wipe then fails: the undo
    finds it through the intent file."""
    def wipe_fails(path, length):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(lvm, "zero_start", wipe_fails)
    with pytest.raises(OSError):
        prepare(request(tmp_path, repo, overlay="vg0"),
                choose_backend=lambda n: KernelOverlay())
    assert fake_lvm.lv == {}
    assert not (tmp_path / "state" / lvm.INTENT_FILE).exists()


def test_an_earlier_starts_leftovers_refuse_a_new_start(tmp_path, repo, fake_lvm) -> None:
    """An LV that an earlier start in this state dir made and never handed over (still named
    by its intent) refuses the next start in one line: cleanup removes it (a new intent
    would forget it)."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    lv = lvm.LogicalVolume("vg0", "old", "dest", 8 * MiB)
    lvm.create("old", lv, state_dir=str(state), lvm=fake_lvm, wipe_header=False)
    lvm.write_intent(str(state), [lv])
    fake_lvm.calls.clear()
    with pytest.raises(DeviceError) as exc:
        prepare(request(tmp_path, repo, overlay="vg0"),
                choose_backend=lambda n: KernelOverlay())
    assert "vg0/old of an earlier start" in str(exc.value) and "\n" not in str(exc.value)
    assert fake_lvm.calls == [] and ("vg0", "old") in fake_lvm.lv
