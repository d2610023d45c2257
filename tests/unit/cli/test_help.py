"""The help an operator reads: every option and argument of every verb says what it is, with
its default; the internal verb is not listed; global options work after the verb; the man page
and the bash completion generated from the parser render and complete."""

from __future__ import annotations

import argparse
import os
import subprocess
from pathlib import Path

import pytest

from dmrecover.cli import main, manpage, parser, session_cmds
from dmrecover.session.record import state_root


def every_parser(p: argparse.ArgumentParser, path: str = "dmrecover"
                 ) -> list[tuple[str, argparse.ArgumentParser]]:
    """Every parser, the hidden verb's too."""
    out = [(path, p)]
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, child in a.choices.items():
                out += every_parser(child, f"{path} {name}")
    return out


def test_every_option_and_argument_has_help() -> None:
    missing = [f"{path}: {a.option_strings or a.dest}"
               for path, p in every_parser(parser.build_parser())
               for a in p._actions
               if not isinstance(a, argparse._SubParsersAction)
               and (not a.help or a.help is argparse.SUPPRESS)]
    assert missing == []


def test_every_verb_has_a_description() -> None:
    assert [path for path, p in every_parser(parser.build_parser())
            if not p.description] == []


def _help(*argv: str, capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        parser.build_parser().parse_args([*argv, "--help"])
    assert exc.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # unwrapped


def test_defaults_are_shown(capsys: pytest.CaptureFixture[str]) -> None:
    text = _help("live-restore", capsys=capsys)
    assert "(default: 600.0)" in text  # --fetch-deadline: added by the formatter
    assert "(default: auto)" in text  # --cutover
    assert f"(default: {state_root()}/SESSION" in text
    assert "(default: None)" not in text and "(default: False)" not in text
    assert f"Sessions live in {state_root()}/SESSION" in _help(capsys=capsys)


def test_app_start_is_required_unless_app_unit(capsys: pytest.CaptureFixture[str]) -> None:
    text = _help("live-restore", capsys=capsys)
    assert "(--app-start CMD | --app-unit UNIT)" in text
    base = ["live-restore", "--repo", "/r", "b", "/d", "--mount", "/m"]
    for argv, word in ((base, "one of the arguments --app-start --app-unit is required"),
                       ([*base, "--app-start", "x", "--app-unit", "u"], "not allowed with")):
        with pytest.raises(SystemExit) as exc:
            main.main(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and word in err, err
    assert parser.build_parser().parse_args([*base, "--app-unit", "u"]).app_unit == "u"


def test_session_run_is_hidden_but_works(capsys: pytest.CaptureFixture[str]) -> None:
    text = _help(capsys=capsys)
    assert "session-run" not in text and "live-restore" in text and "status" in text
    assert "session-run" not in manpage.listed_verbs(parser.build_parser())
    assert parser.build_parser().parse_args(["session-run", "s", "--resume"]).resume


@pytest.mark.parametrize("argv", [
    ("-v", "status"), ("status", "-v"),
    ("live-restore", "--repo", "/r", "b", "/d", "--mount", "/m", "--app-start", "x", "-v"),
    ("repo", "key", "list", "--repo", "/r", "--verbose"),
])
def test_verbose_before_or_after_the_verb(argv: tuple[str, ...]) -> None:
    a = parser.build_parser().parse_args(list(argv))
    assert a.verbose + a.verbose_after == 1


def test_verbose_before_and_after_add_up(monkeypatch: pytest.MonkeyPatch) -> None:
    levels = []
    monkeypatch.setattr(main.logging, "basicConfig", lambda **kw: levels.append(kw["level"]))
    monkeypatch.setattr(session_cmds, "do_cleanup", lambda args: 0)
    assert main.main(["-v", "cleanup", "-v"]) == 0
    assert levels == [main.logging.DEBUG]


def test_man_page_renders_every_verb_and_option(tmp_path: Path) -> None:
    p = parser.build_parser()
    page = tmp_path / "dmrecover.8"
    page.write_text(manpage.manpage(p))
    r = subprocess.run(["man", "--warnings", "-l", str(page)], capture_output=True, text=True,
                       env={**os.environ, "MANWIDTH": "120", "MAN_KEEP_FORMATTING": ""},
                       timeout=60)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    text = r.stdout
    assert text.startswith("DMRECOVER(8)")
    for name, verb in manpage.walk(p):
        assert f"   {name}\n" in text, name
        for a in manpage.options(verb):
            for opt in a.option_strings:
                assert opt in text, (name, opt)
    assert "session-run" not in text
    assert "DMRECOVER_STATE_ROOT" in text


COMPLETE = """source {script}
c() {{ COMP_WORDS=("$@"); COMP_CWORD=$(( ${{#COMP_WORDS[@]}} - 1 )); COMPREPLY=(); _dmrecover
      echo "${{COMPREPLY[*]}}"; }}
c dmrecover li
c dmrecover repo k
c dmrecover live-restore --repo /r b /d --cut
c dmrecover live-restore --repo /r b /d --cutover ''
c dmrecover repo key add --n
c dmrecover session
"""


def test_bash_completion_completes_verbs_options_and_choices(tmp_path: Path) -> None:
    script = tmp_path / "dmrecover"
    script.write_text(manpage.bash_completion(parser.build_parser()))
    r = subprocess.run(["bash", "-c", COMPLETE.format(script=script)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["list live-restore", "key", "--cutover",
                                     "auto manual online", "--new-password-file", ""]
