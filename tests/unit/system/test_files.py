"""The one durable write: atomic replace, no temp left behind, JSON round trip."""

from __future__ import annotations

import os
import stat

import pytest

from dmrecover.errors import DmrecoverError, SessionError
from dmrecover.system import files


def test_atomic_write_replaces_whole_and_leaves_no_temp(tmp_path) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"old")
    files.atomic_write(target, b"new data")
    assert target.read_bytes() == b"new data"
    assert os.listdir(tmp_path) == ["f"]
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


def test_atomic_write_takes_several_parts_and_a_mode(tmp_path) -> None:
    target = tmp_path / "f"
    files.atomic_write(target, (b"head", memoryview(b"body")), mode=0o644, durable=False)
    assert target.read_bytes() == b"headbody"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


def test_atomic_write_failure_keeps_the_old_file_and_removes_the_temp(tmp_path) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"old")

    def parts():
        yield b"partial"
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError):
        files.atomic_write(target, parts())
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f"]


def test_atomic_write_with_a_temp_dir(tmp_path) -> None:
    (tmp_path / "tmp").mkdir()
    (tmp_path / "d").mkdir()
    files.atomic_write(tmp_path / "d" / "x", b"1", tmp_dir=tmp_path / "tmp", sync_dir=False)
    assert (tmp_path / "d" / "x").read_bytes() == b"1"
    assert os.listdir(tmp_path / "tmp") == []


def test_write_all_with_offset(tmp_path) -> None:
    p = tmp_path / "f"
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        files.write_all(fd, b"abc")
        files.write_all(fd, b"XY", 1)
    finally:
        os.close(fd)
    assert p.read_bytes() == b"aXY"


def test_json_round_trip_missing_and_corrupt(tmp_path) -> None:
    p = tmp_path / "r.json"
    assert files.read_json(p) is None
    files.write_json_atomic(p, {"b": 1, "a": [1, 2]})
    assert files.read_json(p) == {"a": [1, 2], "b": 1}
    p.write_text("{torn")
    with pytest.raises(DmrecoverError, match="unreadable"):
        files.read_json(p)
    p.write_text("[1]")
    with pytest.raises(SessionError, match="not a JSON object"):
        files.read_json(p, error=SessionError)


def test_fsync_dir(tmp_path) -> None:
    files.fsync_dir(tmp_path)
    with pytest.raises(NotADirectoryError):
        (tmp_path / "f").write_bytes(b"")
        files.fsync_dir(tmp_path / "f")
