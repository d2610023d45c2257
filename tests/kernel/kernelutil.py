"""Helpers shared by the kernel tests (imported by name: tests/kernel is on sys.path)."""

from __future__ import annotations

import subprocess
import uuid as uuidlib

from dmrecover import DM_UUID_PREFIX
from dmrecover.backends.dm import dmsetup as dm


def sh(*argv: str, check: bool = True, input: bytes | None = None) -> str:
    """Run a command for a test (the tests' own steps, not dmrecover's)."""
    res = subprocess.run(argv, check=check, capture_output=True, input=input)
    return res.stdout.decode()


def owned_names() -> set[str]:
    return {d.name for d in dm.list_owned()}


def foreign_uuid() -> str:
    u = f"TEST-{uuidlib.uuid4().hex[:12]}"
    assert not u.startswith(DM_UUID_PREFIX)
    return u
