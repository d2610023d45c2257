"""`dmrecover cleanup` and the applications' cgroups (root, real cgroup v2): the empty cgroup of
a dead session goes; a populated one, a live session's (its state dir's lock held by a process,
state dir outside the state root), and a cgroup not named by a session stay."""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from dmrecover.session import cleanup
from dmrecover.session.app import cgroup_name
from dmrecover.session.record import LOCK_FILE, SESSION_FILE, write_json_atomic
from dmrecover.system import cgroups
from dmrecover.system.cgroups import AppCgroup

pytestmark = pytest.mark.root


@pytest.fixture
def parent() -> str:
    """Where the applications' cgroups are made (<v2 root>/dmrecover)."""
    root = cgroups.cgroup2_root()
    if root is None:
        pytest.fail("no cgroup v2 hierarchy on this host")
    path = os.path.join(root, cgroups.PARENT)
    os.makedirs(path, exist_ok=True)
    return path


def _state_dir(tmp_path: Path, name: str) -> Path:
    d = tmp_path / name
    d.mkdir(mode=0o700)
    write_json_atomic(d / SESSION_FILE, {"name": name, "state": "restoring"})
    return d


@contextlib.contextmanager
def _session_cgroup(parent: str, tmp_path: Path, prefix: str) -> Iterator[tuple[str, str]]:
    """An empty cgroup named by a dead session's state dir (prefix + a random tag), removed
    afterwards; yields (tag, cgroup path)."""
    tag = uuid.uuid4().hex[:6]
    d = _state_dir(tmp_path, f"{prefix}{tag}")
    path = os.path.join(parent, cgroup_name(d.name, str(d)))
    os.makedirs(path)
    try:
        yield tag, path
    finally:
        os.rmdir(path)


def _held_lock(state_dir: Path) -> subprocess.Popen:
    """A process holding the state dir's lock, as a live session process does."""
    code = ("import fcntl, os, sys, time\n"
            f"fd = os.open({str(state_dir / LOCK_FILE)!r}, os.O_RDWR | os.O_CREAT, 0o600)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "print('locked', flush=True)\n"
            "time.sleep(600)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "locked"
    return p


def test_cleanup_removes_only_dead_sessions_empty_cgroups(parent: str, tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:6]
    dead_dir = _state_dir(tmp_path, f"dead{tag}")
    live_dir = _state_dir(tmp_path, f"live{tag}")
    busy_dir = _state_dir(tmp_path, f"busy{tag}")
    dead = os.path.join(parent, cgroup_name(dead_dir.name, str(dead_dir)))
    live = os.path.join(parent, cgroup_name(live_dir.name, str(live_dir)))
    other = os.path.join(parent, f"notasession{tag}")
    for path in (dead, live, other):
        os.makedirs(path)
    os.makedirs(os.path.join(dead, "child"))  # a nested cgroup goes too
    busy = AppCgroup.create(cgroup_name(busy_dir.name, str(busy_dir)), kinds=("cgroup2",))
    holder = _held_lock(live_dir)
    try:
        busy.start(["sleep", "600"])
        found = {f.item.name: f for f in cleanup.find_leftovers()
                 if f.backend is None and tag in f.item.name}
        assert set(found) == {dead}, found
        assert str(found[dead]) == f"cgroup {dead}"
        assert cleanup.remove_leftovers([found[dead]]) == []
        assert not os.path.exists(dead)
        for path in (live, other, busy.path):
            assert os.path.isdir(path), path
        # the kernel's own refusal: a populated cgroup is never removed
        assert cgroups.remove_empty_cgroup(busy.path) is False and os.path.isdir(busy.path)
        # once the live session's process is gone, its empty cgroup is a leftover
        holder.kill()
        holder.wait(10)
        assert live in {f.item.name for f in cleanup.find_leftovers() if f.backend is None}
    finally:
        holder.kill()
        holder.wait(10)
        busy.kill(timeout=10)
        busy.remove()
        for path in (live, other, dead):
            for d in (os.path.join(path, "child"), path):
                if os.path.isdir(d):
                    os.rmdir(d)


def test_cleanup_dry_run_lists_the_cgroup(parent: str, tmp_path: Path) -> None:
    with _session_cgroup(parent, tmp_path, "dry") as (_tag, path):
        r = subprocess.run([sys.executable, "-m", "dmrecover", "cleanup", "--dry-run"],
                           capture_output=True, text=True, timeout=120, cwd="/")
        assert r.returncode == 0, r.stderr
        assert f"would remove cgroup {path}" in r.stdout
        assert os.path.isdir(path)


def test_backend_only_lookups_leave_cgroups_out(parent: str, tmp_path: Path) -> None:
    """Asking given backends (as their own tests do) lists no cgroup."""
    with _session_cgroup(parent, tmp_path, "be") as (tag, _path):
        assert not [f for f in cleanup.find_leftovers([]) if tag in str(f)]
        assert [f for f in cleanup.find_leftovers([], app_cgroups=True) if tag in str(f)]


def test_lock_file_fd_marks_the_state_dir_live(tmp_path: Path) -> None:
    d = _state_dir(tmp_path, "lk")
    fd = os.open(d / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        # our own fd: lock_held sees it held (another open file description)
        assert str(d) in cleanup.live_state_dirs()
    finally:
        os.close(fd)
    assert str(d) not in cleanup.live_state_dirs()
