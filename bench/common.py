"""What the benchmarks measure the same way: dropping a file's page cache, dd throughput and
4 KiB O_DIRECT random reads. Imported by name (`from common import ...`): the benchmarks run
as scripts, with bench/ first on sys.path."""

from __future__ import annotations

import mmap
import os
import random
import re
import time
from pathlib import Path

from dmrecover.system import command

_DD_RESULT = re.compile(r"(\d+) bytes .* copied, ([\d.]+) s")


def drop_cache(path: Path) -> None:
    """Write back and drop the page cache of one file (the next read comes from its disk)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def dd(args: list[str], timeout: float = 1800) -> float:
    """Run dd with args; its throughput in bytes/s (from the summary it prints)."""
    r = command.run(["dd", *args], timeout=timeout)
    m = _DD_RESULT.search(r.stderr)
    assert m, r.stderr
    return int(m.group(1)) / float(m.group(2))


def seq_read(path: Path) -> float:
    """Sequential 1 MiB O_DIRECT read of the whole file, bytes/s."""
    return dd([f"if={path}", "of=/dev/null", "bs=1M", "iflag=direct"])


def random_reads(path: Path, size: int | None = None, count: int = 4000, seed: int = 3
                 ) -> float:
    """4 KiB O_DIRECT reads per second at random offsets in the first `size` bytes (default:
    the whole file)."""
    size = size if size is not None else path.stat().st_size
    buf = mmap.mmap(-1, 4096)  # O_DIRECT wants an aligned buffer
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    rnd = random.Random(seed)
    try:
        t0 = time.monotonic()
        for _ in range(count):
            os.preadv(fd, [buf], rnd.randrange(size // 4096) * 4096)
        return count / (time.monotonic() - t0)
    finally:
        os.close(fd)
