"""The one way an integration test holds a live-restore sandbox: torn down at the end, and
checked to have left no mount and no loop device behind."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypeVar

from tests.apps.livekit import Sandbox

S = TypeVar("S", bound=Sandbox)


@contextmanager
def torn_down(sb: S) -> Iterator[S]:
    """Yield `sb`; afterwards tear it down and fail the test if mounts or loops are left."""
    try:
        yield sb
    finally:
        sb.teardown()
        assert not sb.mounts_under(), "teardown left mounts"
        assert not sb.loops_under(), "teardown left loops"
