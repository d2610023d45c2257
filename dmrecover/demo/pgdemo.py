"""`dmrecover demo --app postgres`: the demo with a PostgreSQL 15 cluster as the application.

The volume holds a cluster made with initdb and filled by `pgbench -i` (plus a few documents
checked byte for byte). The session starts and stops it the way its package does (`pg_ctl
start -w`, which daemonizes the postmaster: the session tracks it by cgroup; `pg_ctl stop -m
fast -w`). While the restore runs, a count over the whole accounts table reads data not
restored yet (fetched on demand), a client inserts rows one transaction at a time and records
each committed id outside the volume, and queries check that every recorded row is visible.
After the automatic cutover, on the destination: the server answers and takes inserts,
`pg_amcheck --heapallindexed --rootdescend` over every database is clean, and every recorded
insert is present.

`--app auto` picks this demo where PostgreSQL 15 is installed, the sample application otherwise;
the default is the sample application (quick, and needs nothing beyond dmrecover).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from dmrecover.demo.demo import Demo, DemoFailed, DemoOptions, StatusView, _say
from dmrecover.demo.postgres import (
    PG_BIN,
    DatabaseError,
    PostgresCluster,
    PsqlRecorder,
    missing,
    postgres_available,
    read_record,
    unreachable_ancestor,
)
from dmrecover.demo.volume import file_digest
from dmrecover.errors import UsageError
from dmrecover.session.app import AppSpec
from dmrecover.units import MiB

APPS = ("sample", "postgres", "auto")


def demo_class(app: str) -> type[Demo]:
    """The demo for --app: 'sample', 'postgres' (UsageError when PostgreSQL 15 is not
    installed), or 'auto' (postgres where installed, else sample)."""
    if app == "sample":
        return Demo
    if app == "postgres":
        if not postgres_available():
            raise UsageError(f"--app postgres: PostgreSQL 15 is not installed ({PG_BIN})",
                             hint="apt-get install postgresql-15, or run the demo with "
                                  "--app sample")
        return PostgresDemo
    if app == "auto":
        return PostgresDemo if postgres_available() else Demo
    raise UsageError(f"unknown demo application {app!r}", hint=f"one of {', '.join(APPS)}")


class PostgresDemo(Demo):
    """The demo's steps with PostgreSQL 15 (see the module doc)."""

    app_title = "a PostgreSQL 15 cluster"
    min_size = 128 * MiB  # initdb's files and 16 MiB WAL segments, then the pgbench tables
    first_answer_timeout = 180.0  # pg_ctl start -w reads its files through on-demand fetches

    def __init__(self, options: DemoOptions, view: StatusView | None = None) -> None:
        if options.workdir:
            # The server runs as postgres: it must reach its data directory and socket.
            p = os.path.abspath(options.workdir)
            while not os.path.exists(p):
                p = os.path.dirname(p)
            blocked = unreachable_ancestor(os.path.join(p, "x"))
            if blocked and blocked != os.path.abspath(options.workdir):
                raise UsageError(f"--workdir {options.workdir}: the postgres user cannot reach "
                                 f"it ({blocked} is not searchable by other users)",
                                 hint="pick a directory under /var/tmp")
        super().__init__(options, view)
        os.chmod(self.work, 0o711)  # postgres passes through, sees nothing
        self.rundir = self.work / "pgrun"  # socket and server log, outside the volume
        self.record_file = self.work / "committed.txt"
        self.pg: PostgresCluster | None = None
        self.recorder: PsqlRecorder | None = None
        self.scale = max(1, min(20, self.size // (64 * MiB)))

    # ------------------------------------------------------------ the volume

    def _fill(self, mnt: Path) -> None:
        os.chmod(mnt, 0o755)
        try:
            pg = PostgresCluster.create(str(mnt), rundir=str(self.rundir))
            pg.start()
            try:
                pg.pgbench_init(scale=self.scale)
                pg.create_record_table()
            finally:
                pg.stop()
        except DatabaseError as err:
            raise DemoFailed(f"building the cluster: {err}") from None
        self.pg = PostgresCluster(str(self.mnt / "pgdata"), pg.rundir, port=pg.port)
        self.seed_rows = self.scale * 100_000
        (mnt / "docs").mkdir()
        rng = random.Random(1)
        words = ["restore", "backup", "volume", "overlay", "chunk", "query", "commit"]
        for i in range(10):
            text = "\n".join(" ".join(rng.choices(words, k=10)) for _ in range(2000))
            (mnt / "docs" / f"doc{i:02d}.txt").write_text(text)
            self.checksums[f"docs/doc{i:02d}.txt"] = file_digest(mnt / "docs" / f"doc{i:02d}.txt")

    def build_volume(self) -> None:
        super().build_volume()
        _say(f"      (pgbench scale {self.scale}: pgbench_accounts has {self.seed_rows} rows)")

    # ------------------------------------------------------------ the application's hooks

    def _cluster(self) -> PostgresCluster:
        assert self.pg is not None
        return self.pg

    def app_spec(self) -> AppSpec:
        pg = self._cluster()
        return AppSpec(start=pg.start_command(), stop=pg.stop_command())

    def first_answer(self) -> str:
        pg = self._cluster()
        if not pg.ready():
            raise OSError("PostgreSQL is not accepting connections yet")
        if self.recorder is None:
            self.recorder = PsqlRecorder(pg, str(self.record_file)).start()
            _say("      a client inserts rows, one transaction each, recording every commit "
                 f"outside the volume ({self.record_file.name})")
        try:
            # the whole accounts table: most of it not restored yet, fetched on demand
            count = int(pg.psql("SELECT count(*) FROM pgbench_accounts").strip())
        except DatabaseError as err:
            raise OSError(str(err)) from None
        if count != self.seed_rows:
            raise DemoFailed(f"pgbench_accounts has {count} rows, not {self.seed_rows}")
        return f"count(*) over pgbench_accounts: {count} rows"

    def probe(self, rng: random.Random) -> None:
        """Every insert the client saw committed is visible (and an account row reads)."""
        pg = self._cluster()
        assert self.recorder is not None
        committed = self.recorder.committed
        aid = rng.randint(1, self.seed_rows)
        try:
            out = pg.psql(f"SELECT (SELECT count(*) FROM recorded), "
                          f"(SELECT count(*) FROM pgbench_accounts WHERE aid = {aid})",
                          timeout=60).strip()
        except DatabaseError as err:
            raise OSError(str(err)) from None  # down for the cutover
        seen, found = (int(x) for x in out.split("|"))
        if seen < committed:
            raise DemoFailed(f"{committed} inserts were committed but the table holds {seen}")
        if found != 1:
            raise DemoFailed(f"pgbench_accounts row {aid} is missing")

    def check_app_after_cutover(self) -> None:
        """On DEST: the server answers and takes inserts; pg_amcheck is clean; every recorded
        insert is present."""
        pg = self._cluster()
        assert self.recorder is not None
        try:
            pg.wait_ready(60)
            n = self.recorder.committed
            self.recorder.wait_committed(n + 20, timeout=120)
            self.recorder.stop()
            pg.amcheck()
            present = pg.recorded_ids()
        except DatabaseError as err:
            raise DemoFailed(f"after the cutover: {err}") from None
        recorded = read_record(str(self.record_file))
        lost = missing(str(self.record_file), present)
        if lost:
            raise DemoFailed(f"{len(lost)} committed inserts are missing on the destination, "
                             f"e.g. id {lost[0]}")
        self.results.update(acknowledged_writes=len(recorded),
                            insert_errors=self.recorder.errors)
        _say(f"      PostgreSQL answers on the destination; pg_amcheck --heapallindexed clean; "
             f"all {len(recorded)} committed inserts present")

    def verify_data(self, check: Path) -> None:
        if not (check / "pgdata" / "PG_VERSION").is_file():
            raise DemoFailed("the destination has no PostgreSQL data directory")

    def extra_summary(self) -> list[tuple[str, str]]:
        r = self.results
        return [("queries checked during the restore", str(r["reads_checked"])),
                ("committed inserts verified", f"{r['acknowledged_writes']} "
                 f"({r['insert_errors']} refused while the server was down)"),
                ("pg_amcheck --heapallindexed", "clean")]

    def cleanup(self) -> None:
        if self.recorder is not None:
            self.recorder.stop()
        super().cleanup()
