"""The boot unit is a shipped file (systemd/), filled in with the interpreter and state root."""

from __future__ import annotations

from pathlib import Path

import pytest

from dmrecover.session import boot
from dmrecover.session.record import State
from tests.unit.session.fakes import make_record

REPO = Path(__file__).resolve().parents[3]


def test_the_packaged_unit_is_the_shipped_file() -> None:
    assert boot.packaged_unit().read_text() == (REPO / "systemd" / boot.TEMPLATE).read_text()


def test_unit_text_fills_the_placeholders() -> None:
    text = boot.unit_text("/opt/venv/bin/python3", "/srv/state")
    assert "@" + "PYTHON@" not in text and "@STATE_ROOT@" not in text
    assert "ExecStart=/opt/venv/bin/python3 -m dmrecover.session.boot %I" in text
    assert "Environment=DMRECOVER_STATE_ROOT=/srv/state" in text
    assert "KillMode=process" in text and "[Install]" in text
    assert "DMRECOVER_TEST_HOOKS" not in text  # test hooks never reach a real unit


def test_main_disables_a_finished_session(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:

    monkeypatch.setenv("DMRECOVER_STATE_ROOT", str(tmp_path))
    rec = make_record(tmp_path / "s")
    rec.set_state(State.DONE)
    monkeypatch.setattr(boot, "systemd_running", lambda: False)  # never touch the host's
    assert boot.main(["s"]) == 0
    assert boot.main([]) == 2
    assert boot.main(["nope"]) != 0
