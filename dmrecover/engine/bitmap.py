"""Compact persistent bitmaps (one bit per chunk or per 4 KiB block).

Bit i lives in byte i >> 3, mask 1 << (i & 7). 1 TiB of 4 KiB blocks is 2^28 bits = 32 MiB.
The file format is a 24-byte header (magic, version, nbits, crc32 of the bits) followed by the
bits; `save()` is atomic (temp file, fsync, rename, fsync the directory), so a crash leaves the
old file or the new one, and `load()` rejects a torn or foreign file.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterator

from dmrecover.errors import BitmapError
from dmrecover.system.files import atomic_write, fsync_dir

MAGIC = b"DMRBMAP"
VERSION = 1
_HEADER = struct.Struct("<7sBQI4x")  # magic, version, nbits, crc32(bits)
_SCAN = 1 << 16  # bytes per step when scanning for set/clear bits


class Bitmap:
    """A fixed-size bitmap over a bytearray. Single bit ops are atomic enough under the GIL
    for one writer per bit; callers that need more hold their own lock."""

    __slots__ = ("nbits", "_bits")

    def __init__(self, nbits: int, data: bytes | bytearray | None = None) -> None:
        if nbits < 0:
            raise ValueError("nbits must be >= 0")
        self.nbits = nbits
        nbytes = (nbits + 7) >> 3
        if data is None:
            self._bits = bytearray(nbytes)
        else:
            if len(data) != nbytes:
                raise ValueError(f"bitmap of {nbits} bits needs {nbytes} bytes, got {len(data)}")
            self._bits = bytearray(data)

    # ------------------------------------------------------------------ single bits

    def _check(self, i: int) -> None:
        if not 0 <= i < self.nbits:
            raise IndexError(f"bit {i} out of range 0..{self.nbits}")

    def set(self, i: int) -> None:
        self._check(i)
        self._bits[i >> 3] |= 1 << (i & 7)

    def clear(self, i: int) -> None:
        self._check(i)
        self._bits[i >> 3] &= ~(1 << (i & 7)) & 0xFF

    def test(self, i: int) -> bool:
        self._check(i)
        return bool(self._bits[i >> 3] & (1 << (i & 7)))

    __getitem__ = test

    def __len__(self) -> int:
        return self.nbits

    # ------------------------------------------------------------------ ranges

    def set_range(self, start: int, count: int) -> None:
        """Set bits [start, start+count)."""
        self._range(start, count, True)

    def clear_range(self, start: int, count: int) -> None:
        """Clear bits [start, start+count)."""
        self._range(start, count, False)

    def _range(self, start: int, count: int, value: bool) -> None:
        if count <= 0:
            return
        end = start + count
        if start < 0 or end > self.nbits:
            raise IndexError(f"range {start}+{count} out of 0..{self.nbits}")
        b = self._bits
        # leading bits up to a byte boundary
        while start < end and start & 7:
            self._set1(start, value)
            start += 1
        full_end = end & ~7
        if start < full_end:
            b[start >> 3:full_end >> 3] = (b"\xff" if value else b"\0") * ((full_end - start) >> 3)
            start = full_end
        while start < end:
            self._set1(start, value)
            start += 1

    def _set1(self, i: int, value: bool) -> None:
        if value:
            self._bits[i >> 3] |= 1 << (i & 7)
        else:
            self._bits[i >> 3] &= ~(1 << (i & 7)) & 0xFF

    def any_in(self, start: int, count: int) -> bool:
        """True when some bit in [start, start+count) is set."""
        end = min(start + count, self.nbits)
        if start >= end:
            return False
        b = self._bits
        lo, hi = start >> 3, (end - 1) >> 3
        if lo == hi:
            mask = ((1 << (end - start)) - 1) << (start & 7)
            return bool(b[lo] & mask)
        if b[lo] >> (start & 7):
            return True
        tail = (end - 1) & 7
        if b[hi] & ((2 << tail) - 1):
            return True
        return lo + 1 < hi and b.count(0, lo + 1, hi) != hi - lo - 1

    def count_range(self, start: int, count: int) -> int:
        """Number of set bits in [start, start+count)."""
        end = min(start + count, self.nbits)
        if start >= end:
            return 0
        lo, hi = start >> 3, (end + 7) >> 3
        v = int.from_bytes(self._bits[lo:hi], "little") >> (start - (lo << 3))
        return (v & ((1 << (end - start)) - 1)).bit_count()

    def runs(self, start: int, count: int) -> list[tuple[int, int, bool]]:
        """Split [start, start+count) into maximal runs: (first, length, value)."""
        end = min(start + count, self.nbits)
        if start >= end:
            return []
        if not self.any_in(start, end - start):
            return [(start, end - start, False)]
        out: list[tuple[int, int, bool]] = []
        b = self._bits
        run_start = start
        run_val = bool(b[start >> 3] & (1 << (start & 7)))
        for i in range(start + 1, end):
            v = bool(b[i >> 3] & (1 << (i & 7)))
            if v != run_val:
                out.append((run_start, i - run_start, run_val))
                run_start, run_val = i, v
        out.append((run_start, end - run_start, run_val))
        return out

    def count(self) -> int:
        """Number of set bits."""
        total = 0
        b = self._bits
        for pos in range(0, len(b), 1 << 20):
            total += int.from_bytes(b[pos:pos + (1 << 20)], "little").bit_count()
        return total

    def iter_set(self, start: int = 0) -> Iterator[int]:
        """Indexes of set bits, ascending; skips empty regions fast. Tolerates concurrent
        changes (it sees each byte as it is when reached)."""
        return self._iter(start, True)

    def iter_clear(self, start: int = 0) -> Iterator[int]:
        """Indexes of clear bits, ascending (see iter_set)."""
        return self._iter(start, False)

    def _iter(self, start: int, want: bool) -> Iterator[int]:
        b = self._bits
        skip = bytes([0 if want else 0xFF])
        i = max(start, 0)
        while i < self.nbits:
            byte_i = i >> 3
            if i & 7:
                # finish a partly consumed byte bit by bit
                if bool(b[byte_i] & (1 << (i & 7))) == want:
                    yield i
                i += 1
                continue
            window = b[byte_i:byte_i + _SCAN]
            rest = window.lstrip(skip)
            if not rest:
                i = (byte_i + len(window)) << 3
                continue
            byte_i += len(window) - len(rest)
            i = byte_i << 3
            v = b[byte_i]
            for bit in range(8):
                if bool(v & (1 << bit)) == want and i + bit < self.nbits:
                    yield i + bit
            i += 8

    def iter_extents(self) -> Iterator[tuple[int, int]]:
        """(first, count) of every maximal run of set bits, ascending."""
        run_start = -1
        prev = -2
        for i in self.iter_set():
            if i != prev + 1:
                if run_start >= 0:
                    yield run_start, prev - run_start + 1
                run_start = i
            prev = i
        if run_start >= 0:
            yield run_start, prev - run_start + 1

    # ------------------------------------------------------------------ copies, bytes

    def copy(self) -> Bitmap:
        return Bitmap(self.nbits, self._bits)

    def to_bytes(self) -> bytes:
        return bytes(self._bits)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Bitmap) and self.nbits == other.nbits and \
            self._bits == other._bits

    def __repr__(self) -> str:
        return f"Bitmap(nbits={self.nbits}, set={self.count()})"

    # ------------------------------------------------------------------ persistence

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write atomically and durably: temp file, fsync, rename, fsync the directory."""
        bits = memoryview(self._bits)
        header = _HEADER.pack(MAGIC, VERSION, self.nbits, zlib.crc32(bits))
        atomic_write(path, (header, bits))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Bitmap:
        """Read a file written by save(); BitmapError when missing, torn or foreign.
        Reads straight into the bitmap's buffer (no second copy: 32 MiB at 1 TiB)."""
        try:
            with open(path, "rb") as f:
                head = f.read(_HEADER.size)
                if len(head) < _HEADER.size:
                    raise BitmapError(f"bitmap {path} is truncated")
                if not head.startswith(MAGIC) and SlotFile.is_slot_file(path):
                    return SlotFile.load_any(path)
                magic, version, nbits, crc = _HEADER.unpack(head)
                if magic != MAGIC or version != VERSION:
                    raise BitmapError(f"{path} is not a dmrecover bitmap (version {VERSION})")
                nbytes = (nbits + 7) >> 3
                if os.fstat(f.fileno()).st_size != _HEADER.size + nbytes:
                    raise BitmapError(f"bitmap {path} does not hold {nbytes} bytes of bits")
                bm = cls(nbits)
                if f.readinto(bm._bits) != nbytes:
                    raise BitmapError(f"bitmap {path} is truncated")
        except OSError as err:
            raise BitmapError(f"cannot read bitmap {path}: {err.strerror}") from err
        if zlib.crc32(bm._bits) != crc:
            raise BitmapError(f"bitmap {path} fails its checksum")
        return bm



# ---------------------------------------------------------------------- in-place map file

SLOT_MAGIC = b"DMRBMS2"
_SLOT_HEADER = struct.Struct("<7sBQQI4x")  # magic, version, nbits, generation, crc32
_SLOT_ALIGN = 4096


class SlotFile:
    """A bitmap persisted in place, with no new space needed after creation.

    The file holds two slots, each a header (magic, nbits, generation, crc32 of generation
    and bits) and the bits, allocated in full (written with zeros) when the file is created.
    `save()` writes the slot the latest generation is not in and fdatasyncs it: a crash
    mid-write tears that slot only, and `load()` takes the valid slot with the highest
    generation. So a full filesystem never stops the map from being saved (atomic_write
    would need a new temp file every time).
    """

    def __init__(self, path: str | os.PathLike[str], nbits: int) -> None:
        self.path = os.fspath(path)
        self.nbits = nbits
        self.slot_size = -(-(_SLOT_HEADER.size + ((nbits + 7) >> 3)) // _SLOT_ALIGN) \
            * _SLOT_ALIGN
        self.generation = 0
        self._fd = -1

    @staticmethod
    def is_slot_file(path: str | os.PathLike[str]) -> bool:
        """True when path is a SlotFile (False: another format). The first slot's header
        may be torn, the second's then says."""
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                return f.read(len(SLOT_MAGIC)) == SLOT_MAGIC or \
                    os.pread(f.fileno(), len(SLOT_MAGIC), size // 2) == SLOT_MAGIC
        except OSError:
            return False

    @classmethod
    def load_any(cls, path: str | os.PathLike[str]) -> Bitmap:
        """The latest bitmap of a SlotFile whose size is not known beforehand."""
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                heads = [os.pread(f.fileno(), _SLOT_HEADER.size, off) for off in (0, size // 2)]
        except OSError as err:
            raise BitmapError(f"cannot read bitmap {path}: {err.strerror}") from err
        for head in heads:
            if len(head) == _SLOT_HEADER.size and head.startswith(SLOT_MAGIC):
                return cls(path, _SLOT_HEADER.unpack(head)[2]).load()
        raise BitmapError(f"{path} is not a dmrecover bitmap")

    def create(self) -> None:
        """Create the file with both slots allocated (written), durably; an existing file of
        the right size is kept."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if os.fstat(fd).st_size != 2 * self.slot_size:
                os.ftruncate(fd, 0)
                zeros = bytes(min(2 * self.slot_size, 1 << 20))
                pos = 0
                while pos < 2 * self.slot_size:
                    pos += os.pwrite(fd, zeros[:2 * self.slot_size - pos], pos)
                os.fsync(fd)
                fsync_dir(os.path.dirname(self.path) or ".")
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def load(self) -> Bitmap:
        """The latest valid bitmap (an empty one when no slot was ever saved); BitmapError
        when the file is not a SlotFile of nbits."""
        try:
            with open(self.path, "rb") as f:
                raw = f.read()
        except OSError as err:
            raise BitmapError(f"cannot read bitmap {self.path}: {err.strerror}") from err
        if len(raw) != 2 * self.slot_size:
            raise BitmapError(f"bitmap {self.path} is {len(raw)} bytes, expected "
                              f"{2 * self.slot_size} for {self.nbits} bits")
        nbytes = (self.nbits + 7) >> 3
        best: tuple[int, bytes] | None = None
        for slot in range(2):
            base = slot * self.slot_size
            magic, version, nbits, gen, crc = _SLOT_HEADER.unpack_from(raw, base)
            if magic != SLOT_MAGIC:
                continue
            if version != VERSION or nbits != self.nbits:
                raise BitmapError(f"bitmap {self.path} has {nbits} bits, expected "
                                  f"{self.nbits}")
            bits = raw[base + _SLOT_HEADER.size:base + _SLOT_HEADER.size + nbytes]
            if zlib.crc32(bits, zlib.crc32(struct.pack("<Q", gen))) != crc:
                continue  # torn: the other slot holds the previous generation
            if best is None or gen > best[0]:
                best = (gen, bits)
        if best is None:
            self.generation = 0
            return Bitmap(self.nbits)
        self.generation = best[0]
        return Bitmap(self.nbits, best[1])

    def save(self, bm: Bitmap) -> None:
        """Write bm into the older slot and fdatasync (needs create() first)."""
        if bm.nbits != self.nbits:
            raise ValueError(f"bitmap of {bm.nbits} bits into a file of {self.nbits}")
        if self._fd < 0:
            self.create()
        gen = self.generation + 1
        bits = bm.to_bytes()
        crc = zlib.crc32(bits, zlib.crc32(struct.pack("<Q", gen)))
        data = _SLOT_HEADER.pack(SLOT_MAGIC, VERSION, self.nbits, gen, crc) + bits
        base = (gen % 2) * self.slot_size
        view = memoryview(data)
        pos = 0
        while pos < len(view):
            pos += os.pwrite(self._fd, view[pos:], base + pos)
        os.fdatasync(self._fd)
        self.generation = gen

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
