#!/usr/bin/env python3
"""One benchmark report from the JSON of bench_fio.py and bench_scale.py: a Markdown table of
every figure as a ratio to its baseline from the same run, and PNG plots.

    .venv/bin/python bench/report.py --fio fio.json [--fio-buffered fio-buffered.json]
        --scale scale.json --out docs/benchmarks.md --plots docs/benchmarks [--machine TEXT]

Plots (matplotlib, the `bench` extra): throughput over time during each live restore under
load (background restore rate, the application's IOPS, its 4 KiB read latency) and RTO and
peak RSS against volume size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

MiB = 1 << 20


def size_str(n: float) -> str:
    for unit, f in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", MiB)):
        if n >= f:
            return f"{n / f:g} {unit}"
    return f"{n:g} B"


def verdict(ratio: float | None, goal: float | None, higher_is_better: bool = True) -> str:
    if ratio is None or goal is None:
        return ""
    ok = ratio >= goal if higher_is_better else ratio <= goal
    return "met" if ok else "**not met**"


def table(rows: list[tuple[str, str, str, str, str, str]]) -> str:
    head = ("figure", "measured", "baseline (same run)", "ratio", "goal", "")
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


_FIO_NAMES = {
    "randread_4k": "4 KiB random read IOPS (O_DIRECT, depth 16)",
    "randread_4k_qd1": "4 KiB random read IOPS (O_DIRECT, depth 1)",
    "randwrite_4k": "4 KiB random write IOPS (O_DIRECT, depth 16)",
    "write_fsync_4k": "4 KiB buffered write + fsync/32, IOPS",
    "write_fsync_4k_x4": "4 KiB buffered write + fsync/32, 4 jobs, IOPS",
    "seqread_1m": "1 MiB sequential read IOPS (O_DIRECT)",
}


def fio_rows(fio: dict, label: str) -> list[tuple[str, str, str, str, str, str]]:
    rows = []
    for job, e in fio["jobs"].items():
        rows.append((f"{label}: {_FIO_NAMES.get(job, job)}", f"{e['pseudo']['iops']:.0f}",
                     f"{e['base']['iops']:.0f} (DEST direct)", f"{e['ratio']:.2f}x",
                     f">= {e['goal']}x" if e.get("goal") else "",
                     verdict(e["ratio"], e.get("goal"))))
    return rows


def scale_rows(scale: dict) -> list[tuple[str, str, str, str, str, str]]:
    rows = []
    for lv in scale.get("live", []):
        sz = size_str(lv["size"])
        ratio = lv.get("ratio")
        rows.append((f"background restore under load, {sz} ({size_str(lv['data'])} data)",
                     f"{lv['restore_seconds']:.1f} s", f"{lv['offline_seconds']:.1f} s (offline "
                     "restore)", f"{ratio:.2f}x rate" if ratio else "not done",
                     ">= 0.8x", verdict(ratio, 0.8)))
        p99 = lv["stats"].get("demand_latency_p99")
        chunk = lv["chunk_read_seconds"]
        if p99 is not None:
            rows.append((f"on-demand fetch latency p99, {sz}", f"{p99 * 1e3:.1f} ms",
                         f"{chunk * 1e3:.1f} ms (chunk read)", f"{p99 / chunk:.1f}x", "<= 2x",
                         verdict(p99 / chunk, 2.0, higher_is_better=False)))
        load = lv.get("load", {})
        if load:
            rows.append((f"application 4 KiB read latency p99 during the restore, {sz}",
                         f"{load['app_read_p99'] * 1e3:.1f} ms", f"{chunk * 1e3:.1f} ms "
                         "(chunk read)", f"{load['app_read_p99'] / chunk:.1f}x", "", ""))
    for s in scale.get("scale", []):
        sz = size_str(s["size"])
        rows.append((f"RTO (first durable application write), {sz}", f"{s['rto']:.2f} s",
                     "1 s (goal)", f"{s['rto']:.2f}x", "<= 1 s",
                     verdict(s["rto"], 1.0, higher_is_better=False)))
        rss = s["peak_rss"] / MiB
        rows.append((f"peak RSS of the session, {sz}", f"{rss:.0f} MiB", "150 MiB (goal)",
                     f"{rss / 150:.2f}x", "<= 150 MiB", verdict(rss, 150, False)))
    return rows


def plot_live(lv: dict, path: Path) -> None:
    import matplotlib  # deferred: the optional `bench` extra

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    load = lv["load"]
    fig, ax = plt.subplots(3, 1, figsize=(8, 8), sharex=True)
    t = [p["t"] for p in load["restore"]]
    ax[0].plot(t, [p["restore_rate"] / MiB for p in load["restore"]], label="background restore")
    offline = (lv["size"] / lv["offline_seconds"]) / MiB
    ax[0].axhline(offline, color="grey", ls="--", label=f"offline restore ({offline:.0f} MiB/s)")
    ax[0].set_ylabel("MiB/s")
    ax[0].legend(loc="upper right")
    for key, name in (("app_iops", "reads"), ("app_write_iops", "writes (fsync/32)")):
        pts = load.get(key) or []
        ax[1].plot([p[0] for p in pts], [p[1] for p in pts], ".-", label=f"application {name}")
    ax[1].set_ylabel("IOPS")
    ax[1].legend(loc="upper right")
    pts = load.get("app_read_lat") or []
    ax[2].plot([p[0] for p in pts], [p[1] * 1e3 for p in pts], label="4 KiB read, mean per 0.5 s")
    ax[2].axhline(lv["chunk_read_seconds"] * 1e3, color="grey", ls="--",
                  label="repository chunk read")
    ax[2].set_yscale("log")
    ax[2].set_ylabel("latency (ms)")
    ax[2].set_xlabel("seconds since the application started")
    ax[2].legend(loc="upper right")
    fig.suptitle(f"Live restore of {size_str(lv['size'])} ({size_str(lv['data'])} data) under "
                 "an fio load")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_rto(scale: dict, path: Path) -> None:
    import matplotlib  # deferred: the optional `bench` extra

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = sorted(scale["scale"], key=lambda s: s["size"])
    fig, ax = plt.subplots(figsize=(7, 4))
    x = [s["size"] / (1 << 30) for s in pts]
    ax.plot(x, [s["rto"] for s in pts], "o-", label="RTO (s)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("volume size (GiB)")
    ax.set_ylabel("RTO: first durable write (s)")
    ax2 = ax.twinx()
    ax2.plot(x, [s["peak_rss"] / MiB for s in pts], "s--", color="tab:orange",
             label="peak RSS (MiB)")
    ax2.set_ylabel("peak RSS (MiB)")
    ax.set_ylim(bottom=0)
    ax2.set_ylim(bottom=0)
    fig.legend(loc="upper left", bbox_to_anchor=(0.12, 0.88))
    ax.set_title("RTO and session memory against volume size")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fio", required=True)
    ap.add_argument("--fio-buffered")
    ap.add_argument("--scale", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--plots", required=True)
    ap.add_argument("--machine", default=f"{platform.node()}, {os.cpu_count()} cores, "
                    f"kernel {platform.release()}")
    ap.add_argument("--note", help="a paragraph put above the table")
    args = ap.parse_args(argv)
    fio = json.loads(Path(args.fio).read_text())
    scale = json.loads(Path(args.scale).read_text())
    plots = Path(args.plots)
    plots.mkdir(parents=True, exist_ok=True)
    rows = fio_rows(fio, "restored data")
    if args.fio_buffered:
        rows += fio_rows(json.loads(Path(args.fio_buffered).read_text()),
                         "restored data, buffered loop (before)")
    rows += scale_rows(scale)
    images = []
    for lv in scale.get("live", []):
        if lv.get("load"):
            name = f"live-restore-{size_str(lv['size']).replace(' ', '')}.png"
            plot_live(lv, plots / name)
            images.append((f"Live restore of {size_str(lv['size'])} under load", name))
    if scale.get("scale"):
        plot_rto(scale, plots / "rto-by-size.png")
        images.append(("RTO and peak RSS against volume size", "rto-by-size.png"))
    rel = os.path.relpath(plots, Path(args.out).parent)
    md = ["# Benchmarks", "", "Written by `scripts/bench.sh` (bench/report.py); every ratio is "
          "against a baseline measured in the same run.", ""]
    if args.note:
        md += [args.note, ""]
    md += [f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {args.machine}.", "",
          table(rows), ""]
    if fio.get("breakdown"):
        md += ["Queue-depth-1 4 KiB read of cached data, stage by stage (mean µs per "
               "request; see docs/architecture.md, Performance):", "",
               "| stage | µs/request |", "|---|---|"]
        md += [f"| {k} | {v:.1f} |" for k, v in fio["breakdown"].items()]
        md.append("")
    for title, name in images:
        md += [f"![{title}]({rel}/{name})", ""]
    md += ["The dm backends (dm-snapshot, dm-clone) are measured in the kernel suite's VM: "
           "[benchmarks-dm.md](benchmarks-dm.md).", ""]
    Path(args.out).write_text("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
