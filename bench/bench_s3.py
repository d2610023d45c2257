"""Backup and restore throughput: local directory vs a real Ceph RGW (started here, memstore),
encrypted (format 2) vs --encryption none; restic's S3 backend on the same RGW for comparison.

    .venv/bin/python bench/bench_s3.py [--size 512M] [--json out.json]
    .venv/bin/python bench/bench_s3.py --live --store bluestore --size 2G
    .venv/bin/python bench/bench_s3.py --rto --store bluestore [--rto-size 8G]
    .venv/bin/python bench/bench_s3.py --all --store bluestore --size 2G --json s3.json

One run each; prints Markdown tables (with the ratios: encryption cost, dmrecover vs restic,
background vs offline restore) and JSON. --rto: the live-restore RTO from RGW (bench_live's
session driver and sample volume: time from the `dmrecover live-restore` command to the
sample application's first answered query) at --rto-size. --all: everything, one cluster.
--live: the live restore's background restore from RGW
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
from dmrecover.repository.restore import default_workers, restore  # noqa: E402
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
    os.sync()  # nobody's dirty pages (the image, the last run's files) charged to this run
    t = time.monotonic()
    m = backup(image, repo, name="bench", chunk_size=4 * MiB)
    t_backup = time.monotonic() - t
    repo = Repository.open(where, password="bench")
    os.sync()
    t = time.monotonic()
    restore(repo, repo.manifest(m.id), out)
    t_restore = time.monotonic() - t
    assert out.stat().st_size == image.stat().st_size
    out.unlink()
    size = image.stat().st_size
    row = {"store": "rgw" if where.startswith("s3://") else "local", "encryption": enc,
           "backup_MiBps": size / MiB / t_backup, "restore_MiBps": size / MiB / t_restore,
           "restore_workers": default_workers()}
    if where.startswith("s3://"):
        # Over the network a GET's latency, not the CPU, bounds a worker: the same restore
        # with as many fetches in flight as restic's restore and the live restore's pool.
        os.sync()
        t = time.monotonic()
        restore(repo, repo.manifest(m.id), out, workers=8)
        row["restore_8_workers_MiBps"] = size / MiB / (time.monotonic() - t)
        out.unlink()
    return row


def run_restic(endpoint: str, image: Path, tmp: Path) -> dict | None:
    """restic 0.14's S3 backend on the same RGW: `backup --stdin`, then both ways restic gets
    the volume back (`dump` to a file, `restore --target`); the faster counts."""
    if not shutil.which("restic"):
        return None
    env = dict(os.environ, RESTIC_PASSWORD="bench",
               RESTIC_REPOSITORY=f"s3:{endpoint}/restic-bench/{uuid.uuid4().hex[:8]}")
    subprocess.run(["restic", "init"], env=env, check=True, capture_output=True)
    os.sync()
    t = time.monotonic()
    with open(image, "rb") as f:
        subprocess.run(["restic", "backup", "--stdin", "--stdin-filename", "vol.img"],
                       stdin=f, env=env, check=True, capture_output=True)
    t_backup = time.monotonic() - t
    os.sync()
    t = time.monotonic()
    with open(tmp / "restic.out", "wb") as f:
        subprocess.run(["restic", "dump", "latest", "vol.img"], stdout=f, env=env, check=True)
        os.fsync(f.fileno())
    t_dump = time.monotonic() - t
    (tmp / "restic.out").unlink()
    target = tmp / "restic-target"
    os.sync()
    t = time.monotonic()
    subprocess.run(["restic", "restore", "latest", "--target", str(target)], env=env,
                   check=True, capture_output=True)
    subprocess.run(["sync", "-f", str(target / "vol.img")], check=True)
    t_restore = time.monotonic() - t
    assert (target / "vol.img").stat().st_size == image.stat().st_size
    shutil.rmtree(target)
    size = image.stat().st_size
    return {"store": "rgw", "encryption": "restic", "backup_MiBps": size / MiB / t_backup,
            "restore_MiBps": size / MiB / min(t_dump, t_restore),
            "restic_dump_MiBps": size / MiB / t_dump,
            "restic_restore_MiBps": size / MiB / t_restore}


def run_live(image: Path, tmp: Path) -> list[dict]:
    """Offline restore vs the background restore of a live restore, from one RGW repository."""
    url = f"s3://bench/{uuid.uuid4().hex[:8]}-live"
    kdf = {"kdf": "scrypt", "n": 1 << 14, "r": 8, "p": 1}
    repo = Repository.init(url, password="bench", kdf=kdf)
    m = backup(image, repo, name="bench", chunk_size=4 * MiB)
    size = image.stat().st_size
    out = tmp / "out.img"
    os.sync()
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
        os.sync()
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


def _rto_once(work: Path, repo: str, backup_id: str, size: int, tag: str) -> dict:
    from bench_live import Live  # bench/ is sys.path[0] when run as a script

    live = Live(work, repo, backup_id, size, tag)  # type: ignore[arg-type]  # a URL is fine
    try:
        wall0 = time.time()
        t = live.start()
        timings = live.session()["timings"]
    finally:
        live.teardown()
    # Where the time goes, from the session's timings (wall clock, relative to the command's
    # start here): the CLI's interpreter start and imports, the repository opened (S3
    # client, the KDF, the manifest) and the checks, the session recorded and forked, the
    # engine opened, the stack built (FUSE, loop, mount), the application spawned and its
    # start grace; then the command's return and the first answered query.
    row = {"command_returned_s": t["command_returned"], "first_query_s": t["first_query"],
           "to_session_record_s": timings["command_started"] - wall0,
           "to_app_started_s": timings["app_started"] - wall0}
    at = dict(timings, command=wall0)
    row["stages"] = {name: at[b] - at[a] if a in at and b in at else None
                     for name, a, b in STAGES}
    return row


# (stage, from timing, to timing): the breakdown of _rto_once, in order.
STAGES = (("CLI start, imports, backend choice, KDF, repository and manifest opened",
           "command", "repository_opened"),
          ("checks, state dir, DEST preallocated, key cache, record",
           "repository_opened", "command_started"),
          ("session process forked", "command_started", "session_process"),
          ("engine opened (pseudo-volume)", "session_process", "volume_opened"),
          ("stack built (FUSE, loop, mount)", "volume_opened", "stack_built"),
          ("application spawned (cgroup)", "stack_built", "app_spawned"),
          ("application start grace", "app_spawned", "app_started"))


def run_rto(tmp: Path, size: int, data_fraction: float) -> dict:
    """Live-restore RTO from RGW: a sparse `size` ext4 volume with the sample application's
    database and `data_fraction` of it in random data, backed up (4 MiB chunks) into an
    encrypted repository on RGW with the default KDF; then the time from the `dmrecover
    live-restore` command (password from DMRECOVER_PASSWORD) to the application's first
    answered query, through bench_live's session driver. The same from an encrypted local
    repository as the reference: what S3 adds."""
    from bench_live import build_image  # bench/ is sys.path[0] when run as a script

    work = tmp / "rto"
    work.mkdir()
    img = build_image(work, size, data_fraction)
    url = f"s3://bench/{uuid.uuid4().hex[:8]}-rto"
    result: dict = {"size": size}
    os.environ["DMRECOVER_PASSWORD"] = "bench"
    try:
        for where, tag in ((url, "rgw"), (str(work / "local-repo"), "local")):
            repo = Repository.init(where, password="bench")  # the default scrypt parameters
            m = backup(img, repo, name="rto", chunk_size=4 * MiB)
            result["stored_MiB"] = 4 * sum(1 for d in m.chunks if d is not None)
            os.sync()
            result[tag] = _rto_once(work, where, m.id, size, tag)
    finally:
        os.environ.pop("DMRECOVER_PASSWORD", None)
    return result


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def _throughput_row(r: dict) -> str:
    workers = f" ({r['restore_workers']} workers)" if "restore_workers" in r else ""
    eight = r.get("restore_8_workers_MiBps")
    return (f"| {r['store']} | {r['encryption']} | {r['backup_MiBps']:.0f} | "
            f"{r['restore_MiBps']:.0f}{workers} | {f'{eight:.0f}' if eight else '-'} |")


def markdown(result: dict) -> str:
    """The report: one Markdown table per part that ran, with the ratios the issue asks for."""
    image = f"image {result['size'] / MiB:.0f} MiB, " if "rows" in result or "live" in result \
        else ""
    out = [f"Ceph OSD {result['store']}, {image}one run each (load average at start "
           f"{result['load']:.1f} on {os.cpu_count()} cores: a shared machine)."]
    rows = result.get("rows")
    if rows:
        out += ["", "| store | encryption | backup MiB/s | restore MiB/s | restore, 8 workers |",
                "|---|---|---:|---:|---:|"]
        out += [_throughput_row(r) for r in rows]
        by = {(r["store"], r["encryption"]): r for r in rows}
        enc, plain = by.get(("local", "aes-256-gcm")), by.get(("local", "none"))
        rgw, restic = by.get(("rgw", "aes-256-gcm")), by.get(("rgw", "restic"))
        out.append("")
        if enc and plain:
            out.append(f"- encryption cost (local, format 2 / none): backup "
                       f"{_ratio(enc['backup_MiBps'], plain['backup_MiBps'])}, restore "
                       f"{_ratio(enc['restore_MiBps'], plain['restore_MiBps'])}")
        if rgw and restic:
            out.append(f"- dmrecover (encrypted) / restic on the same RGW: backup "
                       f"{_ratio(rgw['backup_MiBps'], restic['backup_MiBps'])}, restore "
                       f"{_ratio(rgw['restore_MiBps'], restic['restore_MiBps'])}, with 8 "
                       f"workers "
                       f"{_ratio(rgw.get('restore_8_workers_MiBps'), restic['restore_MiBps'])}"
                       f" (goal >= 1.5x; "
                       f"restic's faster of dump {restic['restic_dump_MiBps']:.0f} and restore "
                       f"{restic['restic_restore_MiBps']:.0f} MiB/s)")
    live = result.get("live")
    if live:
        out += ["", "| restore from RGW (encrypted) | fetch workers | MiB/s | vs offline |",
                "|---|---:|---:|---:|"]
        out += [f"| {r['mode']} | {r['workers'] or '-'} | {r['MiBps']:.0f} | "
                f"{r['ratio']:.2f}x |" for r in live]
    rto = result.get("rto")
    if rto:
        out += ["", f"| live-restore RTO, {rto['size'] / (1 << 30):.0f} GiB volume "
                f"({rto['stored_MiB']} MiB stored), encrypted | repository open, session "
                "recorded | app started | command returned | first answered query |",
                "|---|---:|---:|---:|---:|"]
        for tag, label in (("rgw", "from RGW (goal <= 2 s)"),
                           ("local", "from a local repository (reference)")):
            r = rto[tag]
            out.append(f"| {label} | {r['to_session_record_s']:.2f} s | "
                       f"{r['to_app_started_s']:.2f} s | {r['command_returned_s']:.2f} s | "
                       f"{r['first_query_s']:.2f} s |")
        out += ["", "| stage (s) | from RGW | local |", "|---|---:|---:|"]
        for name in [st[0] for st in STAGES]:
            cells = [rto[tag].get("stages", {}).get(name) for tag in ("rgw", "local")]
            out.append(f"| {name} | " + " | ".join(
                f"{c:.3f}" if c is not None else "-" for c in cells) + " |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="512M")
    ap.add_argument("--json")
    ap.add_argument("--store", choices=("memstore", "bluestore"), default="memstore",
                    help="the OSD's object store (bluestore for sizes of GiBs)")
    ap.add_argument("--live", action="store_true",
                    help="background restore of a live restore vs offline restore only")
    ap.add_argument("--rto", action="store_true", help="the live-restore RTO from RGW only")
    ap.add_argument("--all", action="store_true",
                    help="throughput (with restic and the encryption cost), --live and --rto")
    ap.add_argument("--rto-size", default="8G", help="the RTO volume's size")
    ap.add_argument("--rto-data", type=float, default=0.04,
                    help="the fraction of the RTO volume holding data")
    args = ap.parse_args()
    size = parse_size(args.size)
    throughput = args.all or not (args.live or args.rto)
    result: dict = {"size": size, "store": args.store, "load": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(dir="/var/tmp") as d:
        tmp = Path(d)
        image = tmp / "src.img"
        if throughput or args.live:
            make_image(image, size)
        ceph = CephCluster(tmp / "ceph", store=args.store)
        try:
            ceph.start()
            os.environ.update(ceph.env())
            if throughput:
                rows = []
                for enc in ("aes-256-gcm", "none"):
                    rows.append(run_one(str(tmp / f"local-{enc}"), enc, image, tmp))
                    rows.append(run_one(f"s3://bench/{uuid.uuid4().hex[:8]}-{enc}", enc,
                                        image, tmp))
                restic = run_restic(ceph.endpoint, image, tmp)
                if restic:
                    rows.append(restic)
                result["rows"] = rows
            if args.live or args.all:
                result["live"] = run_live(image, tmp)
            image.unlink(missing_ok=True)
            if args.rto or args.all:
                result["rto"] = run_rto(tmp, parse_size(args.rto_size), args.rto_data)
        finally:
            ceph.stop()
    print(markdown(result))
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
