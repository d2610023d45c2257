"""Real databases for the application tests: PostgreSQL 15 and MariaDB from Debian's packages.

Importable helpers, no pytest here. The PostgreSQL cluster itself is
dmrecover.demo.postgres.PostgresCluster (`dmrecover demo --app postgres` runs it too).
Each database keeps its data directory on a given directory (the volume under test) and
everything else (socket, pid file, server log) in a private runtime directory outside it,
listens on a Unix socket only, and is started and stopped by commands given as strings that
dmrecover's --app-start/--app-stop split with shlex (no shell):

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
import re
import shlex
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dmrecover.demo.postgres import (  # the demo runs the same cluster: one harness
    PAYLOAD,
    PG_BIN,
    PG_USER,
    RECORD_TABLE,
    DatabaseError,
    InsertLoop,
    PostgresCluster,
    missing,
    owned_dir,
    read_record,
    run_checked,
    wait_until,
)
from dmrecover.system import command

MY_USER = "mysql"

__all__ = ["PAYLOAD", "PG_BIN", "PG_USER", "RECORD_TABLE", "DatabaseError", "MariaDB",
           "Postgres", "RecordingClient", "available", "make_traversable", "missing",
           "read_record", "scratch_dir", "wait_until"]

_run = run_checked  # kept: the tests and benchmarks call databases._run
_owned_dir = owned_dir


def available() -> dict[str, bool]:
    """Which databases this machine has (scripts/apt-packages.txt installs both)."""
    return {"postgres": os.path.exists(f"{PG_BIN}/pg_ctl"),
            "mariadb": shutil.which("mariadbd-safe") is not None
            and os.path.exists("/usr/sbin/mariadbd")}


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


# ---------------------------------------------------------------- PostgreSQL 15

class Postgres(PostgresCluster):
    """A PostgreSQL 15 cluster (dmrecover.demo.postgres.PostgresCluster, which the demo uses
    too) plus a psycopg2 connection and the threaded recording client."""

    @classmethod
    def create(cls, directory: str, *, rundir: str | None = None) -> Postgres:
        """initdb a new cluster in directory/pgdata as the postgres user (its ancestors made
        traversable; the run directory a new scratch_dir() unless given)."""
        make_traversable(os.path.join(directory, "pgdata"))
        ours = rundir is None
        rundir = rundir or scratch_dir("dmr-pg-")
        try:
            pg = super().create(directory, rundir=rundir)
        except BaseException:
            if ours:  # nobody else will remove it
                shutil.rmtree(rundir, ignore_errors=True)
            raise
        assert isinstance(pg, Postgres)
        return pg

    def connect(self, dbname: str = "postgres") -> Any:
        # deferred: psycopg2 is a test-only dependency (python3-psycopg2)
        import psycopg2
        return psycopg2.connect(host=self.rundir, port=self.port, user=PG_USER, dbname=dbname,
                                connect_timeout=5)

    def recording_client(self, record_file: str, **kw: Any) -> RecordingClient:
        return RecordingClient(self.connect, record_file, dialect="postgres", **kw)


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

class RecordingClient(InsertLoop):
    """Inserts rows in a loop, one transaction each, in a thread; appends each id to
    record_file with fsync only after its COMMIT returned. On any error it reconnects (the
    server may be restarting) and goes on with the next id: an id whose commit failed is not
    recorded, so `recorded ⊆ present` is the durability check."""

    thread_name = "recording-client"
    join_timeout = 30.0
    wait_timeout = 30.0
    poll = 0.02
    record_mode = 0o644

    def __init__(self, connect: Callable[[], Any], record_file: str, *, dialect: str,
                 setup: Callable[[], object] | None = None, interval: float = 0.0) -> None:
        super().__init__(record_file, interval=interval)
        self._connect = connect
        self.dialect = dialect
        self._setup = setup

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
        self._start_thread()
        return self

    def _loop(self) -> None:
        fd = self._open_record()
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
                    self._recorded(fd, i)
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
