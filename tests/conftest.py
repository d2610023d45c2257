"""Fixtures for every test level: running the CLI, and real filesystem images for the root
and kernel suites (the helpers behind them are in tests/helpers/images.py)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest

from dmrecover.system import loops
from tests.helpers import images
from tests.helpers.cli import CliRunner

MiB = 1 << 20


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> CliRunner:
    """Run `dmrecover` in this process: `rc, out, err = cli("list", "--repo", r)`."""
    return CliRunner(capsys)


@pytest.fixture
def loop_device() -> Iterator[Callable[..., str]]:
    """attach(path, read_only=False) -> /dev/loopN; every device is detached at the end."""
    devs: list[str] = []

    def attach(path: str | os.PathLike[str], read_only: bool = False) -> str:
        dev = loops.attach(path, read_only=read_only)
        devs.append(dev)
        return dev

    try:
        yield attach
    finally:
        for dev in reversed(devs):
            try:
                loops.detach(dev)
            except Exception as err:  # keep detaching the others
                print(f"cleanup: {dev}: {err}")


@pytest.fixture(scope="session")
def ext4_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 48 MiB ext4 image with real data (shared: do not modify; copy it first)."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    return images.make_fs_image(tmp_path_factory.mktemp("img") / "ext4.img", "ext4", seed=1)


@pytest.fixture(scope="session")
def xfs_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 64 MiB xfs image with real data (shared: do not modify; copy it first)."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    return images.make_fs_image(tmp_path_factory.mktemp("img") / "xfs.img", "xfs",
                                size=64 * MiB, seed=2)


@pytest.fixture(scope="session")
def fs_tools() -> ModuleType:
    """The image helpers (tests/helpers/images.py: make_fs_image, mkfs, fill_with_data,
    mounted, attached, copy_sparse), for tests that take them as a fixture."""
    return images
