"""Small things every verb's handler uses."""

from __future__ import annotations

import os

from dmrecover.errors import NotRootError


def require_root(what: str) -> None:
    """Fail early, before anything is touched, when root is needed and we are not."""
    if os.geteuid() != 0:
        raise NotRootError(f"{what} needs root", hint="run it as root")
