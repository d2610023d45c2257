"""A writer application for the kill tests: fsync'd records on the mount, each acknowledged
one logged (fsync'd) outside it, and a checker for what a volume must then hold.

    python tests/apps/ackwriter.py serve --data MOUNT --state OUTSIDE [--ballast MiB]

stdlib only and runnable by path (the session starts it with cwd=/), stopped by SIGTERM, as a
real daemon would be. It writes under MOUNT/ackw/:

    <run>.log    appended records, one per `RECORD` bytes: each write fsync'd, then acknowledged
    slots.dat    `SLOTS` slots overwritten in place, round robin, across runs: each fsync'd,
                 then acknowledged (what a database page does: the latest version must win)
    ballast.bin  written once per volume (--ballast MiB of random data, fsync'd, acknowledged):
                 makes the overlay large, so that the cutover's merge lasts

and under OUTSIDE: runs.log (the run ids in the order they started, written before the run
writes anything) and acks.log (one line per acknowledged write, appended after its fsync):

    A <run> <seq> <sha256>           record <seq> of <run>.log
    S <run> <seq> <slot> <sha256>    the version of slot <slot> written by (run, seq)
    B ballast.bin <sha256>

`check(root, state)` says what is wrong with the tree at root (mounted DEST) against them.
The writer keeps going through I/O errors (the session process it runs on may be killed): a
write that failed is simply not acknowledged.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import signal
import struct
import sys
import time
import uuid

SUBDIR = "ackw"
RECORD = 1000  # bytes per appended record: not block-aligned, so records share blocks
SLOT = 1536    # bytes per slot version: straddles 4 KiB blocks now and then
SLOTS = 64
SLOTS_FILE = "slots.dat"
BALLAST = "ballast.bin"
ACKS = "acks.log"
RUNS = "runs.log"
MAGIC = b"ACKW"
# magic, run id, sequence number, slot (0xffffffff for an appended record), payload bytes
_HDR = struct.Struct("<4s8sQI")
NO_SLOT = 0xFFFFFFFF


def make_record(run: str, seq: int, slot: int, size: int) -> bytes:
    """A self-checking record of `size` bytes: header, random payload, sha256 of both."""
    body = _HDR.pack(MAGIC, run.encode(), seq, slot) + os.urandom(size - _HDR.size - 32)
    return body + hashlib.sha256(body).digest()


def parse_record(raw: bytes) -> tuple[str, int, int] | None:
    """(run, seq, slot) of a whole, intact record; None for anything else (zeros, torn)."""
    if len(raw) < _HDR.size + 32 or hashlib.sha256(raw[:-32]).digest() != raw[-32:]:
        return None
    magic, run, seq, slot = _HDR.unpack_from(raw)
    if magic != MAGIC:
        return None
    return run.decode(), seq, slot


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Writer:
    """One run of the application."""

    def __init__(self, data: str, state: str, interval: float, ballast_mib: int) -> None:
        self.dir = os.path.join(data, SUBDIR)
        self.state = state
        self.interval = interval
        self.ballast_mib = ballast_mib
        self.run = uuid.uuid4().hex[:8]
        self.stopping = False
        self.acks = os.open(os.path.join(state, ACKS), os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                            0o600)

    def ack(self, line: str) -> None:
        os.write(self.acks, (line + "\n").encode())
        os.fsync(self.acks)

    def _ballast_acked(self) -> bool:
        try:
            with open(os.path.join(self.state, ACKS)) as f:
                return any(line.startswith("B ") for line in f)
        except FileNotFoundError:
            return False

    def setup(self) -> None:
        with open(os.path.join(self.state, RUNS), "a") as f:
            f.write(self.run + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.makedirs(self.dir, exist_ok=True)
        _fsync_dir(os.path.dirname(self.dir))
        self.log_fd = os.open(os.path.join(self.dir, f"{self.run}.log"),
                              os.O_RDWR | os.O_CREAT, 0o644)
        self.slots_fd = os.open(os.path.join(self.dir, SLOTS_FILE), os.O_RDWR | os.O_CREAT,
                                0o644)
        _fsync_dir(self.dir)

    def write_ballast(self) -> None:
        """Random data, written once per volume (a run stopped midway: the next one redoes
        it), so that the overlay holds a good deal to merge."""
        if not self.ballast_mib or self._ballast_acked():
            return
        h = hashlib.sha256()
        rng = random.Random(self.run)
        path = os.path.join(self.dir, BALLAST)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for _ in range(self.ballast_mib):
                if self.stopping:
                    return
                piece = rng.randbytes(1 << 20)
                os.write(fd, piece)
                h.update(piece)
            os.fsync(fd)
        finally:
            os.close(fd)
        _fsync_dir(self.dir)
        self.ack(f"B {BALLAST} {h.hexdigest()}")

    def step(self, seq: int) -> None:
        rec = make_record(self.run, seq, NO_SLOT, RECORD)
        os.pwrite(self.log_fd, rec, seq * RECORD)
        os.fsync(self.log_fd)
        self.ack(f"A {self.run} {seq} {_sha(rec)}")
        slot = seq % SLOTS
        rec = make_record(self.run, seq, slot, SLOT)
        os.pwrite(self.slots_fd, rec, slot * SLOT)
        os.fsync(self.slots_fd)
        self.ack(f"S {self.run} {seq} {slot} {_sha(rec)}")

    def serve(self) -> None:
        self.setup()
        try:
            self.write_ballast()
        except OSError as err:
            print(f"ackwriter: ballast failed: {err}", file=sys.stderr, flush=True)
        seq = 0
        while not self.stopping:
            try:
                self.step(seq)
            except OSError as err:  # not acknowledged; a real server logs and goes on
                print(f"ackwriter: write {self.run}/{seq} failed: {err}", file=sys.stderr,
                      flush=True)
                time.sleep(0.2)
            seq += 1  # a failed sequence number is never reused
            if self.interval:
                time.sleep(self.interval)


# ---------------------------------------------------------------- checking


def acknowledged(state: str) -> list[list[str]]:
    """Every acknowledgement line, split, in the order they were made."""
    try:
        with open(os.path.join(state, ACKS)) as f:
            return [line.split() for line in f if line.strip()]
    except FileNotFoundError:
        return []


def check(root: str, state: str) -> tuple[dict[str, int], list[str]]:
    """What is wrong with the writer's files under root (a mounted volume) given the
    acknowledgements in state: (counts, problems). Every acknowledged appended record must be
    there byte for byte; every slot must hold its latest acknowledged version or a version
    written after it (one in flight when the writer stopped); the ballast must be whole."""
    problems: list[str] = []
    base = os.path.join(root, SUBDIR)
    with open(os.path.join(state, RUNS)) as f:
        order = {run: i for i, run in enumerate(line.strip() for line in f if line.strip())}
    latest: dict[int, tuple[int, int, str]] = {}  # slot -> (run order, seq, sha)
    counts = {"appended": 0, "slots": 0, "ballast": 0}
    for parts in acknowledged(state):
        kind = parts[0]
        if kind == "A":
            run, seq, sha = parts[1], int(parts[2]), parts[3]
            counts["appended"] += 1
            try:
                with open(os.path.join(base, f"{run}.log"), "rb") as f:
                    got = os.pread(f.fileno(), RECORD, seq * RECORD)
            except FileNotFoundError:
                problems.append(f"{run}.log missing (record {seq} was acknowledged)")
                continue
            if _sha(got) != sha:
                problems.append(f"acknowledged record {run}/{seq} lost "
                                f"({'zeros' if not got.strip(bytes(1)) else 'other bytes'})")
        elif kind == "S":
            run, seq, slot, sha = parts[1], int(parts[2]), int(parts[3]), parts[4]
            counts["slots"] += 1
            latest[slot] = (order.get(run, -1), seq, sha)
        elif kind == "B":
            counts["ballast"] += 1
            h = hashlib.sha256()
            try:
                with open(os.path.join(base, parts[1]), "rb") as f:
                    while block := f.read(1 << 20):
                        h.update(block)
            except FileNotFoundError:
                problems.append("acknowledged ballast missing")
                continue
            if h.hexdigest() != parts[2]:
                problems.append("acknowledged ballast differs")
    if latest:
        with open(os.path.join(base, SLOTS_FILE), "rb") as f:
            for slot, (run_i, seq, sha) in sorted(latest.items()):
                raw = os.pread(f.fileno(), SLOT, slot * SLOT)
                if _sha(raw) == sha:
                    continue
                parsed = parse_record(raw)
                if parsed is None or parsed[2] != slot:
                    problems.append(f"slot {slot}: its acknowledged version (run #{run_i} "
                                    f"seq {seq}) lost, the slot holds no valid version")
                elif (order.get(parsed[0], -1), parsed[1]) <= (run_i, seq):
                    problems.append(f"slot {slot}: its acknowledged version (run #{run_i} "
                                    f"seq {seq}) lost, an older one (run #"
                                    f"{order.get(parsed[0], -1)} seq {parsed[1]}) is back")
    return counts, problems


def start_command(data: str, state: str, *, ballast_mib: int = 0,
                  interval: float = 0.005) -> str:
    """The --app-start command line for this writer."""
    return (f"{sys.executable} {os.path.abspath(__file__)} serve --data {data} --state {state} "
            f"--ballast {ballast_mib} --interval {interval}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ackwriter")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--data", required=True, help="the mount point")
    s.add_argument("--state", required=True, help="a directory outside the mount")
    s.add_argument("--interval", type=float, default=0.005, help="seconds between records")
    s.add_argument("--ballast", type=int, default=0, help="MiB written once per volume")
    args = p.parse_args(argv)
    os.makedirs(args.state, exist_ok=True)
    w = Writer(args.data, args.state, args.interval, args.ballast)

    def on_term(*_: object) -> None:
        w.stopping = True

    signal.signal(signal.SIGTERM, on_term)
    print(f"ackwriter: run {w.run} on {args.data} (pid {os.getpid()})", flush=True)
    w.serve()
    print(f"ackwriter: run {w.run} stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
