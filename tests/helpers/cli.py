"""Running the CLI in-process for a test (the `cli` fixture of tests/conftest.py)."""

from __future__ import annotations

import pytest

from dmrecover.cli.main import main

# Verbs with a progress display: quiet unless the test asks for one.
PROGRESS_VERBS = ("backup", "restore", "verify")


class CliRunner:
    """`cli(*argv) -> (exit code, stdout, stderr)`; `cli.error_line(err)` checks that stderr is
    exactly one `dmrecover: error: ...` line and returns it."""

    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self.capsys = capsys

    def __call__(self, *argv: str) -> tuple[int, str, str]:
        args = list(argv)
        if args and args[0] in PROGRESS_VERBS and "--progress" not in args:
            args += ["--progress", "none"]
        self.capsys.readouterr()  # what earlier steps printed is not this run's
        rc = main(args)
        out, err = self.capsys.readouterr()
        return rc, out, err

    @staticmethod
    def error_line(err: str) -> str:
        lines = err.strip().splitlines()
        assert len(lines) == 1, err
        assert lines[0].startswith("dmrecover: error: ")
        return lines[0]
