"""A small real application for the demo, the tests and the benchmarks.

`python -m dmrecover.demo.sampleapp serve --data DIR --state OUTSIDE` opens (or creates) a SQLite
database DIR/app.db with synchronous=EXTRA, inserts rows in a writer thread (each commit fsync'd,
then its key appended and fsync'd to OUTSIDE/acks.log: the list of every write the application
saw acknowledged, kept outside the mount), and answers queries on a Unix socket
OUTSIDE/app.sock, one JSON object per line:

    {"op": "ping"}                       -> {"ok": true, "pid": ...}
    {"op": "count"}                      -> {"ok": true, "rows": N}          (reads the database)
    {"op": "get", "key": K}              -> {"ok": true, "digest": ...}
    {"op": "sha256", "path": "rel/path"} -> {"ok": true, "sha256": ...}     (reads a file on DIR)
    {"op": "stop"}                       -> {"ok": true}, then a clean exit

`stop --state OUTSIDE` sends the stop request; SIGTERM does the same. `seed --data DIR` fills a
fresh volume with a database of real rows (for the demo). The application keeps running through
I/O errors (logging them), as a real server would until someone stops it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import socket
import sqlite3
import sys
import threading
import uuid

DB_NAME = "app.db"
ACK_LOG = "acks.log"
SOCKET = "app.sock"


def _digest(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


def _connect(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=30, check_same_thread=False, isolation_level=None)
    db.execute("PRAGMA journal_mode=DELETE")
    # EXTRA, not FULL: in DELETE mode a commit is the unlink of the journal, and only EXTRA
    # fsyncs the directory after it; with FULL the last commit before a crash can roll back.
    db.execute("PRAGMA synchronous=EXTRA")
    db.execute("CREATE TABLE IF NOT EXISTS rows (key TEXT PRIMARY KEY, payload BLOB, "
               "digest TEXT)")
    return db


def seed(data_dir: str, rows: int = 2000, row_size: int = 1024) -> int:
    """Create DIR/app.db with `rows` rows of random payload; returns the row count."""
    db = _connect(os.path.join(data_dir, DB_NAME))
    db.execute("BEGIN")
    for i in range(rows):
        payload = os.urandom(row_size)
        db.execute("INSERT OR REPLACE INTO rows VALUES (?, ?, ?)",
                   (f"seed-{i}", payload, _digest(payload)))
    db.execute("COMMIT")
    db.close()
    return rows


class Server:
    """The running application: a writer thread plus a query socket."""

    def __init__(self, data_dir: str, state_dir: str, interval: float, row_size: int) -> None:
        self.data_dir = data_dir
        self.state_dir = state_dir
        self.interval = interval
        self.row_size = row_size
        self.stopping = threading.Event()
        self.db = _connect(os.path.join(data_dir, DB_NAME))
        self.lock = threading.Lock()
        self.run_id = uuid.uuid4().hex[:8]
        self.acks = os.open(os.path.join(state_dir, ACK_LOG),
                            os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.errors = 0
        self.commits = 0

    def writer(self) -> None:
        n = 0
        while not self.stopping.is_set():
            key = f"{self.run_id}-{n}"
            payload = os.urandom(self.row_size)
            try:
                with self.lock:
                    self.db.execute("INSERT INTO rows VALUES (?, ?, ?)",
                                    (key, payload, _digest(payload)))
                # The commit returned: the write is acknowledged; record it durably outside.
                os.write(self.acks, f"{key} {_digest(payload)}\n".encode())
                os.fsync(self.acks)
                self.commits += 1
                n += 1
            except (sqlite3.Error, OSError) as err:
                self.errors += 1
                print(f"sampleapp: write {key} failed: {err}", file=sys.stderr, flush=True)
                self.stopping.wait(0.5)
                continue
            if self.interval:
                self.stopping.wait(self.interval)

    def answer(self, req: dict) -> dict:
        op = req.get("op")
        if op == "ping":
            return {"ok": True, "pid": os.getpid(), "commits": self.commits,
                    "errors": self.errors}
        if op == "count":
            with self.lock:
                (rows,) = self.db.execute("SELECT count(*) FROM rows").fetchone()
            return {"ok": True, "rows": rows}
        if op == "get":
            with self.lock:
                row = self.db.execute("SELECT payload, digest FROM rows WHERE key = ?",
                                      (req["key"],)).fetchone()
            if row is None:
                return {"ok": False, "error": "no such key"}
            return {"ok": _digest(row[0]) == row[1], "digest": row[1]}
        if op == "sha256":
            h = hashlib.sha256()
            with open(os.path.join(self.data_dir, req["path"]), "rb") as f:
                while block := f.read(1 << 20):
                    h.update(block)
            return {"ok": True, "sha256": h.hexdigest()}
        if op == "stop":
            self.stopping.set()
            return {"ok": True}
        return {"ok": False, "error": f"unknown op {op!r}"}

    def serve(self) -> None:
        path = os.path.join(self.state_dir, SOCKET)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
        sock.listen(16)
        sock.settimeout(0.05)  # how soon a stop request is noticed
        writer = threading.Thread(target=self.writer, daemon=True)
        writer.start()
        while not self.stopping.is_set():
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._client, args=(conn,), daemon=True).start()
        writer.join(timeout=30)
        sock.close()
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        with self.lock:
            try:
                self.db.close()
            except sqlite3.Error:
                pass
        os.close(self.acks)

    def _client(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rwb") as f:
            for line in f:
                try:
                    reply = self.answer(json.loads(line))
                except Exception as err:  # a query error is an answer, not a crash
                    reply = {"ok": False, "error": f"{type(err).__name__}: {err}"}
                f.write(json.dumps(reply).encode() + b"\n")
                f.flush()


def query(state_dir: str, req: dict, timeout: float = 30.0) -> dict:
    """Send one request to the application serving state_dir's socket; return its answer."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(os.path.join(state_dir, SOCKET))
        sock.sendall(json.dumps(req).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            part = sock.recv(65536)
            if not part:
                break
            buf += part
        if not buf.endswith(b"\n"):
            # the application went away mid-answer (e.g. stopping for the cutover)
            raise ConnectionError("the application closed the connection without answering")
        return json.loads(buf)
    finally:
        sock.close()


def acknowledged(state_dir: str) -> dict[str, str]:
    """key -> digest of every write the application saw acknowledged."""
    out = {}
    try:
        with open(os.path.join(state_dir, ACK_LOG)) as f:
            for line in f:
                parts = line.split()
                if len(parts) == 2:
                    out[parts[0]] = parts[1]
    except FileNotFoundError:
        pass
    return out


def check_database(db_path: str, acks: dict[str, str]) -> tuple[int, list[str]]:
    """Open db_path read-only; return (rows, problems): every ack must be there, intact."""
    problems = []
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        (ok,) = db.execute("PRAGMA integrity_check").fetchone()
        if ok != "ok":
            problems.append(f"integrity_check: {ok}")
        have = {k: (p, d) for k, p, d in db.execute("SELECT key, payload, digest FROM rows")}
    finally:
        db.close()
    for key, digest in acks.items():
        if key not in have:
            problems.append(f"acknowledged row {key} missing")
        elif have[key][1] != digest or _digest(have[key][0]) != digest:
            problems.append(f"acknowledged row {key} corrupt")
    for key, (payload, digest) in have.items():
        if _digest(payload) != digest:
            problems.append(f"row {key} corrupt")
    return len(have), problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dmrecover-sampleapp")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--data", required=True, help="directory on the mount")
    s.add_argument("--state", required=True, help="directory outside the mount")
    s.add_argument("--interval", type=float, default=0.02, help="seconds between commits")
    s.add_argument("--row-size", type=int, default=512)
    s = sub.add_parser("stop")
    s.add_argument("--state", required=True)
    s = sub.add_parser("seed")
    s.add_argument("--data", required=True)
    s.add_argument("--rows", type=int, default=2000)
    args = p.parse_args(argv)
    if args.cmd == "seed":
        seed(args.data, args.rows)
        return 0
    if args.cmd == "stop":
        try:
            query(args.state, {"op": "stop"}, timeout=10)
        except (OSError, ValueError) as err:
            print(f"sampleapp: not running ({err})", file=sys.stderr)
            return 0
        return 0
    os.makedirs(args.state, exist_ok=True)
    server = Server(args.data, args.state, args.interval, args.row_size)
    signal.signal(signal.SIGTERM, lambda *_: server.stopping.set())
    print(f"sampleapp: serving {args.data} (pid {os.getpid()})", flush=True)
    server.serve()
    print("sampleapp: stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
