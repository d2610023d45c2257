"""`dmrecover demo`: the end-to-end demonstration."""

from __future__ import annotations

import argparse
import sys

from dmrecover.cli.common import require_root
from dmrecover.cli.status_display import LiveStatus
from dmrecover.demo.demo import DemoOptions, run_demo
from dmrecover.demo.pgdemo import demo_class


def do_demo(args: argparse.Namespace) -> int:
    require_root("demo")
    cls = demo_class(args.app)  # one-line error when --app postgres is not installed
    options = DemoOptions(size=args.size, fstype=args.fstype, backend=args.backend,
                          workdir=args.workdir, keep=args.keep)
    return run_demo(options, LiveStatus() if sys.stdout.isatty() else None, cls)
