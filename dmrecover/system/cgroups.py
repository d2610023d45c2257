"""Track an application by cgroup: everything its start command forks, daemonized or not.

A process group is not enough: `pg_ctl start` daemonizes the postmaster with setsid, and so do
double-forking daemons and `start-stop-daemon --background`. A cgroup keeps every descendant,
whatever it does, and `cgroup.events` says when the last one is gone.

Kinds of AppCgroup, chosen by `AppCgroup.create()` in this order:

- "systemd-scope" (PID 1 is systemd): the start command runs under
  `systemd-run --scope --unit=dmrecover-app-NAME --collect`. A scope, not a service
  (`systemd-run --unit`): systemd-run moves itself into the new scope and then execs the command,
  so the command stays our child (its exit code and output are ours, as without systemd), and a
  scope lives exactly as long as it has processes, so a start command that daemonizes and exits
  (pg_ctl) leaves the daemon tracked. A Type=simple service would stop the daemon when its main
  process exits, unless --remain-after-exit, and would send the output to the journal. We never
  mkdir in systemd's tree ourselves: systemd owns it and would move our processes back.
- "cgroup2" (no systemd, e.g. a container): a directory `<v2 mount>/dmrecover/NAME`, found from
  mountinfo (this host: /sys/fs/cgroup/unified, hybrid; Debian 12: /sys/fs/cgroup).
- "cgroup1": where no v2 hierarchy is mounted, a named v1 hierarchy (`none,name=dmrecover`,
  no controller) mounted at /run/dmrecover/cgroup; it has no cgroup.events, so waiting polls.
- "pgroup": no cgroup can be made: the start command leads a new session and its process group
  and session are the application; `warning` says that a daemon that calls setsid is missed.

`AppCgroup.for_unit(UNIT)` ("systemd-unit", for --app-unit) reads the unit's own cgroup from
`systemctl show -p ControlGroup`.

Starting inside the cgroup without a race: `cgexec` (a tiny program, see cgexec.py) writes its
own pid to cgroup.procs and execs the command, so nothing is forked outside it first.

Reaping: the session is the parent of the start command only (daemons reparent to PID 1). A
stop script that waits for that pid to vanish (`while kill -0 $pid`) would wait for ever on our
zombie, so `reap_children()` reaps our own exited children that belong to the application,
each with waitpid(pid, WNOHANG) on that pid: never waitpid(-1), which would steal the children
of subprocess.run. `reaping()` does it in a thread while a blocking stop command runs.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import select
import signal as signals
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from dmrecover.errors import AppError
from dmrecover.system import cgexec, command, mounts

log = logging.getLogger(__name__)

PARENT = "dmrecover"  # our directory under the v2 root
V1_MOUNT = "/run/dmrecover/cgroup"
V1_NAME = "dmrecover"
SCOPE_PREFIX = "dmrecover-app-"
KINDS = ("systemd-scope", "cgroup2", "cgroup1", "pgroup")
POLL = 0.05  # seconds between looks where the kernel gives no notification
START_TIMEOUT = 60.0  # for the start command to be inside its cgroup (systemd-run waits a job)

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")


# ---------------------------------------------------------------- parsing (pure, unit-tested)

def cgroup2_root(entries: Sequence[mounts.MountEntry] | None = None) -> str | None:
    """Where the cgroup v2 hierarchy is mounted (the first cgroup2 mount), or None."""
    for m in mounts.mounts() if entries is None else entries:
        if m.fstype == "cgroup2":
            return m.target
    return None


def v1_named_root(entries: Sequence[mounts.MountEntry] | None = None,
                  name: str | None = None) -> str | None:
    """Where the named v1 hierarchy `name=<name>` (default V1_NAME) is mounted, or None."""
    name = name or V1_NAME
    for m in mounts.mounts() if entries is None else entries:
        if m.fstype == "cgroup" and f"name={name}" in m.super_options.split(","):
            return m.target
    return None


def parse_events(text: str) -> dict[str, int]:
    """cgroup.events ('populated 1\\nfrozen 0\\n') as a dict."""
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key and value.strip().lstrip("-").isdigit():
            out[key] = int(value)
    return out


def parse_procs(text: str) -> list[int]:
    """cgroup.procs (one pid a line) as a list of pids."""
    return [int(x) for x in text.split() if x.isdigit()]


def parse_proc_cgroup(text: str, *, v1_name: str | None = None) -> str | None:
    """From /proc/PID/cgroup: the v2 path ('0::/a/b'), or with v1_name the path in that named
    v1 hierarchy ('N:name=dmrecover:/x'); None when absent."""
    for line in text.splitlines():
        hid, _, rest = line.partition(":")
        ctrl, _, path = rest.partition(":")
        if v1_name is None and hid == "0" and ctrl == "":
            return path
        if v1_name is not None and f"name={v1_name}" in ctrl.split(","):
            return path
    return None


def parse_stat(text: str) -> tuple[str, int, int, int, int]:
    """From /proc/PID/stat: (state, ppid, pgid, sid, starttime). The command name may hold
    spaces and parentheses, so fields are counted after its last ')'."""
    f = text[text.rindex(")") + 2:].split()
    return f[0], int(f[1]), int(f[2]), int(f[3]), int(f[19])


def check_name(name: str) -> str:
    """name, when it can be a directory and a unit name; AppError otherwise."""
    if not _NAME.match(name) or name in (".", ".."):
        raise AppError(f"invalid application cgroup name {name!r}",
                       hint="use letters, digits, '_', '.', '-'")
    return name


def systemd_running() -> bool:
    """True when PID 1 is systemd (sd_booted(): /run/systemd/system exists)."""
    return os.path.isdir("/run/systemd/system")


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except (FileNotFoundError, ProcessLookupError, NotADirectoryError):
        return None


def _stat(pid: int) -> tuple[str, int, int, int, int] | None:
    text = _read(f"/proc/{pid}/stat")
    try:
        return parse_stat(text) if text else None
    except (ValueError, IndexError):
        return None


def _all_pids() -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


def _children_of_me() -> list[int]:
    """Our own child processes (zombies included), from /proc/self/task/*/children when the
    kernel offers it, else by scanning every process's parent."""
    me = os.getpid()
    try:
        kids: set[int] = set()
        for tid in os.listdir(f"/proc/{me}/task"):
            text = _read(f"/proc/{me}/task/{tid}/children")
            if text is None:
                raise FileNotFoundError
            kids.update(int(x) for x in text.split())
        return sorted(kids)
    except FileNotFoundError:
        out = []
        for pid in _all_pids():
            st = _stat(pid)
            if st and st[1] == me:
                out.append(pid)
        return out


# ---------------------------------------------------------------- the application's cgroup

def _make_dir(path: str, what: str, tried: list[str]) -> bool:
    """mkdir -p a cgroup directory; on failure note why in `tried` and return False."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        tried.append(f"{what}: cannot create {path}: {err.strerror}")
        return False
    return True


@dataclass
class AppCgroup:
    """The processes of one application, by cgroup (or process group where none can be made).

    Persist with to_dict()/from_dict() so a new session process finds the application again.
    """

    kind: str
    name: str
    path: str | None = None      # the cgroup directory (cgroup2, cgroup1)
    unit: str | None = None      # systemd-scope / systemd-unit
    leader: int | None = None    # pid of the start command (pgroup: the group and session id)
    warning: str | None = None   # set when tracking is weaker than a cgroup
    exit_codes: dict[int, int] = field(default_factory=dict)  # our reaped children
    _popens: list[subprocess.Popen] = field(default_factory=list, repr=False, compare=False)
    # reap_children runs in the reaping() thread and in the caller's: one at a time
    _reap_lock: threading.Lock = field(default_factory=threading.Lock, repr=False,
                                       compare=False)

    # ------------------------------------------------------------ construction

    @classmethod
    def create(cls, name: str, *, kinds: Sequence[str] | None = None) -> AppCgroup:
        """A cgroup for application `name` (e.g. the session id), of the first kind in
        `kinds` (default: KINDS) that this host offers. A cgroup2/cgroup1 directory left by a
        crashed session under the same name is reused, so its processes are still found."""
        check_name(name)
        tried = []
        for kind in kinds or KINDS:
            if kind == "systemd-scope":
                if systemd_running() and command.have("systemd-run"):
                    return cls(kind, name, unit=f"{SCOPE_PREFIX}{name}.scope")
                tried.append("systemd: not running")
            elif kind == "cgroup2":
                root = cgroup2_root()
                if root is None:
                    tried.append("cgroup v2: not mounted")
                    continue
                path = os.path.join(root, PARENT, name)
                if _make_dir(path, "cgroup v2", tried):
                    return cls(kind, name, path=path)
            elif kind == "cgroup1":
                root, why = _v1_mount()
                if root is None:
                    tried.append(f"cgroup v1: {why}")
                    continue
                path = os.path.join(root, name)
                if _make_dir(path, "cgroup v1", tried):
                    return cls(kind, name, path=path)
            elif kind == "pgroup":
                msg = ("no cgroup could be made for the application (" + "; ".join(tried) +
                       "): tracking it by process group and session, which misses a daemon "
                       "that calls setsid")
                log.warning(msg)
                return cls(kind, name, warning=msg)
            else:
                raise AppError(f"unknown application cgroup kind {kind!r}")
        raise AppError("no cgroup could be made for the application: " + "; ".join(tried))

    @classmethod
    def for_unit(cls, unit: str) -> AppCgroup:
        """The cgroup of systemd unit `unit` (--app-unit); '.service' is implied."""
        return cls("systemd-unit", unit, unit=unit if "." in unit else f"{unit}.service")

    def to_dict(self) -> dict:
        return {"kind": self.kind, "name": self.name, "path": self.path, "unit": self.unit,
                "leader": self.leader, "warning": self.warning}

    @classmethod
    def from_dict(cls, d: dict) -> AppCgroup:
        if d.get("kind") not in (*KINDS, "systemd-unit"):
            raise AppError(f"unknown application cgroup kind {d.get('kind')!r}")
        return cls(d["kind"], d["name"], path=d.get("path"), unit=d.get("unit"),
                   leader=d.get("leader"), warning=d.get("warning"))

    def describe(self) -> str:
        """'cgroup2 /sys/fs/cgroup/dmrecover/x' for logs and status."""
        where = self.unit or self.path or (f"process group {self.leader}" if self.leader
                                           else "no process yet")
        return f"{self.kind} {where}"

    # ------------------------------------------------------------ where

    def directory(self) -> str | None:
        """The cgroup directory, or None (pgroup; a unit or scope that does not exist now)."""
        if self.kind in ("cgroup2", "cgroup1"):
            return self.path
        if self.kind in ("systemd-scope", "systemd-unit"):
            r = command.run(["systemctl", "show", "-p", "ControlGroup", "--value", self.unit],
                            check=False, timeout=30)
            cg = r.stdout.strip()
            root = cgroup2_root()
            if r.returncode != 0 or not cg or root is None:
                return None
            path = os.path.join(root, cg.lstrip("/"))
            return path if os.path.isdir(path) else None
        return None

    # ------------------------------------------------------------ start

    def command(self, argv: Sequence[str], *, status_fd: int | None = None) -> list[str]:
        """The argv that runs argv inside this cgroup (pgroup: argv itself)."""
        argv = [str(a) for a in argv]
        if not argv:
            raise AppError("empty application command")
        wrap = [sys.executable, "-I", "-S", cgexec.__file__]
        if status_fd is not None:
            wrap += ["--status-fd", str(status_fd)]
        if self.kind in ("cgroup2", "cgroup1"):
            assert self.path
            return [*wrap, os.path.join(self.path, "cgroup.procs"), "--", *argv]
        if self.kind == "systemd-scope":
            # cgexec "-" joins nothing: it only reports when the command is exec'd, which
            # systemd-run does once the scope exists and holds it
            return ["systemd-run", "--scope", "--quiet", "--collect", f"--unit={self.unit}",
                    "--", *wrap, "-", "--", *argv]
        if self.kind == "pgroup":
            return argv
        raise AppError(f"a {self.kind} application is started by systemd, not by a command")

    def start(self, argv: Sequence[str], *, cwd: str = "/", env: dict[str, str] | None = None,
              stdout: int | None = None, stderr: int | None = None,
              new_session: bool = True) -> subprocess.Popen:
        """Start argv inside the cgroup; return once it runs there (its Popen: the caller may
        poll it; reap_children() does too). AppError when it cannot be started.

        stdout/stderr: file descriptors or subprocess constants (default: /dev/null).
        new_session: the command leads a new session (terminal signals do not reach it).
        """
        if self.kind == "pgroup":
            new_session = True  # the session and process group are all we track
        rfd = wfd = None
        if self.kind != "pgroup":
            rfd, wfd = os.pipe()
        try:
            full = self.command(argv, status_fd=wfd)
            log.info("starting in %s: %s", self.describe(), " ".join(map(str, argv)))
            try:
                proc = subprocess.Popen(
                    full, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL if stdout is None else stdout,
                    stderr=subprocess.DEVNULL if stderr is None else stderr,
                    start_new_session=new_session, close_fds=True,
                    pass_fds=() if wfd is None else (wfd,))
            except OSError as err:
                raise AppError(f"cannot start {argv[0]}: {err.strerror}",
                               hint="check the start command") from err
            if wfd is not None:
                os.close(wfd)
                wfd = None
            self._popens.append(proc)
            self.leader = proc.pid
            if rfd is not None:
                error = _read_status(rfd, START_TIMEOUT)
                if error is None:
                    self.kill(timeout=5)
                    raise AppError(f"starting {argv[0]} in {self.describe()} timed out after "
                                   f"{START_TIMEOUT:g}s")
                if error:
                    _wait_quietly(proc)
                    self.reap_children()
                    raise AppError(f"cannot start the application: {error}",
                                   hint="check the start command")
            return proc
        finally:
            for fd in (rfd, wfd):
                if fd is not None:
                    os.close(fd)

    def track(self, proc: subprocess.Popen) -> None:
        """Also reap proc (a child started by other means) in reap_children()."""
        self._popens.append(proc)

    # ------------------------------------------------------------ state

    def pids(self) -> list[int]:
        """Live processes of the application (zombies are not listed by the kernel)."""
        d = self.directory()
        if d is not None:
            found: list[int] = []
            for dirpath, _dirs, _files in os.walk(d):
                text = _read(os.path.join(dirpath, "cgroup.procs"))
                if text:
                    found.extend(parse_procs(text))
            return sorted(set(found))
        if self.kind == "pgroup" and self.leader:
            out = []
            for pid in _all_pids():
                st = _stat(pid)
                if st and st[0] != "Z" and self.leader in (st[2], st[3]):
                    out.append(pid)
            return out
        return []

    def populated(self) -> bool:
        """True while any process of the application is alive."""
        d = self.directory()
        if d is not None and self.kind != "cgroup1":
            text = _read(os.path.join(d, "cgroup.events"))
            if text is not None:
                return parse_events(text).get("populated", 0) == 1
        return bool(self.pids())

    def owns(self, pid: int) -> bool:
        """True when pid is a process of the application."""
        return pid in self.pids()

    def wait_empty(self, timeout: float) -> bool:
        """Wait until no process of the application is alive; False on timeout. Reaps our own
        children meanwhile. cgroup v2 wakes up on cgroup.events (poll, POLLPRI); the other
        kinds look every POLL seconds."""
        deadline = time.monotonic() + timeout
        d = self.directory() if self.kind != "cgroup1" else None
        fd = None
        if d is not None:
            try:
                fd = os.open(os.path.join(d, "cgroup.events"), os.O_RDONLY)
            except FileNotFoundError:
                fd = None
        try:
            poller = None
            if fd is not None:
                poller = select.poll()
                poller.register(fd, select.POLLPRI | select.POLLERR)
            while True:
                self.reap_children()
                if fd is not None:
                    # read first: poll reports changes since the last read
                    try:
                        empty = parse_events(os.pread(fd, 4096, 0).decode()).get(
                            "populated", 0) == 0
                    except OSError:  # removed (a scope is collected once empty)
                        empty = True
                else:
                    empty = not self.pids()
                if empty:
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                if poller is not None:
                    # capped: a missed event then costs at most a second
                    poller.poll(min(left, 1.0) * 1000)
                else:
                    time.sleep(min(left, POLL))
        finally:
            if fd is not None:
                os.close(fd)

    # ------------------------------------------------------------ stop

    def signal(self, sig: int) -> list[int]:
        """Send sig to every process of the application; the pids it was sent to."""
        sent = []
        if self.kind == "pgroup" and self.leader:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.leader, sig)
        for pid in self.pids():
            try:
                os.kill(pid, sig)
                sent.append(pid)
            except ProcessLookupError:
                continue
        if sent:
            log.info("sent %s to %s: %s", signals.Signals(sig).name, self.describe(), sent)
        return sent

    def kill(self, timeout: float = 10.0) -> list[int]:
        """SIGKILL every process of the application and wait for them to go; the pids still
        alive after timeout (empty when all are gone). cgroup.kill where the kernel has it
        (5.14+): atomic, so a process forking meanwhile cannot escape; else SIGKILL each
        process again until none is left."""
        d = self.directory() if self.kind != "cgroup1" else None
        if d is not None and os.path.exists(os.path.join(d, "cgroup.kill")):
            log.info("killing %s (cgroup.kill)", self.describe())
            try:
                with open(os.path.join(d, "cgroup.kill"), "w") as f:
                    f.write("1")
            except FileNotFoundError:
                pass  # gone meanwhile
            except OSError as err:
                log.warning("cgroup.kill in %s failed: %s; killing each process", d,
                            err.strerror)
            if self.wait_empty(timeout):
                return []
        deadline = time.monotonic() + timeout
        while True:
            if not self.signal(signals.SIGKILL) and not self.pids():
                self.reap_children()
                return []
            if self.wait_empty(min(POLL * 4, max(0.0, deadline - time.monotonic()))):
                return []
            if time.monotonic() >= deadline:
                left = self.pids()
                if left:
                    log.warning("%s: processes %s survived SIGKILL for %gs", self.describe(),
                                left, timeout)
                return left

    def reap_children(self) -> dict[int, int]:
        """Reap our own exited children that belong to the application; {pid: exit code}
        (negative: killed by that signal), also kept in exit_codes. waitpid on each such pid
        only, never -1."""
        with self._reap_lock:
            return self._reap_children()

    def _reap_children(self) -> dict[int, int]:
        reaped: dict[int, int] = {}
        for proc in list(self._popens):
            rc = proc.poll()  # Popen's own waitpid(pid, WNOHANG), so Popen stays consistent
            if rc is not None:
                reaped[proc.pid] = rc
                self._popens.remove(proc)
        known = {p.pid for p in self._popens}
        for pid in _children_of_me():
            if pid in known or pid in reaped:
                continue
            st = _stat(pid)
            if st is None or st[0] != "Z" or not self._was_member(pid, st):
                continue
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                continue
            if done == pid:
                reaped[pid] = os.waitstatus_to_exitcode(status)
        if reaped:
            log.debug("%s: reaped %s", self.describe(), reaped)
            self.exit_codes.update(reaped)
        return reaped

    def _was_member(self, pid: int, st: tuple[str, int, int, int, int]) -> bool:
        # A zombie keeps its cgroup and its process group: only the application's are reaped,
        # so the children of subprocess.run (in the session's cgroup) are never touched.
        if self.kind == "pgroup":
            return bool(self.leader) and self.leader in (st[2], st[3])
        text = _read(f"/proc/{pid}/cgroup") or ""
        if self.kind == "cgroup1":
            rel = parse_proc_cgroup(text, v1_name=V1_NAME)
            mine = "/" + os.path.basename(self.path or "")
            return rel is not None and (rel == mine or rel.startswith(mine + "/"))
        rel = parse_proc_cgroup(text)
        d = self.directory()
        root = cgroup2_root()
        if rel is None or d is None or root is None:
            return False
        mine = "/" + os.path.relpath(d, root)
        return rel == mine or rel.startswith(mine + "/")

    @contextlib.contextmanager
    def reaping(self, interval: float = 0.1) -> Iterator[None]:
        """Reap our exited application children in a thread while the body runs (e.g. a
        blocking stop command that waits for the start command's pid to vanish)."""
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(interval):
                try:
                    self.reap_children()
                except Exception:  # a reaper that dies would hang the stop script
                    log.exception("reaping %s", self.describe())

        t = threading.Thread(target=loop, name=f"reap-{self.name}", daemon=True)
        t.start()
        try:
            yield
        finally:
            stop.set()
            t.join()
            self.reap_children()

    def remove(self) -> None:
        """Remove the cgroup (AppError while processes are alive in it). A systemd scope is
        stopped if it still exists; a unit of the user's is left alone."""
        if self.kind in ("cgroup2", "cgroup1"):
            assert self.path
            if not os.path.isdir(self.path):
                return
            if self.pids():
                raise AppError(f"cannot remove {self.path}: processes {self.pids()} still in it",
                               hint="stop the application first")
            for dirpath, _dirs, _files in sorted(os.walk(self.path), key=lambda w: -len(w[0])):
                try:
                    os.rmdir(dirpath)
                except FileNotFoundError:
                    pass
                except OSError as err:
                    raise AppError(f"cannot remove cgroup {dirpath}: {err.strerror}") from err
            self.reap_children()
        elif self.kind == "systemd-scope":
            command.run(["systemctl", "stop", self.unit], check=False, timeout=60)
            command.run(["systemctl", "reset-failed", self.unit], check=False, timeout=30)


# ---------------------------------------------------------------- leftovers (dmrecover cleanup)

def app_cgroup_dirs(entries: Sequence[mounts.MountEntry] | None = None) -> list[str]:
    """The application cgroup directories dmrecover made and that exist now:
    `<v2 root>/dmrecover/NAME` and, where the named v1 hierarchy is mounted, its `NAME`s."""
    entries = mounts.mounts() if entries is None else entries
    parents = []
    root = cgroup2_root(entries)
    if root is not None:
        parents.append(os.path.join(root, PARENT))
    v1 = v1_named_root(entries)
    if v1 is not None:
        parents.append(v1)
    out = []
    for parent in parents:
        try:
            names = sorted(os.listdir(parent))
        except (FileNotFoundError, NotADirectoryError):
            continue
        out += [os.path.join(parent, n) for n in names
                if _NAME.match(n) and os.path.isdir(os.path.join(parent, n))]
    return out


def cgroup_populated(path: str) -> bool:
    """True when a process is in the cgroup at path or below (cgroup.events where there is
    one, else every cgroup.procs of the subtree)."""
    events = _read(os.path.join(path, "cgroup.events"))
    if events is not None and "populated" in parse_events(events):
        return parse_events(events)["populated"] == 1
    for dirpath, _dirs, _files in os.walk(path):
        if parse_procs(_read(os.path.join(dirpath, "cgroup.procs")) or ""):
            return True
    return False


def remove_empty_cgroup(path: str) -> bool:
    """Remove the cgroup at path and its child cgroups, only when no process is in any of
    them; False (nothing removed) when populated. The kernel refuses to remove a populated
    cgroup (EBUSY) even if a process joins after the check: that is False too. AppError when
    it cannot be removed for another reason."""
    if not os.path.isdir(path):
        return True
    if cgroup_populated(path):
        return False
    for dirpath, _dirs, _files in sorted(os.walk(path), key=lambda w: -len(w[0])):
        try:
            os.rmdir(dirpath)
        except FileNotFoundError:
            continue
        except OSError as err:
            if err.errno == errno.EBUSY:
                return False
            raise AppError(f"cannot remove cgroup {dirpath}: {err.strerror}") from err
    return True


def _read_status(fd: int, timeout: float) -> str | None:
    """What cgexec wrote to its status pipe until end of file ('' = the command was exec'd
    inside the cgroup), or None on timeout."""
    chunks = []
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            return None
        data = os.read(fd, 4096)
        if not data:
            return b"".join(chunks).decode(errors="replace").strip()
        chunks.append(data)


def _wait_quietly(proc: subprocess.Popen) -> None:
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def _v1_mount() -> tuple[str | None, str]:
    """The named v1 hierarchy's mount point, mounting it at V1_MOUNT when needed;
    (None, why) when that cannot be done."""
    root = v1_named_root()
    if root is not None:
        return root, ""
    try:
        os.makedirs(V1_MOUNT, exist_ok=True)
    except OSError as err:
        return None, f"cannot create {V1_MOUNT}: {err.strerror}"
    r = command.run(["mount", "-t", "cgroup", "-o", f"none,name={V1_NAME}", V1_NAME, V1_MOUNT],
                    check=False, timeout=30)
    if r.returncode != 0:
        return None, f"cannot mount a named hierarchy: {r.stderr.strip() or r.returncode}"
    return V1_MOUNT, ""
