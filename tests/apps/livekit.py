"""Helpers for the live-restore tests: a sandbox (state root, mount point, app state) that is
always torn down, the CLI as a subprocess, the sample application, and the checks.

Everything lives under the test's tmp_path, so the teardown can find (and remove) exactly
what the test made: processes whose command line names the sandbox, mounts under it, loops
backed by files under it, FUSE mounts under it.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil

from dmrecover import testhooks
from dmrecover.demo.sampleapp import acknowledged, check_database, query
from dmrecover.session.record import STATE_ROOT_ENV
from dmrecover.system import command
from dmrecover.system.mounts import mounts

MiB = 1 << 20
# What the sandbox decides for the processes it starts: the state root and every test hook
# (switched on here: a test's DMRECOVER_FAIL_AT / DMRECOVER_TEST_RESTORE_DELAY must act).
ENV_KEYS = (STATE_ROOT_ENV, *testhooks.HOOK_ENVS)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def tree_checksums(root: Path, skip: tuple[str, ...] = ("app.db", "app.db-journal",
                                                          "lost+found")) -> dict[str, str]:
    """relative path -> sha256 of every regular file (the app's database excluded)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if rel.split("/")[0] in skip or not p.is_file() or p.is_symlink():
            continue
        out[rel] = sha256_file(p)
    return out


def table_digest(db_path: Path) -> str:
    """Digest of the seed table `t` that fill_with_data made (the app must not lose it)."""
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        h = hashlib.sha256()
        for row in db.execute("SELECT id, name, payload FROM t ORDER BY id"):
            h.update(repr(row).encode())
        return h.hexdigest()
    finally:
        db.close()


class Sandbox:
    """One test's live-restore world under tmp."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.state_root = tmp / "state"
        self.mnt = tmp / "mnt"
        self.appstate = tmp / "appstate"
        self.dest = tmp / "dest.img"
        self.repo = tmp / "repo"
        for d in (self.state_root, self.mnt, self.appstate):
            d.mkdir(parents=True, exist_ok=True)
        self.env = {STATE_ROOT_ENV: str(self.state_root), testhooks.ENABLE_ENV: "1"}
        self.checksums: dict[str, str] = {}
        self.seed_digest = ""
        self.backup_id = ""
        self.fstype = ""

    # ------------------------------------------------------------ set-up

    def prepare(self, fs_tools, image: Path, chunk_size: int = 256 << 10) -> None:
        """Copy the shared image, record its content, back it up into a new repository."""
        from dmrecover.repository.backup import backup
        from dmrecover.repository.repo import Repository

        src = fs_tools.copy_sparse(image, self.tmp / "src.img")
        opts = "ro,nouuid" if _fstype(src) == "xfs" else "ro"
        with fs_tools.mounted(src, options=opts) as m:
            self.checksums = tree_checksums(m)
            self.seed_digest = table_digest(m / "app.db")
        assert len(self.checksums) >= 4
        repo = Repository.init(self.repo)
        manifest = backup(src, repo, name="vol", chunk_size=chunk_size)
        self.backup_id = manifest.id
        self.fstype = manifest.fstype
        self.size = manifest.size
        src.unlink()
        # The wiped destination: zeros, the backup's size.
        with open(self.dest, "wb") as f:
            f.truncate(manifest.size)

    def app_args(self, interval: float = 0.01) -> list[str]:
        py = sys.executable
        return ["--app-start",
                f"{py} -m dmrecover.demo.sampleapp serve --data {self.mnt} --state {self.appstate} "
                f"--interval {interval}",
                "--app-stop", f"{py} -m dmrecover.demo.sampleapp stop --state {self.appstate}"]

    # ------------------------------------------------------------ driving

    def cli(self, *args: str, env: dict[str, str] | None = None, timeout: float = 300
            ) -> subprocess.CompletedProcess[str]:
        full_env = {k: v for k, v in os.environ.items() if k not in ENV_KEYS}
        full_env.update(self.env)
        full_env.update(env or {})
        return subprocess.run([sys.executable, "-m", "dmrecover", *args], env=full_env,
                              capture_output=True, text=True, timeout=timeout, cwd="/")

    def live_restore(self, session: str, *extra: str, env: dict[str, str] | None = None
                     ) -> subprocess.CompletedProcess[str]:
        return self.cli("live-restore", "--repo", str(self.repo), self.backup_id,
                        str(self.dest), "--mount", str(self.mnt), "--session", session,
                        *self.app_args(), *extra, env=env)

    def session(self, name: str) -> dict:
        return json.loads((self.state_root / name / "session.json").read_text())

    def status(self, name: str) -> dict:
        r = self.cli("status", name, "--json")
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def wait_state(self, name: str, states: tuple[str, ...], timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = self.session(name)
            if s["state"] in states:
                return s
            time.sleep(0.1)
        log = (self.state_root / name / "session.log").read_text()[-3000:]
        raise AssertionError(f"session {name} stuck in {self.session(name)['state']}:\n{log}")

    def wait_synced_chunks(self, name: str, timeout: float = 60) -> int:
        """The chunks the session's persisted restored map names (what a crash keeps), once
        there are some."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                st = json.loads((self.state_root / name / "status.json").read_text())
            except (OSError, ValueError):
                st = {}
            n = (st.get("stats") or {}).get("synced_chunks") or 0
            if n:
                return n
            time.sleep(0.1)
        raise AssertionError(f"session {name} never persisted its restored map")

    def query(self, req: dict, timeout: float = 30) -> dict:
        return query(str(self.appstate), req, timeout=timeout)

    def wait_app(self, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.query({"op": "ping"}, timeout=5)
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def app_procs(self, key: str | None = None) -> list[psutil.Process]:
        """Processes whose command line names this sandbox (the app, its stop command), or
        `key`, a narrower part of it (one session's app state). The command line is read once,
        as the process list is walked: one read later may find a zombie, which has none."""
        key = str(self.appstate) if key is None else key
        out = []
        for p in psutil.process_iter(["cmdline"]):
            try:
                if any(key in a for a in (p.info["cmdline"] or [])):
                    out.append(p)
            except psutil.Error:
                continue
        return out

    def assert_app_gone(self, timeout: float = 10.0) -> None:
        """No process of the application is left: one still exiting (a loaded host) gets
        `timeout` seconds; one that stays fails, named with its state and command line."""
        _, alive = psutil.wait_procs(self.app_procs(), timeout=timeout)
        seen = []
        for p in alive:
            try:
                seen.append(f"{p.pid} [{p.status()}] {' '.join(p.cmdline())}")
            except psutil.Error:
                continue
        assert not seen, f"application processes left: {seen}"

    def stop_app(self) -> None:
        subprocess.run([sys.executable, "-m", "dmrecover.demo.sampleapp", "stop", "--state",
                        str(self.appstate)], capture_output=True, timeout=30)
        _, alive = psutil.wait_procs(self.app_procs(), timeout=30)
        assert not alive, f"application still running: {alive}"

    # ------------------------------------------------------------ checks

    def mounts_under(self) -> list[str]:
        root = str(self.tmp)
        return [m.target for m in mounts() if m.target.startswith(root + "/")]

    def loops_under(self) -> list[str]:
        root = str(self.tmp)
        out = []
        for dev in Path("/sys/block").glob("loop*"):
            try:
                b = (dev / "loop" / "backing_file").read_text().strip()
            except OSError:
                continue
            if b.startswith(root + "/"):
                out.append(f"/dev/{dev.name}")
        return out

    def verify_dest(self, fs_tools) -> tuple[int, int]:
        """DEST alone (nothing mounted): every backed-up file, the seed table, every
        acknowledged application write. Returns (rows, acknowledged writes)."""
        assert str(self.mnt) not in self.mounts_under()
        acks = acknowledged(str(self.appstate))
        opts = "ro,nouuid" if self.fstype == "xfs" else "ro"
        with fs_tools.mounted(self.dest, options=opts) as m:
            got = tree_checksums(m)
            missing = {k for k in self.checksums if got.get(k) != self.checksums[k]}
            assert not missing, f"files differ or missing on DEST: {sorted(missing)[:10]}"
            assert table_digest(m / "app.db") == self.seed_digest
            rows, problems = check_database(str(m / "app.db"), acks)
        assert not problems, problems[:10]
        return rows, len(acks)

    # ------------------------------------------------------------ teardown

    def _release_waiting_sources(self) -> None:
        """The dm backends' source of a killed session queues the kernel's reads until a
        `resume` (backends/dm/waitpath.py): nobody resumes here, so it is told to fail them,
        or the application would wait in D state and the unmounts below for ever."""
        if not os.path.exists("/dev/mapper/control"):
            return
        from dmrecover.backends.dm import dmsetup as dm
        from dmrecover.backends.dm import waitpath

        for sdir in self.state_root.glob("*"):
            try:
                waitpath.release(dm.dm_name(sdir.name, waitpath.LAYER))
            except Exception:  # noqa: BLE001 - a teardown goes on; what is left is reported
                pass

    def teardown(self) -> None:
        """Remove everything the test made, whatever state it is in."""
        for sdir in self.state_root.glob("*"):
            try:
                rec = json.loads((sdir / "session.json").read_text())
            except (OSError, ValueError):
                continue
            pid, created = rec.get("pid"), rec.get("pid_create_time")
            if pid and created:
                # The session process is forked from live-restore/resume (its command line
                # is theirs): known by the pid and start time its record names. Killed
                # first, or it would start the application again under the teardown.
                try:
                    p = psutil.Process(pid)
                    if abs(p.create_time() - created) < 0.01:
                        p.send_signal(signal.SIGKILL)
                        p.wait(10)
                except psutil.Error:
                    pass
        self._release_waiting_sources()
        for p in self.app_procs():
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.Error:
                pass
        psutil.wait_procs(self.app_procs(), timeout=10)
        self._remove_app_cgroups()
        # Autoclear loops (DEST's, after its unmount) are released asynchronously: poll.
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            for target in reversed(self.mounts_under()):
                command.run(["umount", "-l", target], check=False)
            for dev in self.loops_under():
                command.run(["losetup", "-d", dev], check=False)
            if not self.mounts_under() and not self.loops_under():
                break
            self._unmount_in_other_namespaces()
            time.sleep(0.2)

    def _remove_app_cgroups(self) -> None:
        """The application's cgroup (session.json's app handle) outlives a session that is
        done, with the application in it: empty it and remove it."""
        from dmrecover.errors import AppError
        from dmrecover.system.cgroups import AppCgroup

        for sdir in self.state_root.glob("*"):
            try:
                handle = json.loads((sdir / "session.json").read_text()).get("app_handle")
                cg = (handle or {}).get("cgroup")
                if cg and cg.get("kind") != "systemd-unit":
                    group = AppCgroup.from_dict(cg)
                    group.kill(timeout=15)
                    group.remove()
            except (OSError, ValueError, AppError) as err:
                print(f"cleanup of the application's cgroup in {sdir}: {err}")

    def _unmount_in_other_namespaces(self) -> None:
        """A process that made a private mount namespace while our mount existed (libvirt
        starts every QEMU so, and the VM suite runs on this machine) keeps a copy of it,
        which pins our loop device. Unmount our (dead) copies there too."""
        root = str(self.tmp) + "/"
        mine = os.readlink("/proc/self/ns/mnt")
        seen = set()
        for p in psutil.process_iter():
            try:
                ns = os.readlink(f"/proc/{p.pid}/ns/mnt")
                if ns == mine or ns in seen:
                    continue
                seen.add(ns)
                with open(f"/proc/{p.pid}/mountinfo") as f:
                    targets = [line.split()[4] for line in f if line.split()[4].startswith(root)]
            except (OSError, psutil.Error, IndexError):
                continue
            for t in reversed(targets):
                command.run(["nsenter", "-t", str(p.pid), "-m", "umount", "-l", t], check=False)


def _fstype(path: Path) -> str:
    r = command.run(["blkid", "-p", "-o", "value", "-s", "TYPE", str(path)], check=False)
    return r.stdout.strip()
