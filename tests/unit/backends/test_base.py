"""The undo list every set-up is built with, and the fault-injection hook (no root needed)."""

from __future__ import annotations

import pytest

from dmrecover import testhooks
from dmrecover.backends.base import UndoStack
from dmrecover.errors import StackError


def _fail(message: str) -> None:
    raise StackError(message)


def test_unwind_runs_newest_first_and_goes_on_past_failures() -> None:
    done: list[str] = []
    u = UndoStack()
    u.push("fuse", lambda: done.append("fuse"))
    u.push("loop", lambda: _fail("loop busy"))
    u.push("mount", lambda: done.append("mount"))
    assert u.names() == ["fuse", "loop", "mount"] and len(u) == 3
    errors = u.unwind()
    assert done == ["mount", "fuse"]
    assert errors == ["undo loop: loop busy"]
    assert len(u) == 0 and u.unwind() == []


def test_pop_by_name_takes_the_newest_of_that_name_out() -> None:
    done: list[str] = []
    u = UndoStack()
    u.push("a", lambda: done.append("a1"))
    u.push("b", lambda: done.append("b"))
    u.push("a", lambda: done.append("a2"))
    u.pop("a")()
    assert done == ["a2"] and u.names() == ["a", "b"]
    u.unwind()
    assert done == ["a2", "b", "a1"]
    with pytest.raises(KeyError):
        u.pop("a")


@pytest.mark.parametrize("step", ["fuse", "loop", "mount", "app", "cutover-unmount",
                                  "cutover-merge", "dm-probe", "origin-loop", "cow",
                                  "cow-loop", "dm-pseudo", "dm-merge"])
def test_fault_point_fires_only_with_the_hooks_enabled(monkeypatch: pytest.MonkeyPatch,
                                                      step: str) -> None:
    monkeypatch.delenv(testhooks.ENABLE_ENV, raising=False)
    monkeypatch.setenv(testhooks.FAIL_AT_ENV, step)
    testhooks.fault_point(step)  # a stray variable alone does nothing
    monkeypatch.setenv(testhooks.ENABLE_ENV, "1")
    testhooks.fault_point("some-other-step")
    with pytest.raises(StackError, match=f"injected failure at step {step}"):
        testhooks.fault_point(step)
    monkeypatch.setenv(testhooks.ENABLE_ENV, "0")
    testhooks.fault_point(step)
