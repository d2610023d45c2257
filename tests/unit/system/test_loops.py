"""Loop lookups over a fake /sys/block; attach/detach need root (integration tests)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dmrecover.system import loops


@pytest.fixture
def sysblock(tmp_path: Path, monkeypatch) -> Path:
    root = tmp_path / "sys"
    for name, backing in (("loop0", "/state/a/volume\n"), ("loop1", "/other/x (deleted)\n"),
                          ("loop7", "/state/ab\n")):
        (root / name / "loop").mkdir(parents=True)
        (root / name / "loop" / "backing_file").write_text(backing)
    (root / "loop2").mkdir()  # unattached: no loop/ directory
    (root / "sda").mkdir()
    monkeypatch.setattr(loops, "SYS_BLOCK", root)
    return root


def test_backing_file(sysblock: Path) -> None:
    assert loops.backing_file("/dev/loop0") == "/state/a/volume"
    assert loops.backing_file("loop1") == "/other/x"  # " (deleted)" stripped
    assert loops.backing_file("/dev/loop2") is None
    assert loops.backing_file("/dev/loop9") is None


def test_loops_backed_under(sysblock: Path) -> None:
    assert loops.loops_backed_under("/state/a") == [("/dev/loop0", "/state/a/volume")]
    assert loops.loops_backed_under("/state/ab") == [("/dev/loop7", "/state/ab")]
    assert loops.loops_backed_under("/nowhere") == []


def test_loop_of_is_empty_without_loops(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(loops, "SYS_BLOCK", tmp_path / "empty")
    f = tmp_path / "img"
    f.write_bytes(b"x")
    assert loops.loop_of(f) == []


def test_detach_of_an_unattached_device_is_a_no_op(sysblock: Path) -> None:
    loops.detach("/dev/loop2")
