"""The external-command wrapper: argv lists, LC_ALL=C, timeouts, errors carrying the details."""

from __future__ import annotations

import pytest

from dmrecover.errors import CommandError, StackError
from dmrecover.system import command


def test_run_returns_stdout_and_sets_c_locale() -> None:
    proc = command.run(["sh", "-c", 'printf "%s" "$LC_ALL"'])
    assert proc.stdout == "C"
    assert proc.returncode == 0


def test_failure_raises_the_given_error_type_with_details() -> None:
    with pytest.raises(StackError) as info:
        command.run(["sh", "-c", "echo first >&2; echo 'the last line' >&2; exit 3"],
                    error=StackError, what="frobnicate")
    err = info.value
    assert err.returncode == 3
    assert err.argv[0] == "sh"
    assert "the last line" in err.stderr
    # one line, naming what failed, the exit code and stderr's last line
    assert str(err) == "frobnicate failed (exit 3): the last line"


def test_check_false_returns_the_failure() -> None:
    proc = command.run(["false"], check=False)
    assert proc.returncode == 1


def test_missing_program_is_a_clear_error() -> None:
    with pytest.raises(CommandError, match="program no-such-program-xyz not found"):
        command.run(["no-such-program-xyz"])


def test_timeout_is_an_error() -> None:
    with pytest.raises(CommandError, match="timed out after 0.2s"):
        command.run(["sleep", "5"], timeout=0.2)


def test_arguments_are_never_shell_interpreted() -> None:
    proc = command.run(["echo", "$(id)", ";", "|"])
    assert proc.stdout.strip() == "$(id) ; |"


def test_find_looks_in_sbin() -> None:
    assert command.have("sh")
    assert command.find("losetup") is not None
    assert not command.have("no-such-program-xyz")
