"""`dmrecover demo`: the end-to-end demonstration."""

from __future__ import annotations

import argparse

from dmrecover.cli.common import require_root
from dmrecover.demo.demo import run_demo


def do_demo(args: argparse.Namespace) -> int:
    require_root("demo")
    return run_demo(args)
