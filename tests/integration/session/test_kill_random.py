"""Randomized kill test (issue 9): SIGKILL the session process at a random moment of its life
while an application writes with fsync, resume, let the automatic cutover finish, and check
DEST alone: fsck clean, every backed-up file intact, every acknowledged write there.

Each trial draws (from a seeded RNG) the filesystem (ext4, xfs), the application and where
to kill:

    restore     at a random moment of the background restore
    checkpoint  once mid-restore, then again while the resumed process recovers the overlay
                (replays its log and checkpoints it at once) and rebuilds the stack
    merge       during the cutover's merge of the overlay into DEST (the application wrote a
                ballast first, so there is something to merge)
    teardown    in one of the other cutover phases (stop-app, unmount, mount-dest, start-app,
                discard) or while the process closes the volume after `done`

The application (drawn too) is tests/apps/ackwriter.py (appended records and in-place slot
versions, each fsync'd, then logged, fsync'd, outside the mount) or the SQLite sample
application (dmrecover.demo.sampleapp: commits with synchronous=EXTRA, each logged outside).

Replay: every failure names the seed and the trial. DMR_KILLTEST_SEED=<seed> picks the seed
(default: random, printed), DMR_KILLTEST_TRIALS=<n> the number of trials (default 30),
DMR_KILLTEST_ONLY=<i,j> runs only those trials of that seed, DMR_KILLTEST_LANES=<n> how many
run side by side (default 2).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from dmrecover import testhooks
from dmrecover.demo import sampleapp
from dmrecover.repository.backup import backup
from dmrecover.repository.repo import Repository
from dmrecover.system import command
from dmrecover.system.mounts import mount_at
from tests.apps import ackwriter
from tests.apps.livekit import ENV_KEYS, Sandbox, tree_checksums
from tests.helpers import images

pytestmark = [pytest.mark.root, pytest.mark.slow]

MiB = 1 << 20
TRIALS = int(os.environ.get("DMR_KILLTEST_TRIALS", "30"))
SEED = int(os.environ.get("DMR_KILLTEST_SEED") or random.SystemRandom().randrange(1 << 32))
LANES = int(os.environ.get("DMR_KILLTEST_LANES", "2"))
ONLY = {int(x) for x in os.environ.get("DMR_KILLTEST_ONLY", "").split(",") if x.strip()}
# The background restorer sleeps this long per chunk (test hook): the restore of the small
# volume lasts a couple of seconds, so there is a restore to kill and the writer runs in it.
RESTORE_DELAY = "0.04"
CHUNK = 256 << 10
BALLAST_MIB = 8
# Where to kill, with the weight of each; "teardown" picks one of TEARDOWN_PHASES.
WHERE = {"restore": 3, "checkpoint": 2, "merge": 3, "teardown": 3}
TEARDOWN_PHASES = ("stop-app", "unmount", "unmount", "mount-dest", "start-app", "discard",
                   "exit")
# With a hook for the overlay's checkpoint threshold (log bytes; 8 MiB otherwise, more than
# these trials write), the checkpoint trials make it small: a checkpoint at nearly every
# flush, so the first kill lands around one too. Without it they rely on the checkpoint every
# recovery makes at once (the second kill).
CHECKPOINT_ENV: str | None = getattr(testhooks, "CHECKPOINT_LOG_ENV", None)
CHECKPOINT_LOG_BYTES = "16384"
SKIP_TREE = ("app.db", "app.db-journal", "lost+found", ackwriter.SUBDIR)


@dataclass
class Volume:
    fstype: str
    backup_id: str
    checksums: dict[str, str]


@dataclass
class Trial:
    index: int
    fstype: str
    where: str
    target: str  # the phase aimed at (restore, checkpoint, or a cutover phase)
    app: str = "ackwriter"  # or "sqlite": dmrecover.demo.sampleapp
    killed_in: list[str] = field(default_factory=list)  # state/phase seen after each kill
    acks: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    steps: dict[str, float] = field(default_factory=dict)  # step -> seconds it took
    problem: str = ""

    def step(self, name: str, since: float) -> float:
        now = time.monotonic()
        self.steps[name] = now - since
        return now

    def line(self) -> str:
        acks = " ".join(f"{k}={v}" for k, v in self.acks.items())
        verdict = "FAIL " + self.problem if self.problem else "ok"
        steps = " ".join(f"{k} {v:.1f}" for k, v in self.steps.items())
        return (f"trial {self.index:2d} {self.fstype:4s} {self.app:9s} {self.where:10s} "
                f"aim {self.target:10s} killed in {','.join(self.killed_in) or '-':28s} "
                f"{acks:34s} {self.seconds:5.1f}s ({steps}) {verdict}")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    """One repository with a small ext4 and a small xfs backup, shared by every trial."""
    tmp = tmp_path_factory.mktemp("killrand")
    repo = Repository.init(tmp / "repo")
    vols = {}
    for fstype, seed in (("ext4", 21), ("xfs", 22)):
        img = images.make_fs_image(tmp / f"{fstype}.img", fstype, size=64 * MiB, seed=seed,
                                   budget=12 * MiB)
        with images.mounted(img, options="ro,nouuid" if fstype == "xfs" else "ro") as m:
            checksums = tree_checksums(m, skip=SKIP_TREE)
        manifest = backup(img, repo, name=fstype, chunk_size=CHUNK)
        img.unlink()
        vols[fstype] = Volume(fstype, manifest.id, checksums)
    return tmp, vols


# ---------------------------------------------------------------- killing


def _session_process(sb: Sandbox, name: str, pid: int | None) -> psutil.Process | None:
    """The session process `name` runs as, when pid is it (never anything else)."""
    if not pid:
        return None
    try:
        p = psutil.Process(pid)
        created = p.create_time()
    except psutil.Error:
        return None
    # The session process is forked by live-restore or resume (its command line is theirs)
    # or run as `session-run`: it is known by the pid and start time its record names.
    if abs(created - (sb.session(name).get("pid_create_time") or 0)) < 0.01:
        return p
    return None


def _where(sb: Sandbox, name: str) -> str:
    rec = sb.session(name)
    return f"{rec['state']}/{rec.get('cutover_phase') or '-'}"


def _kill(sb: Sandbox, name: str, proc: psutil.Process | None) -> str:
    """SIGKILL the session process (only it); returns where the session was left."""
    if proc is None:
        return f"missed:{_where(sb, name)}"
    try:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    except psutil.NoSuchProcess:
        return f"missed:{_where(sb, name)}"
    return _where(sb, name)


def _wait_acks(sb: Sandbox, timeout: float = 60) -> None:
    acks = sb.appstate / ackwriter.ACKS
    deadline = time.monotonic() + timeout
    while not (acks.exists() and acks.stat().st_size > 0):
        if time.monotonic() > deadline:
            raise AssertionError("the application acknowledged no write")
        time.sleep(0.02)


def _kill_in_restore(sb: Sandbox, name: str, rng: random.Random) -> str:
    _wait_acks(sb)
    time.sleep(rng.uniform(0.0, 1.5))
    return _kill(sb, name, _session_process(sb, name, sb.session(name)["pid"]))


def _kill_at_phase(sb: Sandbox, name: str, phase: str, rng: random.Random,
                   timeout: float = 120) -> str:
    """Poll session.json until the cutover reaches `phase` ("exit": the record says done but
    the process still closes its volume), then kill after a short random delay."""
    deadline = time.monotonic() + timeout
    proc = None
    while time.monotonic() < deadline:
        try:
            rec = sb.session(name)
        except (OSError, ValueError):
            continue
        proc = _session_process(sb, name, rec.get("pid")) or proc
        at = rec.get("cutover_phase") if rec["state"] == "cutting-over" else rec["state"]
        if at == phase or (phase == "exit" and at == "done"):
            time.sleep(rng.uniform(0.0, 0.03))
            return _kill(sb, name, proc)
        if rec["state"] in ("done", "failed"):
            return _kill(sb, name, proc)  # went past it between two looks
        if rec.get("error"):  # e.g. the restore cannot complete: it would never get there
            raise AssertionError(f"session {name} reports an error: {rec['error']}")
        time.sleep(0.002)
    raise AssertionError(f"session {name} never reached phase {phase}: {_where(sb, name)}")


def _kill_in_recovery(sb: Sandbox, name: str, env: dict[str, str], rng: random.Random) -> str:
    """Resume in the background; kill the new process shortly after it appears: while it
    replays and checkpoints the overlay, or builds the stack again."""
    old = sb.session(name).get("pid")
    full_env = {k: v for k, v in os.environ.items() if k not in ENV_KEYS}
    full_env.update(sb.env)
    full_env.update(env)
    resumer = subprocess.Popen([sys.executable, "-m", "dmrecover", "resume", name],
                               env=full_env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, cwd="/")
    try:
        deadline = time.monotonic() + 120
        proc = None
        while proc is None and time.monotonic() < deadline:
            try:
                pid = sb.session(name).get("pid")
            except (OSError, ValueError):
                pid = None
            if pid and pid != old:
                proc = _session_process(sb, name, pid)
            time.sleep(0.002)
        if proc is None:
            raise AssertionError(f"resume of {name} started no session process")
        time.sleep(rng.uniform(0.0, 0.4))
        return _kill(sb, name, proc)
    finally:
        resumer.wait(120)


# ---------------------------------------------------------------- checking


def _stop_writer(sb: Sandbox) -> None:
    procs = sb.app_procs()
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=60)
    assert not alive, f"the writer did not stop: {alive}"


def _fsck(dest: Path, fstype: str) -> None:
    argv = (["e2fsck", "-fn", str(dest)] if fstype == "ext4"
            else ["xfs_repair", "-n", str(dest)])
    r = command.run(argv, check=False, timeout=300)
    assert r.returncode == 0, f"{argv[0]} on DEST: rc {r.returncode}: " \
                              f"{(r.stdout + r.stderr).strip()[-600:]}"


def _verify_dest(sb: Sandbox, dest: Path, vol: Volume, app: str) -> dict[str, int]:
    _fsck(dest, vol.fstype)
    opts = "ro,nouuid" if vol.fstype == "xfs" else "ro"
    with images.mounted(dest, options=opts) as m:
        got = tree_checksums(m, skip=SKIP_TREE)
        differ = sorted(k for k in vol.checksums if got.get(k) != vol.checksums[k])
        assert not differ, f"backed-up files differ or missing on DEST: {differ[:5]}"
        if app == "sqlite":
            acks = sampleapp.acknowledged(str(sb.appstate))
            rows, problems = sampleapp.check_database(str(m / sampleapp.DB_NAME), acks)
            counts = {"commits": len(acks), "rows": rows}
        else:
            counts, problems = ackwriter.check(str(m), str(sb.appstate))
    assert not problems, f"{len(problems)} problem(s): {problems[:5]}"
    assert any(counts.values()), "the application acknowledged nothing"
    return counts


# ---------------------------------------------------------------- one trial


def _run_trial(sb: Sandbox, vols: dict[str, Volume], t: Trial, rng: random.Random) -> None:
    name = f"k{t.index}"
    vol = vols[t.fstype]
    dest = sb.tmp / f"dest-{t.index}.img"
    sb.appstate = sb.tmp / f"app-{t.index}"
    sb.appstate.mkdir()
    env = {"DMRECOVER_TEST_RESTORE_DELAY": RESTORE_DELAY}
    if t.where == "checkpoint" and CHECKPOINT_ENV:
        env[CHECKPOINT_ENV] = CHECKPOINT_LOG_BYTES
    ballast = BALLAST_MIB if t.where == "merge" else 1
    start = ackwriter.start_command(str(sb.mnt), str(sb.appstate), ballast_mib=ballast)
    if t.app == "sqlite":
        start = (f"{sys.executable} -m dmrecover.demo.sampleapp serve --data {sb.mnt} "
                 f"--state {sb.appstate} --interval 0.005")
    t0 = time.monotonic()
    r = sb.cli("live-restore", "--repo", str(sb.repo), vol.backup_id, str(dest), "--mount",
               str(sb.mnt), "--session", name, "--app-start", start, env=env)
    assert r.returncode == 0, f"live-restore: {r.stderr.strip()}"
    t0 = t.step("start", t0)
    if t.where == "restore":
        t.killed_in.append(_kill_in_restore(sb, name, rng))
    elif t.where == "checkpoint":
        t.killed_in.append(_kill_in_restore(sb, name, rng))
        t.killed_in.append(_kill_in_recovery(sb, name, env, rng))
    else:
        t.killed_in.append(_kill_at_phase(sb, name, t.target, rng))
    t0 = t.step("kill", t0)
    r = sb.cli("resume", name, env=env)
    assert r.returncode == 0, f"resume: {r.stderr.strip()}"
    t0 = t.step("resume", t0)
    done = sb.wait_state(name, ("done", "failed"), timeout=240)
    assert done["state"] == "done", f"session ended {done['state']}: {done.get('error')}"
    m = mount_at(str(sb.mnt))
    assert m is not None, "DEST is not mounted at the mount point after the cutover"
    t0 = t.step("done", t0)
    _stop_writer(sb)
    command.run(["umount", str(sb.mnt)])
    t0 = t.step("stop", t0)
    t.acks = _verify_dest(sb, dest, vol, t.app)
    t.step("verify", t0)


def _trial(sb: Sandbox, vols: dict[str, Volume], i: int) -> Trial:
    """Trial i of SEED in sandbox sb (left clean for the next one)."""
    rng = random.Random(f"{SEED}:{i}")
    fstype = rng.choice(("ext4", "xfs"))
    where = rng.choices(list(WHERE), weights=list(WHERE.values()))[0]
    target = {"restore": "restore", "checkpoint": "recovery",
              "merge": "merge"}.get(where) or rng.choice(TEARDOWN_PHASES)
    # The merge trials need the writer's ballast (an overlay worth merging).
    app = "ackwriter" if where == "merge" else rng.choice(("ackwriter", "sqlite"))
    t = Trial(i, fstype, where, target, app)
    t0 = time.monotonic()
    try:
        _run_trial(sb, vols, t, rng)
    except Exception as err:  # recorded; the next trial starts from a clean sandbox
        t.problem = f"{type(err).__name__}: {err}"
        log = sb.state_root / f"k{i}" / "session.log"
        if log.exists():
            t.problem += "\n    session.log tail:\n    " + "\n    ".join(
                log.read_text(errors="replace").splitlines()[-15:])
    finally:
        t1 = time.monotonic()
        sb.teardown()  # whatever the trial left: processes, mounts, loops
        left = sb.mounts_under() + sb.loops_under()
        if left and not t.problem:
            t.problem = f"left behind after the teardown: {left}"
        t.step("clean", t1)
        t.seconds = time.monotonic() - t0
        if not t.problem:
            (sb.tmp / f"dest-{i}.img").unlink(missing_ok=True)
            shutil.rmtree(sb.state_root / f"k{i}", ignore_errors=True)
    print(t.line(), flush=True)
    return t


def test_checker_finds_lost_writes(tmp_path: Path) -> None:
    """The writer for real on a plain directory, then the check of what it wrote: clean as
    written; a zeroed acknowledged record, an older slot version back, a changed ballast are
    each found (the kill test can fail)."""
    # tmpfs when there is one: this checks the checker, not durability, and fsyncs on a
    # loaded disk would make it slow.
    shm = Path("/dev/shm")
    root = Path(tempfile.mkdtemp(dir=shm)) if shm.is_dir() else tmp_path
    try:
        _checker_finds_lost_writes(root)
    finally:
        if root != tmp_path:
            shutil.rmtree(root)


def _checker_finds_lost_writes(root: Path) -> None:
    data, state = root / "data", root / "state"
    data.mkdir()
    argv = ackwriter.start_command(str(data), str(state), ballast_mib=1).split()
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while sum(1 for a in ackwriter.acknowledged(str(state)) if a[0] == "S") \
                < ackwriter.SLOTS + 10:
            assert time.monotonic() < deadline and p.poll() is None, "the writer stalled"
            time.sleep(0.05)
    finally:
        p.terminate()
        p.wait(30)
    base = data / ackwriter.SUBDIR
    counts, problems = ackwriter.check(str(data), str(state))
    assert not problems and counts["ballast"] == 1 and counts["appended"] > ackwriter.SLOTS
    # An acknowledged appended record zeroed.
    log = next(base.glob("*.log"))
    with open(log, "r+b") as f:
        os.pwrite(f.fileno(), bytes(ackwriter.RECORD), 3 * ackwriter.RECORD)
    # Slot 5 back to the version of the first lap (saved from the records themselves).
    acks = ackwriter.acknowledged(str(state))
    run = acks[1][1]
    old = ackwriter.make_record(run, 5, 5, ackwriter.SLOT)  # a valid but older version
    with open(base / ackwriter.SLOTS_FILE, "r+b") as f:
        os.pwrite(f.fileno(), old, 5 * ackwriter.SLOT)
    with open(base / ackwriter.BALLAST, "r+b") as f:
        os.pwrite(f.fileno(), b"x", 12345)
    _, problems = ackwriter.check(str(data), str(state))
    text = "\n".join(problems)
    assert f"record {run}/3 lost (zeros)" in text, text
    assert "slot 5: its acknowledged version" in text and "an older one" in text, text
    assert "ballast differs" in text, text
    assert len(problems) == 3, text


def test_random_kills_lose_no_acknowledged_write(world) -> None:
    """TRIALS trials in LANES sandboxes side by side (each its own mount point, DEST and
    sessions; one repository): the waits of one lane (restore delay, fsyncs, process starts)
    are the other's working time, which keeps the whole under ~5 minutes on 2 cores."""
    tmp, vols = world
    indices = [i for i in range(TRIALS) if not ONLY or i in ONLY]
    lanes = [Sandbox(tmp / f"lane{k}") for k in range(min(LANES, len(indices)))]
    for sb in lanes:
        sb.repo = tmp / "repo"
    print(f"\nrandom kill test: seed {SEED}, {len(indices)} trials, {len(lanes)} lanes, "
          f"checkpoint threshold hook {CHECKPOINT_ENV or 'absent'}")
    t_all = time.monotonic()
    try:
        with ThreadPoolExecutor(len(lanes)) as pool:
            futures = [pool.submit(lambda k: [_trial(lanes[k], vols, i)
                                              for i in indices[k::len(lanes)]], k)
                       for k in range(len(lanes))]
            report = sorted((t for f in futures for t in f.result()), key=lambda t: t.index)
    finally:
        for sb in lanes:
            sb.teardown()
    total = time.monotonic() - t_all
    failed = [t for t in report if t.problem]
    hit = sum(1 for t in report for k in t.killed_in if not k.startswith("missed"))
    summary = (f"seed {SEED}: {len(report)} trials, {len(failed)} failed, {hit} kills hit a "
               f"live session process, {total:.0f} s")
    print(summary)
    print(json.dumps({"seed": SEED, "trials": len(report), "failed": len(failed),
                      "kills_hit": hit, "seconds": round(total, 1)}))
    assert report, "no trial ran"
    assert not failed, (
        summary + "\n" + "\n".join(t.line() for t in report) + "\nreplay one: "
        + "; ".join(f"DMR_KILLTEST_SEED={SEED} DMR_KILLTEST_ONLY={t.index}" for t in failed))
