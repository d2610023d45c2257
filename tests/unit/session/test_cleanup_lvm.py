"""`cleanup` and the LVs of a start (--overlay VG, --dest-vg VG): what it removes and when.

A start holds its state dir's lock from before its first lvcreate until its session process
(which holds it while it runs), and names its LVs in the state dir's intent file first. Cleanup
judges an LV only while no process holds the lock of the state dir its tag names, and again
under that lock before removing it: an overlay LV the record does not list goes, DEST's only
when the intent names it and the record does not. The windows are driven here with real
processes (a start forked and paused by the test hook, then killed or let go) over a fake
LVM shared through a file; tests/kernel/test_lvm.py does the same on a real volume group.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from dmrecover import testhooks
from dmrecover.backends.base import Leftover
from dmrecover.session import cleanup
from dmrecover.session.record import SESSION_FILE, take_state_lock
from dmrecover.session.start import prepare
from dmrecover.session.volume import release_claims
from dmrecover.system import lvm
from tests.unit.session.test_start_lvm import (  # noqa: F401 - fixtures
    KernelOverlay,
    fake_lvm,
    repo,
    request,
)
from tests.unit.system.test_lvm import FakeLvm, untagged

MiB = 1 << 20


class SharedFakeLvm(FakeLvm):
    """FakeLvm kept in a JSON file: a forked start and the test see the same LVs."""

    def __init__(self, path: Path, groups: dict[str, tuple[int, int]]) -> None:
        super().__init__(groups)
        self.path = path
        self._save()

    def _save(self) -> None:
        data = {"groups": self.groups,
                "lv": [[i.vg, i.name, list(i.tags), i.size] for i in self.lv.values()]}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.path)

    def _load(self) -> None:
        data = json.loads(self.path.read_text())
        self.groups = {k: tuple(v) for k, v in data["groups"].items()}
        self.lv = {(vg, name): lvm.LvInfo(vg, name, tuple(tags), size)
                   for vg, name, tags, size in data["lv"]}

    def create(self, vg, name, size, tags):
        self._load()
        super().create(vg, name, size, tags)
        self._save()

    def remove(self, vg, name):
        self._load()
        super().remove(vg, name)
        self._save()

    def volume_group(self, name):
        self._load()
        return super().volume_group(name)

    def lvs(self, vg=None):
        self._load()
        return super().lvs(vg)


@pytest.fixture
def shared_lvm(fake_lvm, monkeypatch, tmp_path) -> SharedFakeLvm:  # noqa: F811
    shared = SharedFakeLvm(tmp_path / "lvm.json", fake_lvm.groups)
    monkeypatch.setattr(lvm, "_default", shared)
    return shared


def lv_names(fake: FakeLvm) -> set[str]:
    return {f"{i.vg}/{i.name}" for i in fake.lvs()}


def orphan_names() -> set[str]:
    return {f"{i.vg}/{i.name}" for i in cleanup.find_orphan_lvs()}


def found_orphans() -> list[cleanup.Found]:
    """What `dmrecover cleanup` finds of the LVs (as find_leftovers lists them)."""
    return [cleanup.Found(None, Leftover("session", "lv", str(lvm.as_volume(i))))
            for i in cleanup.find_orphan_lvs()]


def remove_orphans() -> list[str]:
    return cleanup.remove_leftovers(found_orphans())


def fork_start(req, pause: Path, monkeypatch) -> int:  # noqa: F811
    """A start (prepare) in a child process, paused once its LVs exist, before its record."""
    monkeypatch.setenv(testhooks.ENABLE_ENV, "1")
    monkeypatch.setenv(testhooks.PAUSE_AT_ENV, "lvs-created")
    monkeypatch.setenv(testhooks.PAUSE_FILE_ENV, str(pause))
    pid = os.fork()
    if pid == 0:  # the child: never back into pytest
        rc = 1
        try:
            record, held, lock_fd = prepare(req, choose_backend=lambda n: KernelOverlay())
            release_claims(held)
            os.close(lock_fd)
            rc = 0
        finally:
            os._exit(rc)
    deadline = time.monotonic() + 60
    while not pause.exists():
        done, status = os.waitpid(pid, os.WNOHANG)
        assert not done, f"the start ended ({status}) before its pause"
        assert time.monotonic() < deadline, "the start never reached its pause"
        time.sleep(0.02)
    return pid


def test_a_start_killed_between_lvcreate_and_record_leaves_nothing_after_cleanup(
        tmp_path, repo, shared_lvm, monkeypatch) -> None:  # noqa: F811
    state = tmp_path / "state"
    untagged(shared_lvm, "vg0", "home")
    shared_lvm._save()
    pid = fork_start(request(tmp_path, repo, dest="", dest_vg="vg0", overlay="vg0"),
                     tmp_path / "pause", monkeypatch)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    assert lv_names(shared_lvm) == {"vg0/home", "vg0/db", "vg0/dmrecover-db-cow"}
    assert not (state / SESSION_FILE).exists()
    # DEST's LV too: the intent names it, no record does, no process holds the lock
    assert orphan_names() == {"vg0/db", "vg0/dmrecover-db-cow"}
    assert remove_orphans() == []
    assert lv_names(shared_lvm) == {"vg0/home"}
    assert not (state / lvm.INTENT_FILE).exists()


def test_cleanup_while_a_start_is_in_the_window_leaves_its_lvs(
        tmp_path, repo, shared_lvm, monkeypatch) -> None:  # noqa: F811
    state = tmp_path / "state"
    pause = tmp_path / "pause"
    pid = fork_start(request(tmp_path, repo, dest="", dest_vg="vg0", overlay="vg0"), pause,
                     monkeypatch)
    try:
        assert lv_names(shared_lvm) == {"vg0/db", "vg0/dmrecover-db-cow"}
        assert orphan_names() == set()  # the start holds the state dir's lock
        assert remove_orphans() == []
        assert lv_names(shared_lvm) == {"vg0/db", "vg0/dmrecover-db-cow"}
        pause.unlink()
        _, status = os.waitpid(pid, 0)
    except BaseException:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    assert os.waitstatus_to_exitcode(status) == 0  # the start completed
    data = json.loads((state / SESSION_FILE).read_text())
    assert [d["name"] for d in data["lvs"]] == ["db", "dmrecover-db-cow"]
    assert not (state / lvm.INTENT_FILE).exists()
    assert orphan_names() == set()  # listed by the record now, lock or no lock


def test_an_lv_judged_orphan_is_left_when_a_start_takes_the_lock_before_removal(
        tmp_path, shared_lvm) -> None:
    """Found by cleanup, then a process takes the state dir (a new start): the removal
    judges again under the lock, and leaves it."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    lv = lvm.LogicalVolume("vg0", "dmrecover-db-cow", "cow", 8 * MiB)
    lvm.create("db", lv, state_dir=str(state), wipe_header=False)
    found = found_orphans()
    assert [f.item.name for f in found] == ["vg0/dmrecover-db-cow"]
    fd = take_state_lock(str(state))
    try:
        assert cleanup.remove_leftovers(found) == []
        assert lv_names(shared_lvm) == {"vg0/dmrecover-db-cow"}
    finally:
        os.close(fd)
    assert cleanup.remove_leftovers(found) == []
    assert lv_names(shared_lvm) == set()


def write_record(state: Path, lvs: list[lvm.LogicalVolume], state_name: str = "done") -> None:
    state.mkdir(mode=0o700, exist_ok=True)
    data = {"format": "dmrecover-session", "version": 2, "name": "x", "state": state_name,
            "lvs": [lv.to_dict() for lv in lvs]}
    path = state / SESSION_FILE
    path.write_text(json.dumps(data))
    path.chmod(0o600)


def test_cleanup_never_removes_a_dest_lv_in_use_or_one_not_ours(tmp_path, shared_lvm) -> None:
    # a finished session's DEST (its record lists it); a forgotten one (state dir gone, the
    # application runs on it); a DEST no intent names (a state dir deleted by hand); an LV
    # without our tags; one of ours without the state dir's tag
    done, gone, bare = tmp_path / "done", tmp_path / "gone", tmp_path / "bare"
    made = {}
    for session, sdir in (("done", done), ("gone", gone), ("bare", bare)):
        lv = lvm.LogicalVolume("vg0", session, "dest", 4 * MiB)
        made[session] = lvm.create(session, lv, state_dir=str(sdir), wipe_header=False)
    write_record(done, [made["done"]])
    bare.mkdir(mode=0o700)
    untagged(shared_lvm, "vg0", "home")
    lvm.create("notag", lvm.LogicalVolume("vg0", "dmrecover-notag-cow", "cow", 4 * MiB),
               state_dir="/srv/my dir", wipe_header=False)
    shared_lvm._save()
    assert orphan_names() == set()
    # an overlay LV of the finished session (its cutover could not remove it): it goes
    cow = lvm.create("done", lvm.LogicalVolume("vg0", "dmrecover-done-cow", "cow", 4 * MiB),
                     state_dir=str(done), wipe_header=False)
    assert orphan_names() == {str(cow)}


def test_an_unreadable_intent_or_record_leaves_the_lv(tmp_path, shared_lvm) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    lvm.create("db", lvm.LogicalVolume("vg0", "db", "dest", 4 * MiB), state_dir=str(state),
               wipe_header=False)
    (state / lvm.INTENT_FILE).write_text("{not json")
    (state / lvm.INTENT_FILE).chmod(0o600)
    assert orphan_names() == set()
    lvm.write_intent(str(state), [lvm.LogicalVolume("vg0", "db", "dest", 4 * MiB)])
    assert orphan_names() == {"vg0/db"}
    (state / lvm.INTENT_FILE).chmod(0o622)  # another user could have written it
    assert orphan_names() == set()
