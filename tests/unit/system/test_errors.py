"""Every error type accepts what command.run passes it, and carries its exit code."""

from __future__ import annotations

import pytest

from dmrecover import errors
from dmrecover.system import command

CLASSES = errors.all_error_classes()

# The documented table (errors.py): transient failures are 75 (EX_TEMPFAIL), retried as is.
EXPECTED_CODES = {
    "DmrecoverError": 1, "UsageError": 2, "CorruptChunk": 65, "BitmapError": 65,
    "RepositoryError": 66, "BackupNotFound": 66, "BackendUnavailable": 69, "EngineError": 70,
    "OverlayError": 70, "SessionError": 70, "AppError": 70, "CommandError": 71,
    "StackError": 71, "DeviceError": 74, "RepositoryUnavailable": 75, "RepositoryLocked": 75,
    "NotRootError": 77,
}


def test_every_class_has_a_documented_exit_code() -> None:
    assert {c.__name__ for c in CLASSES} == set(EXPECTED_CODES)
    for cls in CLASSES:
        assert cls.exit_code == EXPECTED_CODES[cls.__name__], cls
        assert f"\n{cls.__name__} " in errors.__doc__, f"{cls.__name__} missing from the table"


def test_only_transient_failures_are_tempfail() -> None:
    tempfail = {c.__name__ for c in CLASSES if c.exit_code == 75}
    assert tempfail == {"RepositoryUnavailable", "RepositoryLocked"}


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_failing_command_raises_the_given_class(cls: type[errors.DmrecoverError]) -> None:
    argv = ["sh", "-c", "echo first >&2; echo 'stop failed' >&2; exit 3"]
    with pytest.raises(cls) as info:
        command.run(argv, error=cls, what="stopping the app")
    err = info.value
    assert type(err) is cls
    assert str(err) == "stopping the app failed (exit 3): stop failed"
    assert "\n" not in str(err)
    assert err.argv == argv and err.returncode == 3
    assert err.stderr == "first\nstop failed\n"
    assert err.exit_code == EXPECTED_CODES[cls.__name__]


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_timeout_raises_the_given_class(cls: type[errors.DmrecoverError]) -> None:
    with pytest.raises(cls) as info:
        command.run(["sleep", "5"], error=cls, timeout=0.1)
    err = info.value
    assert type(err) is cls
    assert str(err) == "sleep: timed out after 0.1s"
    assert err.argv == ["sleep", "5"] and err.returncode is None and err.stderr == ""


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_missing_program_raises_the_given_class_with_a_hint(
        cls: type[errors.DmrecoverError]) -> None:
    with pytest.raises(cls) as info:
        command.run(["no-such-program-xyz"], error=cls)
    assert info.value.hint and "bootstrap" in info.value.hint
    assert info.value.argv == ["no-such-program-xyz"]


def test_false_raises_with_no_message() -> None:
    with pytest.raises(errors.AppError) as info:
        command.run(["false"], error=errors.AppError)
    assert str(info.value) == "false failed (exit 1): no message"


def test_corrupt_chunk_keeps_its_own_fields_and_the_command_context() -> None:
    err = errors.CorruptChunk("bad", digest="ab", backup="b1", index=7, argv=["x"],
                              returncode=2, stderr="e", hint="restore from another")
    assert (err.digest, err.backup, err.index) == ("ab", "b1", 7)
    assert (err.argv, err.returncode, err.stderr) == (["x"], 2, "e")
    assert str(err) == "bad: restore from another"
