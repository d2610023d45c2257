"""Bitmap: bit and range ops against a set model, iteration, persistence and its checks."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dmrecover.engine.bitmap import Bitmap
from dmrecover.errors import BitmapError


def _model_runs(bits: set[int], start: int, end: int) -> list[tuple[int, int, bool]]:
    out: list[tuple[int, int, bool]] = []
    for i in range(start, end):
        v = i in bits
        if out and out[-1][2] == v:
            out[-1] = (out[-1][0], out[-1][1] + 1, v)
        else:
            out.append((i, 1, v))
    return out


ops = st.lists(st.tuples(st.sampled_from(["set", "clear", "set_range", "clear_range"]),
                         st.integers(0, 299), st.integers(0, 150)), max_size=40)


@settings(max_examples=200, deadline=None)
@given(nbits=st.integers(1, 300), ops=ops, q=st.tuples(st.integers(0, 299), st.integers(0, 300)))
def test_bitmap_matches_a_set(nbits: int, ops: list, q: tuple[int, int]) -> None:
    bm = Bitmap(nbits)
    model: set[int] = set()
    for op, a, n in ops:
        a %= nbits
        n = min(n, nbits - a)
        if op == "set":
            bm.set(a)
            model.add(a)
        elif op == "clear":
            bm.clear(a)
            model.discard(a)
        elif op == "set_range":
            bm.set_range(a, n)
            model.update(range(a, a + n))
        else:
            bm.clear_range(a, n)
            model.difference_update(range(a, a + n))
    assert bm.count() == len(model)
    assert list(bm.iter_set()) == sorted(model)
    assert list(bm.iter_clear()) == [i for i in range(nbits) if i not in model]
    assert all(bm.test(i) == (i in model) for i in range(nbits))
    start, count = q
    start %= nbits
    end = min(start + count, nbits)
    want = {i for i in model if start <= i < end}
    assert bm.any_in(start, count) == bool(want)
    assert bm.count_range(start, count) == len(want)
    assert bm.runs(start, count) == _model_runs(model, start, end)
    ext = [(f, c) for f, c, v in _model_runs(model, 0, nbits) if v]
    assert list(bm.iter_extents()) == ext


def test_iteration_skips_large_empty_regions_and_starts_anywhere() -> None:
    bm = Bitmap(1 << 22)  # 512 KiB of bits: several scan windows
    for i in (5, 70_000, 600_001, (1 << 22) - 1):
        bm.set(i)
    assert list(bm.iter_set()) == [5, 70_000, 600_001, (1 << 22) - 1]
    assert list(bm.iter_set(70_001)) == [600_001, (1 << 22) - 1]
    bm.set_range(0, 1 << 22)
    bm.clear(3_000_000)
    assert list(bm.iter_clear()) == [3_000_000]
    assert bm.count() == (1 << 22) - 1


def test_out_of_range_is_an_error() -> None:
    bm = Bitmap(10)
    with pytest.raises(IndexError):
        bm.set(10)
    with pytest.raises(IndexError):
        bm.set_range(5, 6)


def test_save_load_round_trip(tmp_path) -> None:
    bm = Bitmap(1001)
    bm.set_range(17, 300)
    bm.set(1000)
    p = tmp_path / "m"
    bm.save(p)
    assert Bitmap.load(p) == bm
    assert not (tmp_path / "m.tmp").exists()
    bm.clear(1000)
    bm.save(p)  # replaces atomically
    assert Bitmap.load(p) == bm


@pytest.mark.parametrize("damage", ["flip", "truncate", "magic", "empty"])
def test_load_rejects_damaged_files(tmp_path, damage: str) -> None:
    bm = Bitmap(4000)
    bm.set_range(100, 200)
    p = tmp_path / "m"
    bm.save(p)
    raw = bytearray(p.read_bytes())
    if damage == "flip":
        raw[-100] ^= 0x10
    elif damage == "truncate":
        raw = raw[:-1]
    elif damage == "magic":
        raw[0] ^= 0xFF
    else:
        raw = bytearray()
    p.write_bytes(raw)
    with pytest.raises(BitmapError):
        Bitmap.load(p)


def test_load_missing_file_is_a_bitmap_error(tmp_path) -> None:
    with pytest.raises(BitmapError):
        Bitmap.load(tmp_path / "nope")


def test_slot_file_saves_in_place_and_survives_a_torn_slot(tmp_path) -> None:
    from dmrecover.engine.bitmap import SlotFile

    p = tmp_path / "m"
    sf = SlotFile(p, 1000)
    sf.create()
    size = p.stat().st_size
    blocks = p.stat().st_blocks
    assert blocks * 512 >= size, "allocated in full at creation"
    a, b = Bitmap(1000), Bitmap(1000)
    a.set_range(0, 10)
    b.set_range(0, 20)
    sf.save(a)
    sf.save(b)
    assert p.stat().st_size == size and p.stat().st_blocks == blocks, "no new space"
    assert Bitmap.load(p) == b and SlotFile(p, 1000).load() == b
    # A crash while writing a save tears the slot it writes: the previous save stays.
    with open(p, "r+b") as f:
        f.seek(sf.generation % 2 * sf.slot_size + 40)
        f.write(b"\xff" * 8)
    assert SlotFile(p, 1000).load() == a
    sf.close()
    sf = SlotFile(p, 1000)
    sf.load()
    sf.create()
    c = Bitmap(1000)
    c.set(999)
    sf.save(c)  # over the torn slot
    with open(p, "r+b") as f:  # the other slot (a) torn: c is still the latest
        f.seek((sf.generation + 1) % 2 * sf.slot_size + 40)
        f.write(b"\xff" * 8)
    assert SlotFile(p, 1000).load() == c and Bitmap.load(p) == c
    sf.close()


@pytest.mark.root
def test_a_full_filesystem_does_not_stop_the_slot_file_from_saving(tmp_path) -> None:
    import errno
    import subprocess

    from dmrecover.engine.bitmap import SlotFile

    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
    try:
        sf = SlotFile(mnt / "m", 100_000)
        sf.create()
        with open(mnt / "filler", "wb") as f, pytest.raises(OSError) as err:
            while True:
                f.write(bytes(65536))
                f.flush()
        assert err.value.errno == errno.ENOSPC
        bm = Bitmap(100_000)
        bm.set_range(5, 5000)
        sf.save(bm)  # no new space needed
        with pytest.raises(OSError):
            bm.save(mnt / "other")  # what atomic_write would have needed
        assert SlotFile(mnt / "m", 100_000).load() == bm
        sf.close()
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
