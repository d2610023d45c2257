"""The engine's libc calls: the malloc arena cap the PseudoVolume sets for its threads."""

from __future__ import annotations

import subprocess
import sys


def test_the_malloc_arena_cap_is_taken_by_glibc() -> None:
    # In a child: the cap is process-wide, and this test must not change pytest's own.
    code = ("from dmrecover.engine.fastio import limit_malloc_arenas\n"
            "import sys\n"
            "sys.exit(0 if limit_malloc_arenas() else 3)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr


def test_a_pseudovolume_caps_the_arenas_before_its_threads(tmp_path, monkeypatch) -> None:
    from dmrecover.engine import pseudovolume
    from dmrecover.engine.fetcher import MemorySource

    calls = []
    monkeypatch.setattr(pseudovolume, "limit_malloc_arenas", lambda: calls.append(1) or True)
    data = bytes(1 << 20)
    dest = tmp_path / "dest"
    dest.write_bytes(bytes(len(data)))
    pv = pseudovolume.PseudoVolume(MemorySource(data, 256 << 10), dest, tmp_path / "state")
    try:
        assert calls == [1]
    finally:
        pv.close()
