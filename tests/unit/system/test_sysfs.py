"""system/sysfs.py: what is written to sysfs, against a directory laid out like it."""

from __future__ import annotations

from pathlib import Path

from dmrecover.system.sysfs import xfs_stop_retrying


def test_xfs_stop_retrying_sets_every_error_class(tmp_path: Path) -> None:
    meta = tmp_path / "loop5" / "error" / "metadata"
    for cls in ("EIO", "ENOSPC", "ENODEV", "default"):
        (meta / cls).mkdir(parents=True)
        (meta / cls / "max_retries").write_text("-1\n")
    assert xfs_stop_retrying("/dev/loop5", root=str(tmp_path))
    assert {p.parent.name: p.read_text() for p in meta.glob("*/max_retries")} == {
        "EIO": "0", "ENOSPC": "0", "ENODEV": "0", "default": "0"}


def test_xfs_stop_retrying_without_an_xfs_changes_nothing(tmp_path: Path) -> None:
    (tmp_path / "loop6").mkdir()
    assert not xfs_stop_retrying("/dev/loop5", root=str(tmp_path))
    assert not xfs_stop_retrying("/dev/loop6", root=str(tmp_path))
    assert [p.name for p in tmp_path.iterdir()] == ["loop6"]
