"""Skips for a package missing on a developer's machine, never in CI: there
scripts/bootstrap.sh installs every package, so a missing one must fail the run rather than
hide a feature behind a skip."""

from __future__ import annotations

import os

import pytest

IN_CI = bool(os.environ.get("CI"))


def needs(present: bool, what: str) -> pytest.MarkDecorator:
    """Skip when `what` is missing, except in CI (where the test then runs and fails)."""
    return pytest.mark.skipif(not present and not IN_CI,
                              reason=f"{what} missing: run scripts/bootstrap.sh")
