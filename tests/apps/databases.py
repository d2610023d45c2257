"""Real databases for the application tests: PostgreSQL 15 and MariaDB from Debian's packages.

Importable helpers, no pytest here. Each database keeps its data directory on a given
directory (the volume under test) and everything else (socket, pid file, server log) in a
private runtime directory outside it, listens on a Unix socket only, and is started and stopped
by commands given as strings that dmrecover's --app-start/--app-stop split with shlex (no
shell):

    Postgres.start_command():  runuser -u postgres -- /usr/lib/postgresql/15/bin/pg_ctl
        -D DATA -l RUN/postgres.log -o "-k RUN -p PORT -c listen_addresses=''" -w -t 60 start
        (pg_ctl daemonizes the postmaster into a session of its own and exits 0)
    Postgres.stop_command():   runuser -u postgres -- .../pg_ctl -D DATA -m fast -w -t 60 stop
    MariaDB.start_command():   mariadbd-safe --no-defaults --user=mysql --datadir=DATA
        --socket=RUN/mysqld.sock --pid-file=RUN/mysqld.pid --log-error=RUN/error.log
        --skip-networking ...   (stays in the foreground, the parent of mariadbd)
    MariaDB.stop_command():    mariadb-admin --no-defaults --socket=RUN/mysqld.sock -u root
        shutdown   (waits until the server has exited)

A RecordingClient inserts rows in a loop and appends each COMMITTED id to a file outside the
volume, with fsync; `missing(record_file)` then names every recorded id the database lost.
The clients reconnect when the server goes away (a cutover restarts it).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import random
import re
import shlex
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dmrecover.system import command

PG_BIN = "/usr/lib/postgresql/15/bin"
PG_USER = "postgres"
MY_USER = "mysql"
RECORD_TABLE = "recorded"
PAYLOAD = 200  # bytes of payload a row: the table and its index grow over pages


class DatabaseError(Exception):
    """A harness step failed (the message says which and shows the tool's output)."""


def available() -> dict[str, bool]:
    """Which databases this machine has (scripts/apt-packages.txt installs both)."""
    return {"postgres": os.path.exists(f"{PG_BIN}/pg_ctl"),
            "mariadb": shutil.which("mariadbd-safe") is not None
            and os.path.exists("/usr/sbin/mariadbd")}


def _run(argv: list[str], *, what: str, timeout: float = 120,
         input: str | None = None) -> str:
    r = command.run(argv, check=False, timeout=timeout, input=input, what=what)
    if r.returncode != 0:
        raise DatabaseError(f"{what} failed (exit {r.returncode}): "
                            f"{(r.stderr.strip() or r.stdout.strip())[-2000:]}")
    return r.stdout


def _owned_dir(path: str, user: str, mode: int = 0o700) -> str:
    os.makedirs(path, exist_ok=True)
    pw = pwd.getpwnam(user)
    os.chown(path, pw.pw_uid, pw.pw_gid)
    os.chmod(path, mode)
    return path


def make_traversable(path: str) -> None:
    """Give 'others' search (x) permission on path's ancestors that lack it, so the server's
    own user (postgres, mysql) reaches its data directory.

    Not under pytest's tmp_path: every pytest run starting on the machine (another engineer's
    too) chmods /tmp/pytest-of-root back to 0700, and the server then loses its files mid-run
    (seen as initdb "Permission denied" and Aria tables turning read only). Use scratch_dir().
    """
    if "/pytest-of-" in os.path.abspath(path):
        raise DatabaseError(f"{path}: a database cannot live under pytest's tmp_path: "
                            "use databases.scratch_dir()")
    p = os.path.dirname(os.path.abspath(path))
    while p != "/":
        st = os.stat(p)
        if not st.st_mode & 0o001:
            os.chmod(p, (st.st_mode & 0o7777) | 0o001)
        p = os.path.dirname(p)


def scratch_dir(prefix: str) -> str:
    """A fresh directory under /tmp that the servers' users can traverse (0711): for data
    directories, volumes' mount points, sockets, pid files and server logs. The caller
    removes it."""
    d = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    os.chmod(d, 0o711)
    return d


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


# ---------------------------------------------------------------- PostgreSQL 15

@dataclass
class Postgres:
    """A PostgreSQL 15 cluster: data in `datadir` (on the volume), socket and log in `rundir`."""

    datadir: str
    rundir: str
    port: int = field(default_factory=lambda: random.randrange(20000, 40000))

    @classmethod
    def create(cls, directory: str, *, rundir: str | None = None) -> Postgres:
        """initdb a new cluster in directory/pgdata as the postgres user."""
        pg = cls(os.path.join(directory, "pgdata"), rundir or scratch_dir("dmr-pg-"))
        try:
            make_traversable(pg.datadir)
            _owned_dir(pg.rundir, PG_USER, 0o700)
            _owned_dir(pg.datadir, PG_USER, 0o700)
            _run(["runuser", "-u", PG_USER, "--", f"{PG_BIN}/initdb", "-D", pg.datadir,
                  "--auth=trust", "-U", PG_USER, "-E", "UTF8", "--locale=C.UTF-8"],
                 what="initdb", timeout=120)
        except BaseException:
            if rundir is None:  # ours: nobody else will remove it
                shutil.rmtree(pg.rundir, ignore_errors=True)
            raise
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
        _run(self.start_argv(), what="pg_ctl start", timeout=90)

    def stop(self) -> None:
        _run(self.stop_argv(), what="pg_ctl stop", timeout=90)

    def postmaster_pid(self) -> int | None:
        """The postmaster's pid from postmaster.pid, or None."""
        try:
            with open(os.path.join(self.datadir, "postmaster.pid")) as f:
                return int(f.readline())
        except (FileNotFoundError, ValueError):
            return None

    def connect(self, dbname: str = "postgres") -> Any:
        # deferred: psycopg2 is a test-only dependency (python3-psycopg2)
        import psycopg2
        return psycopg2.connect(host=self.rundir, port=self.port, user=PG_USER, dbname=dbname,
                                connect_timeout=5)

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        """Run sql with psql; its unaligned, tuples-only output."""
        return _run(["runuser", "-u", PG_USER, "--", f"{PG_BIN}/psql", "-X", "-At",
                     "-v", "ON_ERROR_STOP=1", "-h", self.rundir, "-p", str(self.port),
                     "-d", dbname, "-c", sql], what="psql", timeout=120)

    def ready(self) -> bool:
        r = command.run([f"{PG_BIN}/pg_isready", "-h", self.rundir, "-p", str(self.port)],
                        check=False, timeout=10)
        return r.returncode == 0

    def wait_ready(self, timeout: float = 60) -> None:
        wait_until(self.ready, timeout, "PostgreSQL")

    def pgbench_init(self, scale: int = 1, dbname: str = "postgres") -> None:
        _run(["runuser", "-u", PG_USER, "--", f"{PG_BIN}/pgbench", "-h", self.rundir,
              "-p", str(self.port), "-i", "-q", "-s", str(scale), dbname],
             what="pgbench -i", timeout=300)

    def pgbench(self, seconds: int, *, clients: int = 2, dbname: str = "postgres") -> float:
        """Run pgbench for `seconds`; its TPS."""
        out = _run(["runuser", "-u", PG_USER, "--", f"{PG_BIN}/pgbench", "-h", self.rundir,
                    "-p", str(self.port), "-T", str(seconds), "-c", str(clients), "-j", "1",
                    "-n", dbname], what="pgbench", timeout=seconds + 120)
        m = re.search(r"^tps = ([0-9.]+)", out, re.M)
        if not m:
            raise DatabaseError(f"pgbench printed no tps: {out[-500:]}")
        return float(m.group(1))

    def amcheck(self) -> str:
        """pg_amcheck --heapallindexed over every database (installing amcheck where it is
        missing); DatabaseError with its report when anything is corrupt."""
        return _run(["runuser", "-u", PG_USER, "--", f"{PG_BIN}/pg_amcheck", "-h", self.rundir,
                     "-p", str(self.port), "--all", "--install-missing", "--heapallindexed",
                     "--rootdescend"], what="pg_amcheck", timeout=600)

    def recording_client(self, record_file: str, **kw: Any) -> RecordingClient:
        return RecordingClient(self.connect, record_file, dialect="postgres", **kw)

    def recorded_ids(self) -> set[int]:
        out = self.psql(f"SELECT id FROM {RECORD_TABLE}")
        return {int(x) for x in out.split()}


# ---------------------------------------------------------------- MariaDB

@dataclass
class MariaDB:
    """A MariaDB server: data in `datadir` (on the volume), socket, pid file and log in
    `rundir`; networking off; root without password over the socket."""

    datadir: str
    rundir: str
    options: list[str] = field(default_factory=lambda: ["--innodb-log-file-size=16M"])

    @classmethod
    def create(cls, directory: str, *, rundir: str | None = None) -> MariaDB:
        """mariadb-install-db into directory/mysql, owned by the mysql user."""
        my = cls(os.path.join(directory, "mysql"), rundir or scratch_dir("dmr-my-"))
        try:
            make_traversable(my.datadir)
            _owned_dir(my.rundir, MY_USER, 0o755)
            _owned_dir(my.datadir, MY_USER, 0o750)
            _run(["mariadb-install-db", "--no-defaults", f"--user={MY_USER}",
                  f"--datadir={my.datadir}", "--auth-root-authentication-method=normal",
                  "--skip-test-db", "--skip-name-resolve", *my.options],
                 what="mariadb-install-db", timeout=180)
        except BaseException:
            if rundir is None:
                shutil.rmtree(my.rundir, ignore_errors=True)
            raise
        return my

    @property
    def socket(self) -> str:
        return os.path.join(self.rundir, "mysqld.sock")

    @property
    def pidfile(self) -> str:
        return os.path.join(self.rundir, "mysqld.pid")

    @property
    def logfile(self) -> str:
        return os.path.join(self.rundir, "error.log")

    def start_argv(self) -> list[str]:
        return ["mariadbd-safe", "--no-defaults", f"--user={MY_USER}",
                f"--datadir={self.datadir}", f"--socket={self.socket}",
                f"--pid-file={self.pidfile}", f"--log-error={self.logfile}", "--skip-networking",
                *self.options]

    def stop_argv(self) -> list[str]:
        return ["mariadb-admin", "--no-defaults", f"--socket={self.socket}", "-u", "root",
                "--shutdown-timeout=60", "shutdown"]

    def start_command(self) -> str:
        """--app-start string (a foreground start command)."""
        return shlex.join(self.start_argv())

    def stop_command(self) -> str:
        """--app-stop string."""
        return shlex.join(self.stop_argv())

    def server_pid(self) -> int | None:
        try:
            with open(self.pidfile) as f:
                return int(f.read().strip())
        except (FileNotFoundError, ValueError):
            return None

    def connect(self, dbname: str | None = None) -> Any:
        # deferred: pymysql is a test-only dependency (python3-pymysql)
        import pymysql
        return pymysql.connect(unix_socket=self.socket, user="root", password="",
                               database=dbname, connect_timeout=5, autocommit=False)

    def sql(self, sql: str, dbname: str | None = None) -> str:
        """Run sql with the mariadb client; tab-separated output without headers."""
        argv = ["mariadb", "--no-defaults", f"--socket={self.socket}", "-u", "root", "-N", "-B",
                "-e", sql]
        if dbname:
            argv.append(dbname)
        return _run(argv, what="mariadb", timeout=120)

    def ready(self) -> bool:
        r = command.run(["mariadb-admin", "--no-defaults", f"--socket={self.socket}", "-u",
                         "root", "--connect-timeout=2", "ping"], check=False, timeout=10)
        return r.returncode == 0

    def wait_ready(self, timeout: float = 60) -> None:
        wait_until(self.ready, timeout, "MariaDB")

    def check(self) -> str:
        """mariadb-check --all-databases (extended); DatabaseError listing every table that is
        not OK."""
        out = _run(["mariadb-check", "--no-defaults", f"--socket={self.socket}", "-u", "root",
                    "--all-databases", "--extended"], what="mariadb-check", timeout=600)
        bad = [line for line in out.splitlines()
               if line.strip() and not line.rstrip().endswith("OK")
               and not line.startswith(("note", "Note"))
               and re.search(r"error|corrupt|warning", line, re.I)]
        if bad:
            raise DatabaseError("mariadb-check found problems:\n" + "\n".join(bad) +
                                "\nserver log (tail):\n" + self.log_tail())
        return out

    def log_tail(self, lines: int = 40) -> str:
        """The end of the server's error log (for failure messages)."""
        try:
            with open(self.logfile, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except FileNotFoundError:
            return "(no error log)"

    def recording_client(self, record_file: str, **kw: Any) -> RecordingClient:
        return RecordingClient(lambda: self.connect("recdb"), record_file, dialect="mariadb",
                               setup=lambda: self.sql("CREATE DATABASE IF NOT EXISTS recdb"),
                               **kw)

    def recorded_ids(self) -> set[int]:
        out = self.sql(f"SELECT id FROM {RECORD_TABLE}", "recdb")
        return {int(x) for x in out.split()}


# ---------------------------------------------------------------- the recording client

class RecordingClient:
    """Inserts rows in a loop, one transaction each, in a thread; appends each id to
    record_file with fsync only after its COMMIT returned. On any error it reconnects (the
    server may be restarting) and goes on with the next id: an id whose commit failed is not
    recorded, so `recorded ⊆ present` is the durability check."""

    def __init__(self, connect: Callable[[], Any], record_file: str, *, dialect: str,
                 setup: Callable[[], object] | None = None, interval: float = 0.0) -> None:
        self._connect = connect
        self.record_file = record_file
        self.dialect = dialect
        self._setup = setup
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.committed = 0
        self.errors = 0
        self.last_error: str | None = None
        self.next_id = 1

    def create_table(self) -> None:
        if self._setup:
            self._setup()
        conn = self._connect()
        try:
            with conn.cursor() as cur:
                engine = " ENGINE=InnoDB" if self.dialect == "mariadb" else ""
                cur.execute(f"CREATE TABLE IF NOT EXISTS {RECORD_TABLE} (id BIGINT PRIMARY KEY,"
                            f" payload VARCHAR(255) NOT NULL){engine}")
                cur.execute(f"SELECT COALESCE(MAX(id), 0) FROM {RECORD_TABLE}")
                self.next_id = int(cur.fetchone()[0]) + 1
            conn.commit()
        finally:
            conn.close()

    def start(self) -> RecordingClient:
        self.create_table()
        self._thread = threading.Thread(target=self._loop, name="recording-client", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> int:
        """Stop the loop; the number of committed (recorded) inserts."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        return self.committed

    def wait_committed(self, n: int, timeout: float = 30) -> None:
        """Wait until at least n inserts were committed in total."""
        wait_until(lambda: self.committed >= n, timeout, f"{n} recorded inserts",
                   interval=0.02)

    def _loop(self) -> None:
        fd = os.open(self.record_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        conn = None
        try:
            while not self._stop.is_set():
                try:
                    if conn is None:
                        conn = self._connect()
                    i = self.next_id
                    self.next_id += 1
                    with conn.cursor() as cur:
                        cur.execute(f"INSERT INTO {RECORD_TABLE} (id, payload) VALUES (%s, %s)",
                                    (i, f"{i:012d}" + "x" * (PAYLOAD - 12)))
                    conn.commit()
                    os.write(fd, f"{i}\n".encode())
                    os.fsync(fd)
                    self.committed += 1
                    if self.interval:
                        self._stop.wait(self.interval)
                except Exception as err:  # the server went away: reconnect and go on
                    self.errors += 1
                    self.last_error = f"{type(err).__name__}: {err}"
                    if conn is not None:
                        with contextlib.suppress(Exception):
                            conn.close()
                    conn = None
                    self._stop.wait(0.2)
        finally:
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()
            os.close(fd)


def read_record(record_file: str) -> list[int]:
    """The ids a RecordingClient recorded as committed."""
    with open(record_file) as f:
        return [int(x) for x in f.read().split()]


def missing(record_file: str, present: set[int]) -> list[int]:
    """Recorded (committed) ids that the database does not have: must be empty."""
    return sorted(set(read_record(record_file)) - present)
