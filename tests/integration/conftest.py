"""The root suite: tests marked `root` are skipped for other users. Its fixtures (real
ext4/xfs images, loop devices) are in tests/conftest.py, shared with the kernel suite."""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (loop devices, mounts)")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)
