"""The clone target's tables and status lines (the kernel side is in tests/kernel)."""

from __future__ import annotations

import os

import pytest

from dmrecover.backends.base import BackendContext
from dmrecover.backends.dm_clone import DmCloneBackend, target
from dmrecover.backends.dm_clone.stack import make_sparse
from dmrecover.errors import StackError

MiB = 1 << 20


def test_table_starts_without_hydration_and_batches_copies() -> None:
    t = target.clone_table("/dev/loop1", "/dev/loop2", "/dev/loop3", 64 * MiB)
    assert t == ("0 131072 clone /dev/loop1 /dev/loop2 /dev/loop3 128 1 no_hydration "
                 "4 hydration_threshold 64 hydration_batch_size 16")
    assert " 0 4 hydration_threshold" in target.clone_table("m", "d", "s", MiB, hydrate=True)
    with pytest.raises(StackError):
        target.clone_table("m", "d", "s", 1000)  # not whole sectors


def test_test_restore_delay_slows_hydration_only_with_the_hooks_on(monkeypatch) -> None:
    monkeypatch.setenv("DMRECOVER_TEST_RESTORE_DELAY", "0.25")
    assert "hydration_threshold 64 hydration_batch_size 16" in target.clone_table(
        "m", "d", "s", MiB)
    monkeypatch.setenv("DMRECOVER_TEST_HOOKS", "1")
    assert target.clone_table("m", "d", "s", MiB).endswith(
        "4 hydration_threshold 1 hydration_batch_size 1")


def test_status_while_hydrating() -> None:
    st = target.parse_status("0 131072 clone 8 72/32768 128 100/1024 16 1 no_hydration "
                             "4 hydration_threshold 64 hydration_batch_size 16 rw -")
    assert (st.region_sectors, st.hydrated, st.regions, st.hydrating) == (128, 100, 1024, 16)
    assert not st.hydration_enabled and not st.complete and not st.needs_check
    assert st.as_dict()["hydrated_bytes"] == 100 * 64 * 1024
    assert abs(st.as_dict()["hydrated_fraction"] - 100 / 1024) < 1e-9


def test_status_complete_and_failure_modes() -> None:
    done = target.parse_status("0 8 clone 8 9/32768 128 4/4 0 0 4 hydration_threshold 64 "
                               "hydration_batch_size 16 rw -")
    assert done.complete and done.hydration_enabled and done.fraction == 1.0
    check = target.parse_status("0 8 clone 8 9/32768 128 1/4 0 0 0 ro needs_check")
    assert check.read_only_metadata and check.needs_check and not check.complete
    assert target.parse_status("0 8 clone Fail").failed
    for bad in ("0 8 snapshot 16/1024 16", "0 8 clone what is this"):
        with pytest.raises(StackError):
            target.parse_status(bad)


def test_metadata_grows_with_the_region_count() -> None:
    small = target.metadata_size(64 * MiB)
    assert small % 4096 == 0 and small >= 4 * MiB
    assert target.metadata_size(1 << 40) > small


def test_engine_restores_into_a_private_sparse_staging_file(tmp_path) -> None:
    eng = tmp_path / "engine"
    ctx = BackendContext(session="s", state_dir=str(tmp_path), engine_dir=str(eng),
                         mountpoint=str(tmp_path / "mp"), fstype="ext4",
                         dest=str(tmp_path / "dest.img"), size=8 * MiB)
    path = DmCloneBackend().engine_dest(ctx)
    assert path != ctx.dest and os.path.dirname(path) == str(eng)
    st = os.stat(path)
    assert st.st_size == 8 * MiB and st.st_mode & 0o777 == 0o600
    assert st.st_blocks == 0  # sparse
    assert not make_sparse(path, 4 * MiB)  # kept, never shrunk
    assert os.path.getsize(path) == 8 * MiB
