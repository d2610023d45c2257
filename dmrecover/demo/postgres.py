"""A PostgreSQL 15 cluster from Debian's packages, for the demo (and the tests' harness).

The cluster keeps its data directory on a given directory (the volume under live restore) and
everything else (socket, server log) in a private run directory outside it, listens on a Unix
socket only, and is started and stopped the way its package does it, by commands given as
strings that --app-start/--app-stop split with shlex (no shell):

    start_command():  runuser -u postgres -- /usr/lib/postgresql/15/bin/pg_ctl -D DATA
        -l RUN/postgres.log -o "-k RUN -p PORT -c listen_addresses=''" -w -t 60 start
        (pg_ctl daemonizes the postmaster into a session of its own and exits 0)
    stop_command():   runuser -u postgres -- .../pg_ctl -D DATA -m fast -w -t 60 stop

`PsqlRecorder` is the demo's client: it inserts rows one transaction at a time with psql (no
Python driver needed) and appends each id whose COMMIT returned to a file outside the volume,
with fsync; `missing()` then names every recorded id the database lost.
"""

from __future__ import annotations

import os
import pwd
import random
import re
import shlex
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from dmrecover.system import command

PG_BIN = "/usr/lib/postgresql/15/bin"
PG_USER = "postgres"
RECORD_TABLE = "recorded"
PAYLOAD = 200  # bytes of payload a row: the table and its index grow over pages


class DatabaseError(Exception):
    """A database step failed (the message says which and shows the tool's output)."""


def postgres_available() -> bool:
    """True when PostgreSQL 15 from Debian's packages is installed (and its user exists)."""
    try:
        pwd.getpwnam(PG_USER)
    except KeyError:
        return False
    return all(os.access(f"{PG_BIN}/{tool}", os.X_OK)
               for tool in ("pg_ctl", "initdb", "psql", "pg_amcheck", "pgbench"))


def run_checked(argv: list[str], *, what: str, timeout: float = 120,
                input: str | None = None) -> str:
    """Run argv; its stdout, or DatabaseError with the end of its output."""
    r = command.run(argv, check=False, timeout=timeout, input=input, what=what)
    if r.returncode != 0:
        raise DatabaseError(f"{what} failed (exit {r.returncode}): "
                            f"{(r.stderr.strip() or r.stdout.strip())[-2000:]}")
    return r.stdout


def owned_dir(path: str, user: str, mode: int = 0o700) -> str:
    """Make path (if needed), owned by user, with mode."""
    os.makedirs(path, exist_ok=True)
    pw = pwd.getpwnam(user)
    os.chown(path, pw.pw_uid, pw.pw_gid)
    os.chmod(path, mode)
    return path


def unreachable_ancestor(path: str) -> str | None:
    """The first ancestor of path that other users cannot search (no 'x' for others), so a
    server running as its own user cannot reach path; None when every one can."""
    p = os.path.dirname(os.path.abspath(path))
    while p != "/":
        if not os.stat(p).st_mode & 0o001:
            return p
        p = os.path.dirname(p)
    return None


def wait_until(check: Callable[[], bool], timeout: float, what: str,
               interval: float = 0.1) -> None:
    """Poll check() until true; DatabaseError naming `what` after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except Exception:  # noqa: S110 - not ready yet looks like any error
            pass
        if time.monotonic() >= deadline:
            raise DatabaseError(f"{what}: not ready after {timeout:g}s")
        time.sleep(interval)


@dataclass
class PostgresCluster:
    """A PostgreSQL 15 cluster: data in `datadir` (on the volume), socket and log in `rundir`
    (which the caller makes, owned by the postgres user: `create` does)."""

    datadir: str
    rundir: str
    port: int = field(default_factory=lambda: random.randrange(20000, 40000))

    @classmethod
    def create(cls, directory: str, *, rundir: str) -> PostgresCluster:
        """initdb a new cluster in directory/pgdata as the postgres user; rundir is made
        (owned by postgres, 0700). Every ancestor of directory must be searchable by others."""
        pg = cls(os.path.join(directory, "pgdata"), rundir)
        blocked = unreachable_ancestor(pg.datadir)
        if blocked:
            raise DatabaseError(f"the {PG_USER} user cannot reach {pg.datadir}: {blocked} is "
                                "not searchable by other users")
        owned_dir(pg.rundir, PG_USER, 0o700)
        owned_dir(pg.datadir, PG_USER, 0o700)
        run_checked(["runuser", "-u", PG_USER, "--", f"{PG_BIN}/initdb", "-D", pg.datadir,
                     "--auth=trust", "-U", PG_USER, "-E", "UTF8", "--locale=C.UTF-8"],
                    what="initdb", timeout=120)
        return pg

    @property
    def logfile(self) -> str:
        return os.path.join(self.rundir, "postgres.log")

    def start_argv(self) -> list[str]:
        opts = f"-k {self.rundir} -p {self.port} -c listen_addresses=''"
        return ["runuser", "-u", PG_USER, "--", f"{PG_BIN}/pg_ctl", "-D", self.datadir,
                "-l", self.logfile, "-o", opts, "-w", "-t", "60", "start"]

    def stop_argv(self) -> list[str]:
        return ["runuser", "-u", PG_USER, "--", f"{PG_BIN}/pg_ctl", "-D", self.datadir,
                "-m", "fast", "-w", "-t", "60", "stop"]

    def start_command(self) -> str:
        """--app-start string."""
        return shlex.join(self.start_argv())

    def stop_command(self) -> str:
        """--app-stop string."""
        return shlex.join(self.stop_argv())

    def start(self) -> None:
        """Start directly (no cgroup, no dmrecover)."""
        run_checked(self.start_argv(), what="pg_ctl start", timeout=90)

    def stop(self) -> None:
        run_checked(self.stop_argv(), what="pg_ctl stop", timeout=90)

    def postmaster_pid(self) -> int | None:
        """The postmaster's pid from postmaster.pid, or None."""
        try:
            with open(os.path.join(self.datadir, "postmaster.pid")) as f:
                return int(f.readline())
        except (FileNotFoundError, ValueError):
            return None

    def psql(self, sql: str, dbname: str = "postgres", timeout: float = 120) -> str:
        """Run sql with psql; its unaligned, tuples-only output."""
        return run_checked(["runuser", "-u", PG_USER, "--", f"{PG_BIN}/psql", "-X", "-At",
                            "-v", "ON_ERROR_STOP=1", "-h", self.rundir, "-p", str(self.port),
                            "-d", dbname, "-c", sql], what="psql", timeout=timeout)

    def ready(self) -> bool:
        r = command.run([f"{PG_BIN}/pg_isready", "-h", self.rundir, "-p", str(self.port)],
                        check=False, timeout=10)
        return r.returncode == 0

    def wait_ready(self, timeout: float = 60) -> None:
        wait_until(self.ready, timeout, "PostgreSQL")

    def pgbench_init(self, scale: int = 1, dbname: str = "postgres") -> None:
        run_checked(["runuser", "-u", PG_USER, "--", f"{PG_BIN}/pgbench", "-h", self.rundir,
                     "-p", str(self.port), "-i", "-q", "-s", str(scale), dbname],
                    what="pgbench -i", timeout=300)

    def pgbench(self, seconds: int, *, clients: int = 2, dbname: str = "postgres") -> float:
        """Run pgbench for `seconds`; its TPS."""
        out = run_checked(["runuser", "-u", PG_USER, "--", f"{PG_BIN}/pgbench", "-h",
                           self.rundir, "-p", str(self.port), "-T", str(seconds), "-c",
                           str(clients), "-j", "1", "-n", dbname], what="pgbench",
                          timeout=seconds + 120)
        m = re.search(r"^tps = ([0-9.]+)", out, re.M)
        if not m:
            raise DatabaseError(f"pgbench printed no tps: {out[-500:]}")
        return float(m.group(1))

    def amcheck(self) -> str:
        """pg_amcheck --heapallindexed over every database (installing amcheck where it is
        missing); DatabaseError with its report when anything is corrupt."""
        return run_checked(["runuser", "-u", PG_USER, "--", f"{PG_BIN}/pg_amcheck", "-h",
                            self.rundir, "-p", str(self.port), "--all", "--install-missing",
                            "--heapallindexed", "--rootdescend"], what="pg_amcheck",
                           timeout=600)

    def create_record_table(self) -> int:
        """The table the recording clients insert into; the next free id."""
        self.psql(f"CREATE TABLE IF NOT EXISTS {RECORD_TABLE} (id BIGINT PRIMARY KEY, "
                  "payload VARCHAR(255) NOT NULL)")
        return int(self.psql(f"SELECT COALESCE(MAX(id), 0) FROM {RECORD_TABLE}").strip()) + 1

    def recorded_ids(self) -> set[int]:
        out = self.psql(f"SELECT id FROM {RECORD_TABLE}")
        return {int(x) for x in out.split()}


class InsertLoop:
    """The thread of a recording client: `_loop` inserts numbered rows until `stop`, and
    `_recorded` appends each committed id to record_file with fsync, so `recorded ⊆ present`
    is the durability check. Subclasses say how a row is inserted."""

    thread_name = "insert-loop"
    join_timeout = 60.0  # seconds stop() waits for the thread
    wait_timeout = 60.0  # wait_committed's default
    poll = 0.05
    record_mode = 0o600

    def __init__(self, record_file: str, *, interval: float = 0.0) -> None:
        self.record_file = record_file
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.committed = 0
        self.errors = 0
        self.last_error: str | None = None
        self.next_id = 1

    def _start_thread(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=self.thread_name, daemon=True)
        self._thread.start()

    def stop(self) -> int:
        """Stop the loop; the number of committed (recorded) inserts."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.join_timeout)
        return self.committed

    def wait_committed(self, n: int, timeout: float | None = None) -> None:
        """Wait until at least n inserts were committed in total."""
        wait_until(lambda: self.committed >= n,
                   self.wait_timeout if timeout is None else timeout,
                   f"{n} recorded inserts", interval=self.poll)

    def _open_record(self) -> int:
        return os.open(self.record_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                       self.record_mode)

    def _recorded(self, fd: int, i: int) -> None:
        """Id i was committed: record it durably, then pause for the interval."""
        os.write(fd, f"{i}\n".encode())
        os.fsync(fd)
        self.committed += 1
        if self.interval:
            self._stop.wait(self.interval)

    def _loop(self) -> None:
        raise NotImplementedError


class PsqlRecorder(InsertLoop):
    """Inserts rows into RECORD_TABLE, one psql call (one transaction) each, in a thread;
    appends each id to record_file with fsync only after psql reported its COMMIT. A failed
    insert (the server restarting for the cutover) is not recorded, and the next one goes on,
    so `recorded ⊆ present` is the durability check."""

    thread_name = "psql-recorder"

    def __init__(self, pg: PostgresCluster, record_file: str, *, interval: float = 0.0) -> None:
        super().__init__(record_file, interval=interval)
        self.pg = pg

    def start(self, next_id: int = 1) -> PsqlRecorder:
        """Insert from next_id on, in a thread (the table exists: `create_record_table`)."""
        self.next_id = next_id
        self._start_thread()
        return self

    def _loop(self) -> None:
        fd = self._open_record()
        try:
            while not self._stop.is_set():
                i = self.next_id
                self.next_id += 1
                try:
                    self.pg.psql(f"INSERT INTO {RECORD_TABLE} (id, payload) VALUES "
                                 f"({i}, '{i:012d}{'x' * (PAYLOAD - 12)}')", timeout=60)
                except Exception as err:  # down for the cutover: go on with the next id
                    self.errors += 1
                    self.last_error = str(err)
                    self._stop.wait(0.2)
                    continue
                self._recorded(fd, i)
        finally:
            os.close(fd)


def read_record(record_file: str) -> list[int]:
    """The ids a recording client recorded as committed."""
    with open(record_file) as f:
        return [int(x) for x in f.read().split()]


def missing(record_file: str, present: set[int]) -> list[int]:
    """Recorded (committed) ids that the database does not have: must be empty."""
    return sorted(set(read_record(record_file)) - present)
