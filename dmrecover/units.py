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


def format_rate(bytes_per_second: float | None) -> str:
    """A throughput in IEC units, as every display shows it: 5242880 -> '5.0 MiB/s'."""
    return f"{format_size(bytes_per_second or 0)}/s"


def plural(n: int, word: str, many: str | None = None) -> str:
    """'1 fetch', '2 fetches', '0 retries' (many: the plural, default word + 's')."""
    return f"{n} {word if n == 1 else (many or word + 's')}"


# filesystem names said with a vowel sound ("an xfs", "an ntfs") besides those starting with one
_AN = ("xfs", "ntfs", "f2fs", "hfs", "hfsplus")


def article(word: str) -> str:
    """'an ext4', 'an xfs', 'a btrfs': the indefinite article and the word."""
    an = word[:1].lower() in "aeiou" or word.lower() in _AN
    return f"{'an' if an else 'a'} {word}"
