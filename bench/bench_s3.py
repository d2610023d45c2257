"""Backup and restore throughput: local directory vs a real Ceph RGW (started here, memstore),
encrypted (format 2) vs --encryption none; restic's S3 backend on the same RGW for comparison.

    .venv/bin/python bench/bench_s3.py [--size 512M] [--json out.json]
    .venv/bin/python bench/bench_s3.py --live --store bluestore --size 2G

One run each; prints a table and JSON. --live: the live restore's background restore from RGW
(the engine's Fetcher and Restorer, the pool at 1, 4 and 8 fetches, no application reading)
against the offline restore from the same RGW repository (encrypted), as a ratio. Data: half
random, a quarter zeros, a quarter text (so compression and zero-skipping play their real
part). Memstore holds twice the data in RAM: keep --size to a few hundred MiB with it, use
--store bluestore (a sparse file) for GiBs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dmrecover.engine.fetcher import Fetcher  # noqa: E402
from dmrecover.engine.restorer import Restorer  # noqa: E402
from dmrecover.repository.backup import backup  # noqa: E402
from dmrecover.repository.repo import Repository  # noqa: E402
from dmrecover.repository.restore import restore  # noqa: E402
from dmrecover.repository.source import RepositorySource  # noqa: E402
from dmrecover.units import parse_size  # noqa: E402
from tests.helpers.ceph import CephCluster  # noqa: E402

MiB = 1 << 20


def make_image(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        q = size // 4
        for _ in range(2 * q // MiB):
            f.write(os.urandom(MiB))
        f.write(bytes(q))
        line = b"2024-01-01 12:00:00 INFO request served in 12 ms from 10.0.0.1\n"
        f.write((line * (q // len(line) + 1))[:q])
        f.truncate(size)


def run_one(where: str, enc: str, image: Path, tmp: Path) -> dict:
    out = tmp / "out.img"
    kdf = {"kdf": "scrypt", "n": 1 << 14, "r": 8, "p": 1}
    repo = Repository.init(where, encryption=enc, password="bench" if enc != "none" else None,
                           kdf=kdf)
    t = time.monotonic()
    m = backup(image, repo, name="bench", chunk_size=4 * MiB)
    t_backup = time.monotonic() - t
    repo = Repository.open(where, password="bench")
    t = time.monotonic()
    restore(repo, repo.manifest(m.id), out)
    t_restore = time.monotonic() - t
    assert out.stat().st_size == image.stat().st_size
    out.unlink()
    size = image.stat().st_size
    return {"store": "rgw" if where.startswith("s3://") else "local", "encryption": enc,
            "backup_MiBps": size / MiB / t_backup, "restore_MiBps": size / MiB / t_restore}


def run_restic(endpoint: str, image: Path, tmp: Path) -> dict | None:
    if not shutil.which("restic"):
        return None
    env = dict(os.environ, RESTIC_PASSWORD="bench",
               RESTIC_REPOSITORY=f"s3:{endpoint}/restic-bench/{uuid.uuid4().hex[:8]}")
    subprocess.run(["restic", "init"], env=env, check=True, capture_output=True)
    t = time.monotonic()
    subprocess.run(["restic", "backup", "--stdin", "--stdin-filename", "vol.img"],
                   stdin=open(image, "rb"), env=env, check=True, capture_output=True)
    t_backup = time.monotonic() - t
    t = time.monotonic()
    with open(tmp / "restic.out", "wb") as f:
        subprocess.run(["restic", "dump", "latest", "vol.img"], stdout=f, env=env, check=True)
    t_restore = time.monotonic() - t
    (tmp / "restic.out").unlink()
    size = image.stat().st_size
    return {"store": "rgw", "encryption": "restic", "backup_MiBps": size / MiB / t_backup,
            "restore_MiBps": size / MiB / t_restore}


def run_live(image: Path, tmp: Path) -> list[dict]:
    """Offline restore vs the background restore of a live restore, from one RGW repository."""
    url = f"s3://bench/{uuid.uuid4().hex[:8]}-live"
    kdf = {"kdf": "scrypt", "n": 1 << 14, "r": 8, "p": 1}
    repo = Repository.init(url, password="bench", kdf=kdf)
    m = backup(image, repo, name="bench", chunk_size=4 * MiB)
    size = image.stat().st_size
    out = tmp / "out.img"
    t = time.monotonic()
    restore(repo, repo.manifest(m.id), out)
    offline = size / MiB / (time.monotonic() - t)
    rows = [{"mode": "offline restore", "workers": None, "MiBps": offline, "ratio": 1.0}]
    for workers in (1, 4, 8):
        out.unlink(missing_ok=True)
        with open(out, "wb") as f:
            f.truncate(size)
        map_path = tmp / "restored.map"
        map_path.unlink(missing_ok=True)
        fetcher = Fetcher(RepositorySource(repo, m), out, map_path)
        r = Restorer(fetcher, workers=workers)
        t = time.monotonic()
        r.start()
        r.finished.wait()
        elapsed = time.monotonic() - t
        fetcher.close()
        assert r.completed.is_set(), r.error
        rate = size / MiB / elapsed
        rows.append({"mode": "live background restore", "workers": workers, "MiBps": rate,
                     "ratio": rate / offline})
    out.unlink(missing_ok=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="512M")
    ap.add_argument("--json")
    ap.add_argument("--store", choices=("memstore", "bluestore"), default="memstore",
                    help="the OSD's object store (bluestore for sizes of GiBs)")
    ap.add_argument("--live", action="store_true",
                    help="background restore of a live restore vs offline restore only")
    args = ap.parse_args()
    size = parse_size(args.size)
    with tempfile.TemporaryDirectory(dir="/var/tmp") as d:
        tmp = Path(d)
        image = tmp / "src.img"
        make_image(image, size)
        ceph = CephCluster(tmp / "ceph", store=args.store)
        ceph.start()
        if args.live:
            try:
                os.environ.update(ceph.env())
                live = run_live(image, tmp)
            finally:
                ceph.stop()
            print(f"{'restore from RGW (' + args.store + ')':<28} {'workers':>7} "
                  f"{'MiB/s':>7} {'ratio':>6}")
            for r in live:
                print(f"{r['mode']:<28} {r['workers'] or '-':>7} {r['MiBps']:>7.0f} "
                      f"{r['ratio']:>6.2f}")
            result = {"size": size, "store": args.store, "live": live}
            print(json.dumps(result))
            if args.json:
                Path(args.json).write_text(json.dumps(result, indent=2))
            return
        try:
            os.environ.update(ceph.env())
            rows = []
            for enc in ("aes-256-gcm", "none"):
                rows.append(run_one(str(tmp / f"local-{enc}"), enc, image, tmp))
                rows.append(run_one(f"s3://bench/{uuid.uuid4().hex[:8]}-{enc}", enc, image,
                                    tmp))
            restic = run_restic(ceph.endpoint, image, tmp)
            if restic:
                rows.append(restic)
        finally:
            ceph.stop()
    print(f"{'store':<6} {'encryption':<12} {'backup MiB/s':>13} {'restore MiB/s':>14}")
    for r in rows:
        print(f"{r['store']:<6} {r['encryption']:<12} {r['backup_MiBps']:>13.0f} "
              f"{r['restore_MiBps']:>14.0f}")
    result = {"size": size, "rows": rows}
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
