"""Sizes: parse "4M", "64KiB", "1g"; format bytes for people."""

from __future__ import annotations

import math

from dmrecover.errors import UsageError

_SUFFIXES = {
    "": 1, "b": 1,
    "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10,
    "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
    "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30,
    "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40,
}

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40


def parse_size(text: str) -> int:
    """Parse a size with an optional binary suffix (K, M, G, T; KiB etc.); UsageError for
    anything else, including inf, nan and negative numbers."""
    s = text.strip().lower()
    num = s.rstrip("kmgtib")
    suffix = s[len(num):]
    try:
        value = float(num)
    except ValueError:
        value = -1.0
    # "inf" and "nan" parse as floats; a finite value times a suffix may still overflow.
    if suffix not in _SUFFIXES or not value >= 0 or not math.isfinite(value * _SUFFIXES[suffix]):
        raise UsageError(f"bad size {text!r}", hint="use a number with K, M, G or T, e.g. 4M")
    return int(value * _SUFFIXES[suffix])


def format_size(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
