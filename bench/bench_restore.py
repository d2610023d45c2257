#!/usr/bin/env python3
"""Benchmark: dmrecover backup/restore against restic and dd on one real ext4 image.

    sudo .venv/bin/python bench/bench_restore.py [--size 1G] [--chunk-size 4M] [--json FILE]

Builds an image of --size holding an ext4 filesystem filled with mixed data (about half
incompressible random files, half text-like files, the rest free space), then in one run times:

- `dd` copy of the raw image (the disk's limit; conv=fsync),
- `dmrecover backup` and `dmrecover restore` (to a new file; the restore fsyncs),
- `restic backup --stdin` and `restic restore` (Debian's restic; the restored file is fsynced),

dropping the page cache before each timed step so every read comes from the disk. Every
restored copy is compared with the image. Prints a table with throughput, repository sizes and
the goals (dmrecover restore >= 1.5x restic's and >= 0.7x dd's throughput).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dmrecover.demo.volume import build_sample_volume, file_digest  # noqa: E402
from dmrecover.system import command  # noqa: E402
from dmrecover.units import format_size, parse_size  # noqa: E402

GOAL_VS_RESTIC = 1.5
GOAL_VS_DD = 0.7


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def du(path: Path) -> int:
    """Bytes allocated under path."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_blocks * 512
            except OSError:
                pass
    return total


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class TextGen:
    """Text-like data (Zipf-distributed pseudo-words, ~3x compressible with zstd)."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        letters = "etaoinshrdlcumwfgypbvkjxqz"
        self.vocab = ["".join(self.rng.choices(letters, weights=range(26, 0, -1),
                                               k=self.rng.randint(2, 10)))
                      for _ in range(20000)]
        self.cum = list(itertools.accumulate(1 / (i + 1) for i in range(len(self.vocab))))

    def block(self) -> bytes:
        words = self.rng.choices(self.vocab, cum_weights=self.cum, k=100000)
        for i in range(0, len(words), 12):
            words[i] = "\n" + words[i]
        return " ".join(words).encode()


def fill(mnt: Path, seed: int) -> None:
    """About 45% of the free space in random files and 45% in text files (1-32 MiB each)."""
    rng = random.Random(seed)
    text = TextGen(seed)
    st = os.statvfs(mnt)
    budget = int(st.f_bavail * st.f_frsize * 0.45)
    for kind in ("random", "text"):
        d = mnt / kind
        d.mkdir()
        left = budget
        n = 0
        while left > 0:
            want = min(left, rng.randint(1, 32) << 20)
            with open(d / f"f{n:04d}", "wb") as f:
                written = 0
                while written < want:
                    block = os.urandom(4 << 20) if kind == "random" else text.block()
                    block = block[: want - written]
                    f.write(block)
                    written += len(block)
            left -= want
            n += 1


def make_image(path: Path, size: int, seed: int) -> None:
    build_sample_volume(path, size, lambda mnt: fill(mnt, seed), label="bench")


def timed(fn) -> float:
    drop_caches()
    t = time.monotonic()
    fn()
    return time.monotonic() - t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=parse_size, default=1 << 30, help="image size (default 1G)")
    ap.add_argument("--chunk-size", default="4M", help="dmrecover chunk size (default 4M)")
    ap.add_argument("--encryption", default="aes-256-gcm", choices=["aes-256-gcm", "none"],
                    help="dmrecover repository encryption (default aes-256-gcm, like restic's "
                         "always-on encryption; none compares with format 1)")
    ap.add_argument("--workdir", help="directory for image, repositories and copies "
                    "(default: a new one in /var/tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=1,
                    help="run every timed step N times and report the median (default 1)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_restore: needs root (loop mount, drop_caches)", file=sys.stderr)
        return 4
    work = Path(args.workdir or tempfile.mkdtemp(prefix="dmrecover-bench.", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    env = {"RESTIC_PASSWORD": "bench", "RESTIC_CACHE_DIR": str(work / "restic-cache")}
    res: dict = {"size": args.size, "chunk_size": args.chunk_size, "workdir": str(work),
                 "repeat": args.repeat}
    try:
        image = work / "volume.img"
        t = time.monotonic()
        make_image(image, args.size, args.seed)
        print(f"image: {format_size(args.size)} ext4, filled in {time.monotonic() - t:.1f}s",
              file=sys.stderr)
        want = file_digest(image)
        size = args.size

        rep = args.repeat

        def best_of(name: str, prepare, fn, after=None) -> None:
            """Run prepare (untimed), fn (timed, cold cache), after (untimed) `rep` times;
            keep the median and every run."""
            runs = []
            for _ in range(rep):
                if prepare:
                    prepare()
                runs.append(timed(fn))
                if after:
                    after()
            res[f"{name}_runs"] = [round(x, 3) for x in runs]
            res[f"{name}_s"] = statistics.median(runs)

        # dd: the disk's limit for a plain copy
        dd_out = work / "dd.img"
        best_of("dd", None, lambda: command.run(
            ["dd", f"if={image}", f"of={dd_out}", "bs=4M", "conv=fsync", "status=none"],
            timeout=None), dd_out.unlink)

        # dmrecover: each backup into a fresh repository (no dedup against an earlier run)
        repo = work / "dmrepo"
        out: dict = {}
        dm_env = {"DMRECOVER_PASSWORD": "bench"}  # read only by an encrypted repository

        def dm_init() -> None:
            shutil.rmtree(repo, ignore_errors=True)
            command.run([py, "-m", "dmrecover", "repo", "init", str(repo),
                         "--encryption", args.encryption], env=dm_env)

        def dm_backup() -> None:
            out["id"] = command.run(
                [py, "-m", "dmrecover", "backup", str(image), "--repo", str(repo),
                 "--chunk-size", args.chunk_size, "--progress", "none"],
                timeout=None, env=dm_env).stdout.strip()

        best_of("dmrecover_backup", dm_init, dm_backup)
        res["dmrecover_repo_bytes"] = du(repo)
        dm_out = work / "dmrecover-restored.img"

        def dm_check() -> None:
            res.setdefault("dmrecover_identical", True)
            res["dmrecover_identical"] &= file_digest(dm_out) == want
            dm_out.unlink()

        best_of("dmrecover_restore", None, lambda: command.run(
            [py, "-m", "dmrecover", "restore", "--repo", str(repo), out["id"], str(dm_out),
             "--progress", "none"], timeout=None, env=dm_env), dm_check)

        # restic
        rrepo = work / "resticrepo"

        def restic_init() -> None:
            shutil.rmtree(rrepo, ignore_errors=True)
            command.run(["restic", "init", "--repo", str(rrepo)], env=env)

        def restic_backup() -> None:
            with open(image, "rb") as f:
                command.run(["restic", "backup", "--repo", str(rrepo), "--stdin",
                             "--stdin-filename", "volume.img", "--quiet"],
                            stdin=f.fileno(), env=env, timeout=None)

        best_of("restic_backup", restic_init, restic_backup)
        res["restic_repo_bytes"] = du(rrepo)
        target = work / "restic-target"

        def restic_restore() -> None:
            command.run(["restic", "restore", "latest", "--repo", str(rrepo), "--target",
                         str(target)], env=env, timeout=None)
            fsync_file(target / "volume.img")

        def restic_check() -> None:
            res.setdefault("restic_identical", True)
            res["restic_identical"] &= file_digest(target / "volume.img") == want
            shutil.rmtree(target)

        best_of("restic_restore", None, restic_restore, restic_check)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    def rate(seconds: float) -> float:
        return size / seconds

    res["dd_Bps"] = rate(res["dd_s"])
    for tool in ("dmrecover", "restic"):
        res[f"{tool}_backup_Bps"] = rate(res[f"{tool}_backup_s"])
        res[f"{tool}_restore_Bps"] = rate(res[f"{tool}_restore_s"])
    res["restore_vs_restic"] = res["dmrecover_restore_Bps"] / res["restic_restore_Bps"]
    res["restore_vs_dd"] = res["dmrecover_restore_Bps"] / res["dd_Bps"]
    res["backup_vs_restic"] = res["dmrecover_backup_Bps"] / res["restic_backup_Bps"]
    res["goal_vs_restic"] = res["restore_vs_restic"] >= GOAL_VS_RESTIC
    res["goal_vs_dd"] = res["restore_vs_dd"] >= GOAL_VS_DD

    def row(what: str, seconds: float, extra: str = "") -> str:
        return (f"| {what:<22} | {seconds:8.2f} | {format_size(rate(seconds)) + '/s':>12} "
                f"| {extra:<28} |")

    lines = [
        f"image {format_size(size)} ext4 (free space: 45% random, 45% text-like), "
        f"dmrecover chunk {args.chunk_size}, page cache dropped before each step, "
        f"median of {args.repeat} run(s)",
        "",
        f"| {'step':<22} | {'seconds':>8} | {'throughput':>12} | {'notes':<28} |",
        f"|{'-' * 24}|{'-' * 10}|{'-' * 14}|{'-' * 30}|",
        row("dd copy (conv=fsync)", res["dd_s"]),
        row("dmrecover backup", res["dmrecover_backup_s"],
            f"repo {format_size(res['dmrecover_repo_bytes'])}"),
        row("restic backup --stdin", res["restic_backup_s"],
            f"repo {format_size(res['restic_repo_bytes'])}"),
        row("dmrecover restore", res["dmrecover_restore_s"],
            "identical" if res["dmrecover_identical"] else "DIFFERS"),
        row("restic restore", res["restic_restore_s"],
            "identical" if res["restic_identical"] else "DIFFERS"),
        "",
        f"restore dmrecover/restic: {res['restore_vs_restic']:.2f}x "
        f"(goal >= {GOAL_VS_RESTIC}x: {'PASS' if res['goal_vs_restic'] else 'FAIL'})",
        f"restore dmrecover/dd:     {res['restore_vs_dd']:.2f}x "
        f"(goal >= {GOAL_VS_DD}x: {'PASS' if res['goal_vs_dd'] else 'FAIL'})",
        f"backup dmrecover/restic:  {res['backup_vs_restic']:.2f}x; repository size "
        f"dmrecover/restic: {res['dmrecover_repo_bytes'] / res['restic_repo_bytes']:.2f}",
    ]
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    ok = res["dmrecover_identical"] and res["restic_identical"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
