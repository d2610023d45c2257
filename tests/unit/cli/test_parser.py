"""The command line without running anything: every verb parses to its handler, the choices
come from where they are defined, usage errors are one line with exit code 2, and a closed
stdout ends the program quietly (no root needed)."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from dmrecover.backends import registry
from dmrecover.cli import demo_cmd, main, parser, repository_cmds, session_cmds
from dmrecover.errors import UsageError

VERBS = {
    ("repo", "init", "/r"): repository_cmds.do_repo_init,
    ("backup", "/dev/x", "--repo", "/r"): repository_cmds.do_backup,
    ("list", "--repo", "/r"): repository_cmds.do_list,
    ("verify", "--repo", "/r"): repository_cmds.do_verify,
    ("restore", "--repo", "/r", "b", "/d"): repository_cmds.do_restore,
    ("live-restore", "--repo", "/r", "b", "/d", "--mount", "/m", "--app-unit", "u"):
        session_cmds.do_live_restore,
    ("session-run", "s"): session_cmds.do_session_run,
    ("resume", "s"): session_cmds.do_resume,
    ("status",): session_cmds.do_status,
    ("cutover", "s"): session_cmds.do_cutover,
    ("abort", "s"): session_cmds.do_abort,
    ("forget", "s", "--discard-overlay"): session_cmds.do_forget,
    ("resume", "s", "--app-start", "x", "--app-stop", "y"): session_cmds.do_resume,
    ("cleanup",): session_cmds.do_cleanup,
    ("demo",): demo_cmd.do_demo,
}


def parse(*argv: str) -> argparse.Namespace:
    return parser.build_parser().parse_args(list(argv))


@pytest.mark.parametrize("argv", list(VERBS), ids=lambda a: a[0])
def test_every_verb_parses_to_its_handler(argv: tuple[str, ...]) -> None:
    assert parse(*argv).handler is VERBS[argv]


def test_every_verb_is_tested() -> None:
    sub = next(a for a in parser.build_parser()._actions
               if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == {argv[0] for argv in VERBS}


def test_defaults_and_sizes() -> None:
    a = parse("backup", "/dev/x", "--repo", "/r", "--chunk-size", "1M")
    assert a.chunk_size == 1 << 20 and a.progress == "auto" and a.name is None
    a = parse("live-restore", "--repo", "/r", "b", "/d", "--mount", "/m", "--app-start", "x")
    assert (a.backend, a.cutover, a.fetch_deadline, a.overlay, a.force, a.foreground) == \
        ("auto", "auto", 600.0, None, False, False)
    a = parse("demo", "--size", "64M", "--fstype", "xfs")
    assert a.size == 64 << 20 and a.fstype == "xfs" and not a.keep
    assert parse("cutover", "s", "--no-wait", "--online").no_wait


def test_backend_choices_are_the_registry_names(monkeypatch: pytest.MonkeyPatch) -> None:
    lr = ("live-restore", "--repo", "/r", "b", "/d", "--mount", "/m", "--app-start", "x")
    for verb in (lr, ("demo",)):
        for name in (registry.AUTO, *registry.names()):
            assert parse(*verb, "--backend", name).backend == name
    # a backend added to the registry is a choice without touching the CLI
    monkeypatch.setattr(registry, "names", lambda: ["dm", "fuse", "clone"])
    assert parse(*lr, "--backend", "clone").backend == "clone"


def test_overlay_help_names_the_volume_group_form(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse("live-restore", "--help")
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--overlay DIR|VG" in out and "--dest-vg VG" in out
    assert "stays after the cutover" in out and "removed after the cutover" in out


def test_live_restore_takes_dest_vg_instead_of_dest() -> None:
    args = parse("live-restore", "--repo", "/r", "b", "--dest-vg", "vg0", "--mount", "/m",
                 "--app-start", "x", "--overlay", "vg0")
    assert args.dest is None and args.dest_vg == "vg0" and args.overlay == "vg0"


@pytest.mark.parametrize("argv", [
    ("backup", "x.img", "--repo", "r", "--chunk-size", "4X"),
    ("demo", "--size", "lots"),
    ("live-restore", "--repo", "/r", "b", "/d", "--mount", "/m", "--app-start", "x",
     "--backend", "nope"),
    ("status", "--bogus"),
    ("frobnicate",),
    (),
])
def test_usage_errors_are_one_line_and_exit_2(argv: tuple[str, ...],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main.main(list(argv))
    assert exc.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dmrecover: error: "), captured.err
    assert captured.out == ""


def test_bad_size_names_the_value(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main.main(["backup", "x.img", "--repo", "r", "--chunk-size", "4X"])
    assert "--chunk-size" in capsys.readouterr().err


def test_a_library_error_is_one_line_with_its_exit_code(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def fail(args: argparse.Namespace) -> int:
        raise UsageError("bad thing", hint="do the other thing")

    monkeypatch.setattr(repository_cmds, "do_list", fail)
    assert main.main(["list", "--repo", "/r"]) == 2
    err = capsys.readouterr().err
    assert err == "dmrecover: error: bad thing: do the other thing\n"


def test_a_bug_is_not_swallowed(monkeypatch: pytest.MonkeyPatch) -> None:
    def bug(args: argparse.Namespace) -> int:
        raise BrokenPipeError("a pipe of our own")

    monkeypatch.setattr(repository_cmds, "do_list", bug)
    with pytest.raises(BrokenPipeError):
        main.main(["list", "--repo", "/r"])


def test_closed_stdout_exits_quietly(tmp_path) -> None:
    """`dmrecover --help | head -1`, and a verb printing into a closed pipe."""
    for argv in (["list", "--repo", str(tmp_path / "r")], ["--help"]):
        if argv[0] == "list":
            subprocess.run([sys.executable, "-m", "dmrecover", "repo", "init",
                            "--encryption", "none", str(tmp_path / "r")], check=True,
                           capture_output=True)
        code = ("import os, sys; from dmrecover.cli import main; r, w = os.pipe(); "
                f"os.close(r); os.dup2(w, 1); sys.exit(main.main({argv!r}))")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert r.stderr == "", r.stderr
        assert r.returncode == main.EXIT_PIPE
