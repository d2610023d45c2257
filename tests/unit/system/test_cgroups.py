"""Application cgroups without root: parsing the kernel's files, choosing a kind, building the
start argv. The real cgroup is exercised in tests/integration/system/test_cgroups.py."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dmrecover.errors import AppError
from dmrecover.system import cgexec, cgroups
from dmrecover.system.cgroups import AppCgroup
from dmrecover.system.mounts import parse_mountinfo

HYBRID = parse_mountinfo("""\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
""")  # this host: v1 controllers plus v2 at /sys/fs/cgroup/unified
UNIFIED = parse_mountinfo(
    "30 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 "
    "rw,nsdelegate,memory_recursiveprot\n")  # Debian 12 with systemd
V1_ONLY = HYBRID[:3] + parse_mountinfo(
    "50 23 0:40 / /run/dmrecover/cgroup rw,relatime - cgroup dmrecover rw,name=dmrecover\n")


def _cgroup2_at(path: str) -> list:
    return parse_mountinfo(f"1 0 0:1 / {path} rw - cgroup2 cgroup2 rw\n")


def test_cgroup2_root_from_mountinfo() -> None:
    assert cgroups.cgroup2_root(HYBRID) == "/sys/fs/cgroup/unified"
    assert cgroups.cgroup2_root(UNIFIED) == "/sys/fs/cgroup"
    assert cgroups.cgroup2_root(V1_ONLY) is None


def test_v1_named_root() -> None:
    assert cgroups.v1_named_root(V1_ONLY) == "/run/dmrecover/cgroup"
    assert cgroups.v1_named_root(HYBRID) is None  # name=systemd is not ours


def test_parse_events_and_procs() -> None:
    assert cgroups.parse_events("populated 1\nfrozen 0\n") == {"populated": 1, "frozen": 0}
    assert cgroups.parse_events("") == {}
    assert cgroups.parse_procs("12\n345\n\n") == [12, 345]
    assert cgroups.parse_procs("") == []


def test_parse_proc_cgroup() -> None:
    hybrid = ("9:name=systemd:/\n8:pids:/\n4:memory:/process_api/b456\n"
              "3:name=dmrecover:/sess1\n0::/dmrecover/sess1\n")
    assert cgroups.parse_proc_cgroup(hybrid) == "/dmrecover/sess1"
    assert cgroups.parse_proc_cgroup(hybrid, v1_name="dmrecover") == "/sess1"
    assert cgroups.parse_proc_cgroup("0::/system.slice/postgresql@15-main.service\n") == \
        "/system.slice/postgresql@15-main.service"
    assert cgroups.parse_proc_cgroup("4:memory:/x\n") is None


def test_parse_stat_with_awkward_command_name() -> None:
    # comm may hold spaces and ')': fields are counted after the last ')'
    fields = ["Z", "1", "77", "77"] + ["0"] * 15 + ["123456"] + ["0"] * 30
    text = "4242 (a) b (c)) " + " ".join(fields)
    assert cgroups.parse_stat(text) == ("Z", 1, 77, 77, 123456)
    with open("/proc/self/stat") as f:
        state, ppid, _pgid, _sid, _start = cgroups.parse_stat(f.read())
    assert state == "R" and ppid == os.getppid()


@pytest.mark.parametrize("name", ["", "a/b", "..", "x y", "a" * 101, "é"])
def test_bad_names_refused(name: str) -> None:
    with pytest.raises(AppError):
        cgroups.check_name(name)


def test_create_prefers_systemd_scope(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cgroups, "systemd_running", lambda: True)
    monkeypatch.setattr(cgroups.command, "have", lambda prog: True)
    cg = AppCgroup.create("s1")
    assert (cg.kind, cg.unit) == ("systemd-scope", "dmrecover-app-s1.scope")
    argv = cg.command(["pg_ctl", "start"], status_fd=7)
    assert argv[:5] == ["systemd-run", "--scope", "--quiet", "--collect",
                        "--unit=dmrecover-app-s1.scope"]
    assert argv[5:] == ["--", sys.executable, "-I", "-S", cgexec.__file__, "--status-fd", "7",
                        "-", "--", "pg_ctl", "start"]


def test_create_cgroup2_directory(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setattr(cgroups, "systemd_running", lambda: False)
    fake = _cgroup2_at(str(tmp_path))
    monkeypatch.setattr(cgroups.mounts, "mounts", lambda: fake)
    cg = AppCgroup.create("s2")
    assert cg.kind == "cgroup2" and cg.path == str(tmp_path / "dmrecover" / "s2")
    assert os.path.isdir(cg.path)
    argv = cg.command(["postgres", "-D", "/data"])
    assert argv == [sys.executable, "-I", "-S", cgexec.__file__,
                    os.path.join(cg.path, "cgroup.procs"), "--", "postgres", "-D", "/data"]
    # a plain directory stands in for the cgroup: its files are read as the kernel's
    (tmp_path / "dmrecover" / "s2" / "cgroup.procs").write_text("")
    (tmp_path / "dmrecover" / "s2" / "cgroup.events").write_text("populated 0\nfrozen 0\n")
    assert cg.pids() == [] and not cg.populated()
    assert cg.wait_empty(0.1)


def test_create_falls_back_to_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cgroups, "systemd_running", lambda: False)
    monkeypatch.setattr(cgroups.mounts, "mounts", lambda: HYBRID[:3])
    monkeypatch.setattr(cgroups, "_v1_mount", lambda: (None, "cannot mount"))
    cg = AppCgroup.create("s3")
    assert cg.kind == "pgroup"
    assert "process group" in (cg.warning or "") and "cannot mount" in (cg.warning or "")
    assert cg.command(["x", "y"]) == ["x", "y"]


def test_create_notes_a_directory_it_cannot_make(monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path) -> None:
    """A cgroup v2 or v1 directory that cannot be made is named, and the next kind tried."""
    monkeypatch.setattr(cgroups, "systemd_running", lambda: False)
    (tmp_path / "dmrecover").write_text("")  # a file where the parent directory would go
    monkeypatch.setattr(cgroups.mounts, "mounts", lambda: _cgroup2_at(str(tmp_path)))
    monkeypatch.setattr(cgroups, "_v1_mount", lambda: (str(tmp_path / "dmrecover"), ""))
    cg = AppCgroup.create("s5", kinds=("cgroup2", "cgroup1", "pgroup"))
    assert cg.kind == "pgroup"
    assert f"cgroup v2: cannot create {tmp_path}/dmrecover/s5" in (cg.warning or "")
    assert f"cgroup v1: cannot create {tmp_path}/dmrecover/s5" in (cg.warning or "")


def test_create_refuses_when_no_kind_fits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cgroups, "systemd_running", lambda: False)
    with pytest.raises(AppError, match="systemd: not running"):
        AppCgroup.create("s4", kinds=("systemd-scope",))
    with pytest.raises(AppError, match="unknown"):
        AppCgroup.create("s4", kinds=("cgroup3",))


def test_round_trip_through_dict() -> None:
    cg = AppCgroup("cgroup2", "s5", path="/sys/fs/cgroup/dmrecover/s5", leader=42)
    back = AppCgroup.from_dict(cg.to_dict())
    assert back.to_dict() == cg.to_dict()
    with pytest.raises(AppError):
        AppCgroup.from_dict({"kind": "nope", "name": "x"})


def test_unit_cgroup_from_systemctl(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    cg = AppCgroup.for_unit("postgresql@15-main")
    assert cg.unit == "postgresql@15-main.service"
    (tmp_path / "system.slice" / "postgresql@15-main.service").mkdir(parents=True)
    seen = []

    def fake_run(argv, **_kw):
        seen.append(argv)
        return subprocess.CompletedProcess(argv, 0, "/system.slice/postgresql@15-main.service\n",
                                           "")

    monkeypatch.setattr(cgroups.command, "run", fake_run)
    monkeypatch.setattr(cgroups, "cgroup2_root", lambda entries=None: str(tmp_path))
    assert cg.directory() == str(tmp_path / "system.slice" / "postgresql@15-main.service")
    assert seen[0] == ["systemctl", "show", "-p", "ControlGroup", "--value",
                       "postgresql@15-main.service"]
    with pytest.raises(AppError, match="started by systemd"):
        cg.command(["x"])


def test_cgexec_reports_a_missing_program(tmp_path) -> None:
    # no cgroup ("-"): only the exec and its error reporting are exercised
    r = subprocess.run([sys.executable, cgexec.__file__, "-", "--", "/nonexistent/prog"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 127 and "not found" in r.stderr
    r = subprocess.run([sys.executable, cgexec.__file__, str(tmp_path / "no" / "procs"), "--",
                        "true"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 126 and "cannot join" in r.stderr
    r = subprocess.run([sys.executable, cgexec.__file__, "-", "--", "sh", "-c", "exit 5"],
                       timeout=30)
    assert r.returncode == 5
