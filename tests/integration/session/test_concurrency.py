"""Two `dmrecover live-restore`s released at the same instant (issue 9, item 1), many times:

    same-dest    one DEST, two mount points
    same-mount   one mount point, two DESTs
    restore      an offline `dmrecover restore` and a live-restore of one DEST
    resume       two `dmrecover resume`s of one session whose process was killed

Each contender is a real CLI process that imports everything first, then waits on a FIFO; the
test releases both with one write. Exactly one must be accepted; the other must be refused with
one line naming the session that owns the DEST or mount point, a non-zero exit code and nothing
changed (no session record, its own DEST untouched). The accepted session then runs to `done`
(automatic cutover) while its application writes, and DEST alone must pass fsck and hold every
backed-up file and every acknowledged write.

DMR_RACE_ROUNDS=<n> sets the rounds per case (default 20), DMR_RACE_SECONDS=<s> the time a case
may take (default 45; at least 5 rounds run whatever it says), DMR_RACE_SEED=<seed> the order
the two are started in (default random, printed in failures).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from dmrecover.repository.backup import backup
from dmrecover.repository.repo import Repository
from dmrecover.system import command
from dmrecover.system.mounts import mount_at
from tests.apps import ackwriter
from tests.apps.livekit import ENV_KEYS, Sandbox, tree_checksums
from tests.helpers import images

pytestmark = [pytest.mark.root, pytest.mark.slow]

MiB = 1 << 20
ROUNDS = int(os.environ.get("DMR_RACE_ROUNDS", "20"))
CASE_SECONDS = float(os.environ.get("DMR_RACE_SECONDS", "45"))
MIN_ROUNDS = 5
SEED = int(os.environ.get("DMR_RACE_SEED") or random.SystemRandom().randrange(1 << 32))
SKIP_TREE = ("app.db", "app.db-journal", "lost+found", ackwriter.SUBDIR)
# The restore of the small volume lasts about a second: the application writes during it.
ENV = {"DMRECOVER_TEST_RESTORE_DELAY": "0.01"}

# A contender: imports the CLI (and what live-restore uses) first, signals that it is ready,
# blocks on the FIFO, then runs `dmrecover ARGS` the moment the test writes to it (after a
# delay, when the test staggers them).
CONTENDER = """
import os, sys, time
import dmrecover.cli.main as cli
import dmrecover.cli.parser, dmrecover.session.start  # noqa: the work starts after the barrier
fd = os.open(sys.argv[1], os.O_RDONLY)
open(sys.argv[2], "w").close()
os.read(fd, 1)
time.sleep(float(sys.argv[3]))
sys.exit(cli.main(sys.argv[4:]))
"""


@dataclass
class Outcome:
    session: str
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture(scope="module")
def race(tmp_path_factory: pytest.TempPathFactory):
    """A sandbox and one small ext4 backup, shared by every round."""
    tmp = tmp_path_factory.mktemp("race")
    sb = Sandbox(tmp)
    sb.appstate = tmp / "apps"  # every round's application state goes under it
    sb.appstate.mkdir()
    try:
        img = images.make_fs_image(tmp / "src.img", "ext4", size=32 * MiB, seed=31,
                                   budget=6 * MiB)
        with images.mounted(img, options="ro") as m:
            sb.checksums = tree_checksums(m, skip=SKIP_TREE)
        manifest = backup(img, Repository.init(sb.repo), name="vol", chunk_size=256 << 10)
        img.unlink()
        sb.backup_id, sb.fstype, sb.size = manifest.id, manifest.fstype, manifest.size
        yield sb
    finally:
        sb.teardown()


def _env(sb: Sandbox) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ENV_KEYS}
    env.update(sb.env)
    env.update(ENV)
    return env


def _zero_dest(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)


def _release_together(sb: Sandbox, argvs: dict[str, list[str]], tag: str,
                      delays: dict[str, float] | None = None) -> list[Outcome]:
    """Start one contender per session, wait until each is blocked on the FIFO, release them
    with one write (each then waits its delay, 0 by default); their outcomes once both have
    exited."""
    fifo = sb.tmp / f"barrier-{tag}"
    os.mkfifo(fifo, 0o600)
    # Held open read-write by the test: the contenders' opens never block, and the FIFO
    # always has a writer, so each read waits for its byte.
    wfd = os.open(fifo, os.O_RDWR)
    procs: dict[str, subprocess.Popen[str]] = {}
    try:
        for name, argv in argvs.items():
            ready = sb.tmp / f"ready-{tag}-{name}"
            procs[name] = subprocess.Popen(
                [sys.executable, "-c", CONTENDER, str(fifo), str(ready),
                 str((delays or {}).get(name, 0.0)), *argv],
                env=_env(sb), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                cwd="/")
        deadline = time.monotonic() + 120
        for name, p in procs.items():
            ready = sb.tmp / f"ready-{tag}-{name}"
            while not ready.exists() or psutil.Process(p.pid).status() != "sleeping":
                assert p.poll() is None, f"contender {name} exited early: {p.communicate()}"
                assert time.monotonic() < deadline, f"contender {name} never got ready"
                time.sleep(0.01)
        os.write(wfd, b"x" * len(procs))  # one byte each: both wake up now
        out = []
        for name, p in procs.items():
            stdout, stderr = p.communicate(timeout=300)
            out.append(Outcome(name, p.returncode, stdout, stderr))
        return out
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait(30)
        os.close(wfd)
        fifo.unlink()


def _live_restore_argv(sb: Sandbox, session: str, dest: Path, mnt: Path) -> list[str]:
    state = sb.appstate / session
    state.mkdir()
    return ["live-restore", "--repo", str(sb.repo), sb.backup_id, str(dest), "--mount",
            str(mnt), "--session", session, "--app-start",
            ackwriter.start_command(str(mnt), str(state))]


def _check_refusal(sb: Sandbox, loser: Outcome, winner: str, own_dest: Path | None) -> None:
    err = loser.stderr.strip()
    assert loser.returncode != 0
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1, f"the refusal is not one line: {err!r}"
    assert err.startswith("dmrecover: error: "), err
    assert winner in err, f"the refusal does not name the owner {winner}: {err!r}"
    # Nothing changed: no record for the refused session, its DEST untouched.
    assert not (sb.state_root / loser.session / "session.json").exists(), \
        "the refused session left a record"
    if own_dest is not None:
        assert os.stat(own_dest).st_blocks == 0, f"the refused session wrote to {own_dest}"


def _finish_and_verify(sb: Sandbox, session: str, dest: Path, mnt: Path) -> dict[str, int]:
    """Let the accepted session reach done, stop its application, check DEST alone."""
    done = sb.wait_state(session, ("done", "failed"), timeout=240)
    assert done["state"] == "done", f"{session} ended {done['state']}: {done.get('error')}"
    assert mount_at(str(mnt)) is not None, "DEST is not mounted after the cutover"
    procs = sb.app_procs(str(sb.appstate / session))
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass  # exited meanwhile: wait_procs below counts it gone
    _, alive = psutil.wait_procs(procs, timeout=60)
    assert not alive, f"the application did not stop: {alive}"
    command.run(["umount", str(mnt)])
    r = command.run(["e2fsck", "-fn", str(dest)], check=False, timeout=300)
    assert r.returncode == 0, f"e2fsck on DEST: {(r.stdout + r.stderr).strip()[-600:]}"
    with images.mounted(dest, options="ro") as m:
        got = tree_checksums(m, skip=SKIP_TREE)
        differ = sorted(k for k in sb.checksums if got.get(k) != sb.checksums[k])
        assert not differ, f"backed-up files differ or missing on DEST: {differ[:5]}"
        counts, problems = ackwriter.check(str(m), str(sb.appstate / session))
    assert not problems, problems[:5]
    return counts


def _verify_restored(dest: Path, sb: Sandbox) -> None:
    """DEST after an offline restore: the backup, fsck clean."""
    r = command.run(["e2fsck", "-fn", str(dest)], check=False, timeout=300)
    assert r.returncode == 0, f"e2fsck on DEST: {(r.stdout + r.stderr).strip()[-600:]}"
    with images.mounted(dest, options="ro") as m:
        got = tree_checksums(m, skip=SKIP_TREE)
    assert got == sb.checksums, "the restored DEST differs from the backup"


def _one_accepted(outcomes: list[Outcome]) -> tuple[str, Outcome]:
    """Exactly one of the two contenders was accepted: its session, and the refused one."""
    accepted = [o for o in outcomes if o.returncode == 0]
    summary = "; ".join(f"{o.session}: rc {o.returncode} {o.stderr.strip()[:300]!r}"
                        for o in outcomes)
    assert len(accepted) == 1, f"{len(accepted)} of 2 accepted: {summary}"
    winner = accepted[0].session
    return winner, next(o for o in outcomes if o.session != winner)


def _restore_round(sb: Sandbox, r: int, rng: random.Random) -> str:
    """An offline restore and a live-restore of one DEST at once."""
    live, offline = f"r{r}a", f"r{r}b"
    dest = sb.tmp / f"dest-{r}.img"
    _zero_dest(dest, sb.size)
    argvs = {live: _live_restore_argv(sb, live, dest, sb.mnt),
             offline: ["restore", "--repo", str(sb.repo), "--progress", "none", sb.backup_id,
                       str(dest)]}
    order = [live, offline]
    rng.shuffle(order)
    outcomes = _release_together(sb, {s: argvs[s] for s in order}, f"restore-{r}")
    winner, loser = _one_accepted(outcomes)
    err = loser.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("dmrecover: error: "), err
    if winner == live:
        assert live in err, f"the refused restore does not name the session {live}: {err!r}"
        _finish_and_verify(sb, live, dest, sb.mnt)
    else:
        # The restore claimed DEST first: the live-restore is refused because of that claim,
        # or (the restore already done) because DEST now holds a filesystem.
        assert "restore" in err or "filesystem" in err, err
        assert not (sb.state_root / live / "session.json").exists(), \
            "the refused session left a record"
        _verify_restored(dest, sb)
    dest.unlink()
    return f"{'live-restore' if winner == live else 'restore'} accepted, the other refused: {err}"


def _resume_round(sb: Sandbox, r: int, rng: random.Random) -> str:
    """Kill a session's process mid-restore, then two resumes of it at once: one brings it
    back, the other is refused, and the one that runs must not lose its stack to the other's
    clean-up of the dead process's leftovers."""
    name = f"s{r}"
    dest = sb.tmp / f"dest-{r}.img"
    _zero_dest(dest, sb.size)
    slow = {**_env(sb), "DMRECOVER_TEST_RESTORE_DELAY": "0.05"}
    p = subprocess.run([sys.executable, "-m", "dmrecover",
                        *_live_restore_argv(sb, name, dest, sb.mnt)],
                       env=slow, capture_output=True, text=True, timeout=300, cwd="/")
    assert p.returncode == 0, p.stderr
    time.sleep(rng.uniform(0.2, 1.0))
    rec = sb.session(name)
    proc = psutil.Process(rec["pid"])
    assert abs(proc.create_time() - rec["pid_create_time"]) < 0.01  # the session's process
    proc.kill()
    proc.wait(30)
    # Every other round the second one comes a little later: while the first one's new
    # process builds the stack, not at the same instant.
    stagger = 0.0 if r % 2 == 0 else rng.uniform(0.05, 0.8)
    outcomes = _release_together(sb, {f"{name}-1": ["resume", name],
                                      f"{name}-2": ["resume", name]}, f"resume-{r}",
                                 delays={f"{name}-2": stagger})
    accepted = [o for o in outcomes if o.returncode == 0]
    summary = "; ".join(f"{o.session}: rc {o.returncode} {o.stderr.strip()[:300]!r}"
                        for o in outcomes)
    assert len(accepted) == 1, f"{len(accepted)} of 2 resumes accepted: {summary}"
    loser = next(o for o in outcomes if o.returncode != 0)
    err = loser.stderr.strip()
    # First what matters most: the resumed session keeps its stack and loses nothing.
    rec = sb.session(name)
    assert rec["state"] in ("restoring", "ready", "cutting-over", "done"), rec
    assert mount_at(str(sb.mnt)) is not None, f"the mount point lost its mount: {summary}"
    _finish_and_verify(sb, name, dest, sb.mnt)
    assert "Traceback" not in err and len(err.splitlines()) == 1, \
        f"the refused resume did not say why in one line: {err!r}"
    assert f"session {name} failed" not in err, \
        f"the refused resume says the session failed, but it runs: {err!r}"
    dest.unlink()
    return f"one resume accepted, the other ({stagger:.2f} s later) refused: {err}"


def _round(sb: Sandbox, case: str, r: int, rng: random.Random) -> str:
    if case == "restore":
        return _restore_round(sb, r, rng)
    if case == "resume":
        return _resume_round(sb, r, rng)
    a, b = f"{case[5]}{r}a", f"{case[5]}{r}b"  # d3a/d3b (same-dest), m3a/m3b (same-mount)
    if case == "same-dest":
        dest = sb.tmp / f"dest-{r}.img"
        _zero_dest(dest, sb.size)
        dests = {a: dest, b: dest}
        mnts = {a: sb.tmp / "mnt-a", b: sb.tmp / "mnt-b"}
    else:
        dests = {a: sb.tmp / f"dest-{r}a.img", b: sb.tmp / f"dest-{r}b.img"}
        for d in dests.values():
            _zero_dest(d, sb.size)
        mnts = {a: sb.mnt, b: sb.mnt}
    for m in mnts.values():
        m.mkdir(exist_ok=True)
    order = [a, b]
    rng.shuffle(order)  # which one Popen starts first
    outcomes = _release_together(sb, {s: _live_restore_argv(sb, s, dests[s], mnts[s])
                                      for s in order}, f"{case}-{r}")
    winner, loser = _one_accepted(outcomes)
    _check_refusal(sb, loser, winner,
                   dests[loser.session] if case == "same-mount" else None)
    counts = _finish_and_verify(sb, winner, dests[winner], mnts[winner])
    for d in set(dests.values()):
        d.unlink()
    return (f"{winner} accepted ({counts['appended']} acknowledged), {loser.session} refused: "
            f"{loser.stderr.strip()}")


@pytest.mark.parametrize("case", ["same-dest", "same-mount", "restore", "resume"])
def test_two_sessions_at_once_one_accepted(race: Sandbox, case: str) -> None:
    rng = random.Random(f"{SEED}:{case}")
    t0 = time.monotonic()
    done = 0
    try:
        for r in range(ROUNDS):
            if done >= MIN_ROUNDS and time.monotonic() - t0 > CASE_SECONDS:
                break
            try:
                line = _round(race, case, r, rng)
            except AssertionError as err:
                raise AssertionError(f"{case} round {r} (DMR_RACE_SEED={SEED}): {err}") from None
            done += 1
            print(f"{case} round {r}: {line}", flush=True)
    finally:
        race.teardown()
    print(f"{case}: {done} rounds, {time.monotonic() - t0:.0f} s")
