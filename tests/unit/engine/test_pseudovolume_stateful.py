"""Property-based (hypothesis, stateful) tests of the three-tier block logic against a model.

The model is a bytearray holding what the volume must read as. Steps: writes and reads at any
offset and length (straddling blocks, chunks and tiers), flushes, background-restore steps,
syncs of the restored map, a kill (close without flushing: the page cache survives, so every
acknowledged write must be there after reopening), the cutover merge (DEST alone must then
equal the model; later writes are refused), and a power loss (DEST and the overlay file
revert to their content at their last flush/sync: every flushed write must be there and nothing
else may be wrong). After every step, the restored map on disk names only chunks whose DEST
content is right.
"""

from __future__ import annotations

import random
import shutil
import tempfile
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from dmrecover.engine.bitmap import Bitmap
from dmrecover.engine.fetcher import MemorySource
from dmrecover.engine.overlay import BLOCK_SIZE
from dmrecover.engine.pseudovolume import PseudoVolume

CS = 4 * BLOCK_SIZE  # 16 KiB chunks: a few blocks each
NCHUNKS = 6
SIZE = NCHUNKS * CS + 5000  # a short last chunk and a short last block


def _source_data() -> bytes:
    rnd = random.Random(42)
    data = bytearray(rnd.randbytes(SIZE))
    data[2 * CS:3 * CS] = bytes(CS)  # a zero chunk
    return bytes(data)


DATA = _source_data()
# Edges are where the bugs are: bias offsets and lengths to block/chunk boundaries +- a little.
_near_edge = st.builds(lambda k, d: max(0, k * BLOCK_SIZE + d), st.integers(0, SIZE // BLOCK_SIZE
                                                                             + 1),
                       st.integers(-2, 2))
offsets = st.one_of(st.integers(0, SIZE + 100), _near_edge, st.just(SIZE - 1))
lengths = st.one_of(st.integers(0, 3 * BLOCK_SIZE), st.integers(0, 2 * CS), _near_edge,
                    st.sampled_from([1, 511, 4095, 4096, 4097, CS]))


class PseudoVolumeMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="dmr-pv-"))
        self.state = self.tmp / "state"
        self.dest = self.tmp / "dest"
        self.dest.write_bytes(b"\xa5" * SIZE)  # garbage where nothing is restored yet
        self.model = bytearray(DATA)
        self.flushed_model = bytearray(DATA)
        self.pv = self._open()
        self.merged = False
        self._snapshot_overlay()
        self.durable_dest = self.dest.read_bytes()

    def _open(self) -> PseudoVolume:
        self.source = MemorySource(DATA, CS)
        return PseudoVolume(self.source, self.dest, self.state)

    def _snapshot_overlay(self) -> None:
        """Remember what a power loss would leave of the overlay (it was just made durable).
        DEST's durable content is remembered only where DEST is synced: flush() does not."""
        self.durable_img = (self.state / "overlay.img").read_bytes()

    def teardown(self) -> None:
        try:
            self.pv.close()
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)

    @rule(off=offsets, n=lengths, seed=st.integers(0, 2**16))
    def write(self, off: int, n: int, seed: int) -> None:
        data = random.Random(seed).randbytes(n)
        if self.merged:
            try:
                self.pv.write(off, data)
            except OSError:
                return
            raise AssertionError("a write after the merge was accepted")
        if off + n > SIZE:
            try:
                self.pv.write(off, data)
            except OSError:
                return
            raise AssertionError("a write beyond the end was accepted")
        assert self.pv.write(off, data) == n
        self.model[off:off + n] = data
        self._written()

    @rule(off=offsets, n=lengths)
    def read(self, off: int, n: int) -> None:
        assert self.pv.read(off, n) == bytes(self.model[off:off + n])
        self._written()

    def _written(self) -> None:
        # On-demand chunks reach DEST in the writer thread after the read returns: wait for
        # them so that the preconditions (restored count) do not depend on its timing.
        assert self.pv.fetcher.wait_writes(30)

    @rule()
    def flush(self) -> None:
        self.pv.flush()
        self.flushed_model = bytearray(self.model)
        self._snapshot_overlay()

    @rule(steps=st.integers(1, 3))
    def restore_steps(self, steps: int) -> None:
        f = self.pv.fetcher
        for index in list(f.iter_unrestored())[:steps]:
            f.ensure(index, background=True)

    @rule()
    def sync_restored_map(self) -> None:
        # DEST and the map only: the overlay's durable image does not change here.
        self.pv.sync_restored_map()
        self.durable_dest = self.dest.read_bytes()

    @rule()
    def kill_and_reopen(self) -> None:
        self.pv.abandon()
        self.pv = self._open()
        # every acknowledged write survives a kill (it is in the page cache and the log)
        assert self.pv.read(0, SIZE) == bytes(self.model)
        self._written()
        self._snapshot_overlay()  # reopening checkpoints the recovered overlay
        self.flushed_model = bytearray(self.model)
        # DEST was not synced: its durable content is still that of the last sync

    @rule()
    def power_loss_and_reopen(self) -> None:
        self.pv.abandon()
        # unflushed data never reached the disk: both files revert to their durable content
        self.dest.write_bytes(self.durable_dest)
        (self.state / "overlay.img").write_bytes(self.durable_img)
        self.pv = self._open()
        self.model = bytearray(self.flushed_model)
        assert self.pv.read(0, SIZE) == bytes(self.model)
        self._written()
        self._snapshot_overlay()

    @precondition(lambda self: self.pv.fetcher.restored_chunks == NCHUNKS + 1)
    @rule()
    def all_restored_reads_come_from_dest_and_overlay(self) -> None:
        before = len(self.source.reads)
        assert self.pv.read(0, SIZE) == bytes(self.model)
        assert len(self.source.reads) == before

    @precondition(lambda self: self.pv.fetcher.restored_chunks == NCHUNKS + 1)
    @rule()
    def merge_overlay(self) -> None:
        self.pv.merge_overlay_into_dest()
        assert self.pv.merged
        # DEST alone now holds the volume as the application wrote it
        assert self.dest.read_bytes()[:SIZE] == bytes(self.model)
        self.merged = True
        self.flushed_model = bytearray(self.model)
        self._snapshot_overlay()
        self.durable_dest = self.dest.read_bytes()  # the merge fsynced DEST

    @invariant()
    def restored_map_on_disk_names_only_good_chunks(self) -> None:
        path = self.state / "restored.map"
        if not path.exists():
            return
        if self.merged:
            return  # DEST holds the application's writes now, not the backup
        dest = self.dest.read_bytes()
        for i in Bitmap.load(path).iter_set():
            assert dest[i * CS:(i + 1) * CS] == DATA[i * CS:(i + 1) * CS], i

    @invariant()
    def in_memory_restored_chunks_are_on_dest(self) -> None:
        if self.merged:
            return
        f = self.pv.fetcher
        for i in range(NCHUNKS + 1):
            if f.is_restored(i):
                assert f.read_dest(i * CS, min(CS, SIZE - i * CS)) == DATA[i * CS:(i + 1) * CS]


PseudoVolumeMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=30,
                                                  deadline=None)
TestPseudoVolume = PseudoVolumeMachine.TestCase
