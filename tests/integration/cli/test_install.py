"""scripts/install.sh and scripts/uninstall.sh, run for real into a DESTDIR: every file lands
where a Debian system looks for it, a second run changes nothing, the unit is the one
`live-restore` would write, the man page renders, the completion is valid bash, and uninstall
removes exactly what install put there."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from dmrecover.session.boot import unit_text
from dmrecover.session.record import state_root

ROOT = Path(__file__).resolve().parents[3]
VENV_DMRECOVER = ROOT / ".venv" / "bin" / "dmrecover"
FILES = {
    "etc/udev/rules.d/56-dmrecover.rules",
    "etc/systemd/system/dmrecover-session@.service",
    "usr/local/share/man/man8/dmrecover.8",
    "usr/share/bash-completion/completions/dmrecover",
}
LINK = "usr/local/sbin/dmrecover"


def _run(script: str, dest: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DESTDIR": str(dest)}
    return subprocess.run([str(ROOT / "scripts" / script), *args], env=env, text=True,
                          capture_output=True, timeout=300)


def _tree(dest: Path) -> dict[str, int]:
    return {str(p.relative_to(dest)): p.lstat().st_mtime_ns
            for p in dest.rglob("*") if not p.is_dir()}


def test_install_twice_then_uninstall(tmp_path: Path) -> None:
    dest = tmp_path / "root"
    r = _run("install.sh", dest)
    assert r.returncode == 0, r.stderr
    tree = _tree(dest)
    assert set(tree) == FILES | {LINK}
    assert os.readlink(dest / LINK) == str(VENV_DMRECOVER)
    for f in FILES:
        assert (dest / f).stat().st_mode & 0o777 == 0o644, f
    # the unit is byte for byte what `live-restore` writes with this interpreter (no churn)
    assert (dest / "etc/systemd/system/dmrecover-session@.service").read_text() == \
        unit_text(sys.executable, state_root())
    assert (dest / "etc/udev/rules.d/56-dmrecover.rules").read_bytes() == \
        (ROOT / "udev" / "56-dmrecover.rules").read_bytes()

    again = _run("install.sh", dest)
    assert again.returncode == 0 and again.stdout == "", again.stdout + again.stderr
    assert _tree(dest) == tree

    # man -l renders it: NAME, every listed verb, no roff warnings
    man = subprocess.run(["man", "--warnings", "-l", str(dest / "usr/local/share/man/man8/"
                                                              "dmrecover.8")],
                         env={**os.environ, "MANWIDTH": "100", "MAN_KEEP_FORMATTING": ""},
                         capture_output=True, text=True, timeout=60)
    assert man.returncode == 0 and "warning" not in man.stderr, man.stderr
    assert "dmrecover - " in man.stdout and "live-restore" in man.stdout
    assert "session-run" not in man.stdout  # internal
    bash = subprocess.run(["bash", "-n", str(dest / "usr/share/bash-completion/completions/"
                                                     "dmrecover")], capture_output=True,
                          text=True)
    assert bash.returncode == 0, bash.stderr

    keep = dest / "usr/local/sbin/other-tool"
    keep.write_text("#!/bin/sh\n")
    r = _run("uninstall.sh", dest)
    assert r.returncode == 0, r.stderr
    assert _tree(dest) == {"usr/local/sbin/other-tool": keep.lstat().st_mtime_ns}


def test_uninstall_refuses_while_a_session_resumes_at_boot(tmp_path: Path) -> None:
    dest = tmp_path / "root"
    assert _run("install.sh", dest).returncode == 0
    wants = dest / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True)
    (wants / "dmrecover-session@db.service").symlink_to(
        "/etc/systemd/system/dmrecover-session@.service")
    before = _tree(dest)
    r = _run("uninstall.sh", dest)
    assert r.returncode == 1 and "dmrecover-session@db.service" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert _tree(dest) == before
    r = _run("uninstall.sh", dest, "--force")
    assert r.returncode == 0
    assert not (dest / LINK).is_symlink()
    assert not any((dest / f).exists() for f in FILES)
    assert (wants / "dmrecover-session@db.service").is_symlink()  # the session's own: kept


def test_install_keeps_a_foreign_file_at_the_link(tmp_path: Path) -> None:
    dest = tmp_path / "root"
    (dest / "usr/local/sbin").mkdir(parents=True)
    (dest / LINK).write_text("someone else's\n")
    r = _run("install.sh", dest)
    assert r.returncode == 1 and "not a link" in r.stderr
    assert (dest / LINK).read_text() == "someone else's\n"
