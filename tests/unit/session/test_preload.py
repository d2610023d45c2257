"""The backend's slow imports run beside the repository's opening, and never outlive it."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from dmrecover.backends.base import Backend
from dmrecover.errors import DmrecoverError
from dmrecover.session.app import AppSpec
from dmrecover.session.start import LiveRestoreRequest, prepare


class SlowImports(Backend):
    name = "slow-imports"
    description = "a backend whose preload takes a while"

    def __init__(self) -> None:
        self.preloaded_in: str | None = None
        self.done = threading.Event()

    def preload(self) -> None:
        self.preloaded_in = threading.current_thread().name
        time.sleep(0.3)
        self.done.set()

    def probe(self) -> None:
        return None

    def present(self, volume, ctx):  # pragma: no cover - never reached
        raise AssertionError

    def merge_into_dest(self, volume, ctx):  # pragma: no cover - never reached
        raise AssertionError

    def teardown_dead(self, ctx):  # pragma: no cover - never reached
        raise AssertionError

    def leftovers(self, sessions):  # pragma: no cover - never reached
        return []

    def remove_leftover(self, leftover):  # pragma: no cover - never reached
        raise AssertionError


def test_preload_runs_in_a_thread_that_is_joined_even_when_the_open_fails(
        tmp_path: Path) -> None:
    backend = SlowImports()
    req = LiveRestoreRequest(repo=str(tmp_path / "no-repo"), backup="b",
                             dest=str(tmp_path / "dest"), mountpoint=str(tmp_path / "mnt"),
                             app=AppSpec(start="true"), state_dir=str(tmp_path / "state"))
    (tmp_path / "mnt").mkdir()
    with pytest.raises(DmrecoverError):
        prepare(req, choose_backend=lambda name: backend)
    assert backend.preloaded_in == "preload"  # not the caller's thread
    # joined before prepare() returned: the session process is forked from this process,
    # and a thread still importing at the fork would leave the child's import lock held
    assert backend.done.is_set()
    assert not any(t.name == "preload" for t in threading.enumerate())
