"""system.forked: a call in a child process, its result or its error brought back."""

from __future__ import annotations

import os
import threading

import pytest

from dmrecover.errors import DmrecoverError, StackError
from dmrecover.system import forked


def test_the_result_comes_back_and_the_childs_threads_stay_there() -> None:
    def work() -> dict:
        t = threading.Thread(target=lambda: threading.Event().wait(30), daemon=True)
        t.start()  # still running when the child ends: it ends with it
        return {"pid": os.getpid(), "threads": threading.active_count()}

    before = threading.active_count()
    out = forked.call(work, what="work")
    assert out["pid"] != os.getpid() and out["threads"] == before + 1
    assert threading.active_count() == before


def test_our_error_comes_back_as_itself() -> None:
    def fail() -> None:
        raise StackError("dmsetup said no", hint="try again", argv=["dmsetup", "remove"],
                         returncode=5, stderr="busy")

    with pytest.raises(StackError) as info:
        forked.call(fail, what="work")
    err = info.value
    assert (err.message, err.hint, err.argv, err.returncode, err.stderr) == (
        "dmsetup said no", "try again", ["dmsetup", "remove"], 5, "busy")


def test_any_other_error_is_named() -> None:
    def fail() -> None:
        raise KeyError("x")

    with pytest.raises(DmrecoverError, match="work: KeyError"):
        forked.call(fail, what="work")


def test_a_child_that_dies_says_so() -> None:
    with pytest.raises(DmrecoverError, match="died"):
        forked.call(lambda: os._exit(3), what="work")
