"""Fixtures for every test level."""

from __future__ import annotations

import pytest

from tests.helpers.cli import CliRunner


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> CliRunner:
    """Run `dmrecover` in this process: `rc, out, err = cli("list", "--repo", r)`."""
    return CliRunner(capsys)
