"""Sizes: parsing and formatting."""

from __future__ import annotations

import pytest

from dmrecover.errors import UsageError
from dmrecover.units import GiB, KiB, MiB, format_size, parse_size


@pytest.mark.parametrize("text,value", [
    ("0", 0), ("512", 512), ("64K", 64 * KiB), ("64k", 64 * KiB), ("64KiB", 64 * KiB),
    ("4M", 4 * MiB), ("4mb", 4 * MiB), (" 16MiB ", 16 * MiB), ("1G", GiB), ("1.5G", 3 * GiB // 2),
    ("2T", 2 << 40), ("100b", 100),
])
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "M", "4X", "four", "-1M", "4MM", "1.2.3K", "inf", "nan",
                                  "-inf", "1e999", "1e308T", "infK"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(UsageError, match="bad size"):
        parse_size(text)


@pytest.mark.parametrize("value,text", [
    (0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"), (4 * MiB, "4.0 MiB"), (GiB, "1.0 GiB"),
    (5 << 40, "5.0 TiB"), (5 << 50, "5120.0 TiB"),
])
def test_format_size(value: int, text: str) -> None:
    assert format_size(value) == text


def test_roundtrip() -> None:
    for n in (KiB, 3 * MiB, 7 * GiB):
        assert parse_size(format_size(n).replace(" ", "").replace("i", "")) == n

