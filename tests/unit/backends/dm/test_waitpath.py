"""The waiting source: its table, and a revive that never fails what is queued."""

from __future__ import annotations

import pytest

from dmrecover.backends.dm import ioctl, waitpath
from dmrecover.errors import StackError

MiB = 1 << 20


def test_the_source_queues_while_its_one_path_has_failed() -> None:
    assert waitpath.table("/dev/loop3", 2 * MiB) == (
        "0 4096 multipath 3 queue_if_no_path queue_mode bio 0 1 1 round-robin 0 1 1 "
        "/dev/loop3 1")


def test_revive_swaps_the_path_under_a_no_flush_suspend(monkeypatch) -> None:
    calls: list[tuple] = []
    monkeypatch.setattr(ioctl, "suspend", lambda n, **kw: calls.append(("suspend", n, kw)))
    monkeypatch.setattr(ioctl, "load", lambda n, t, **kw: calls.append(("load", n, t, kw)))
    monkeypatch.setattr(ioctl, "resume", lambda n, **kw: calls.append(("resume", n)))
    waitpath.revive("dmrecover-s-source", "/dev/loop9", MiB)
    # A flushing suspend turns queue_if_no_path off: the queued I/O would fail.
    assert calls[0] == ("suspend", "dmrecover-s-source", {"flush": False})
    assert calls[1][0] == "load" and "/dev/loop9" in calls[1][2]
    assert calls[1][3] == {"read_only": True}
    assert calls[2] == ("resume", "dmrecover-s-source")


def test_a_refused_table_resumes_the_source_on_its_old_one(monkeypatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(ioctl, "suspend", lambda n, **kw: calls.append("suspend"))

    def refuse(n, t, **kw):
        raise StackError("no such device")

    monkeypatch.setattr(ioctl, "load", refuse)
    monkeypatch.setattr(ioctl, "resume", lambda n, **kw: calls.append("resume"))
    with pytest.raises(StackError):
        waitpath.revive("dmrecover-s-source", "/dev/loop9", MiB)
    assert calls == ["suspend", "resume"]
