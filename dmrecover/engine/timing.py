"""Where on-demand fetches spend their time, stage by stage (Fetcher.demand_breakdown):
one `Stages` record per on-demand ensure(), summarised by `breakdown`."""

from __future__ import annotations


class Stages:
    """Where one on-demand ensure() spent its time (seconds; see Fetcher.demand_breakdown)."""

    __slots__ = ("lock", "read", "read_cpu", "shared", "total", "wait", "write")

    def __init__(self) -> None:
        self.total = self.lock = self.wait = self.read = self.read_cpu = self.write = 0.0
        self.shared: str | None = None  # whose fetch in flight it waited for, if any


def breakdown(samples: list[Stages]) -> dict:
    """Per kind ("own": fetched in the reading thread; "shared_background" /
    "shared_demand": waited for a fetch of the same chunk already in flight) the count and,
    per stage (total; lock: waiting for the fetcher's lock; wait: for the other fetch;
    read: the source's read_chunk, wall time; read_cpu: the thread's CPU time in it; write:
    to DEST, when the reader wrote), mean, p50 and p99 in seconds; "slowest": the stages of
    the ten slowest; "totals": every total, ascending (to pool the samples of several runs)."""
    out: dict = {}
    kinds = {"own": [s for s in samples if s.shared is None],
             "shared_background": [s for s in samples if s.shared == "background"],
             "shared_demand": [s for s in samples if s.shared == "demand"]}
    for kind, group in kinds.items():
        entry: dict = {"count": len(group)}
        if group:
            for name in ("total", "lock", "wait", "read", "read_cpu", "write"):
                vals = sorted(getattr(s, name) for s in group)
                entry[name] = {"mean": sum(vals) / len(vals),
                               "p50": percentile(vals, 0.50),
                               "p99": percentile(vals, 0.99)}
        out[kind] = entry
    slow = sorted(samples, key=lambda s: s.total, reverse=True)[:10]
    out["slowest"] = [{k: getattr(s, k) for k in Stages.__slots__} for s in slow]
    out["totals"] = sorted(s.total for s in samples)
    return out


def percentile(sorted_values: list[float], q: float) -> float | None:
    """The q-quantile (0..1) of sorted values; None for none."""
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]
