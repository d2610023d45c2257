"""The dm ioctls' struct packing against known byte layouts, and the swap's sequences and
failure rules against a model of the kernel (no root); the real kernel: tests/kernel/test_dm.py
(test_swap_*)."""

from __future__ import annotations

import struct

import pytest

from dmrecover.backends.dm import dmsetup as dm
from dmrecover.backends.dm import ioctl
from dmrecover.errors import StackError
from tests.unit.backends.dm.fake_kernel import Dev, FakeKernel, unpack_load

# The DM_TABLE_LOAD buffer a C program built with linux/dm-ioctl.h (4.47) the way
# libdevmapper's _flatten/_add_target lay it out: name "dmrecover-t--1-origin", read-only,
# targets "0 2048 linear /dev/loop1 0" and "2048 6144 linear /dev/loop2 2048".
LOAD_HEX = (
    "04000000" "00000000" "00000000"  # version 4.0.0
    "a8010000"  # data_size 424
    "38010000"  # data_start 312
    "02000000"  # target_count
    "00000000"  # open_count
    "01000000"  # flags: DM_READONLY_FLAG
    "00000000" "00000000"  # event_nr, padding
    "0000000000000000"  # dev
    + "646d7265636f7665722d742d2d312d6f726967696e".ljust(2 * 128, "0")  # name[128]
    + "00" * 129 + "00" * 7  # uuid[129], data[7]
    # spec 1 at 312: start 0, length 2048, status 0, next 56, "linear", params + NUL + pad
    + "0000000000000000" "0008000000000000" "00000000" "38000000"
    + "6c696e656172".ljust(32, "0")
    + "2f6465762f6c6f6f70312030" + "00" * 4
    # spec 2 at 368: start 2048, length 6144, next 56
    + "0008000000000000" "0018000000000000" "00000000" "38000000"
    + "6c696e656172".ljust(32, "0")
    + "2f6465762f6c6f6f7032203230343800"  # 40 + 16 bytes: aligned, no padding
)


def test_struct_sizes_and_ioctl_numbers_match_the_kernel_header() -> None:
    # sizeof(struct dm_ioctl) = 312, sizeof(struct dm_target_spec) = 40; _IOWR(0xfd, nr, ...)
    assert ioctl.HEADER.size == 312 and ioctl.SPEC.size == 40
    assert ioctl.ioctl_number(ioctl.DM_DEV_SUSPEND_CMD) == 0xC138FD06
    assert ioctl.ioctl_number(ioctl.DM_DEV_STATUS_CMD) == 0xC138FD07
    assert ioctl.ioctl_number(ioctl.DM_TABLE_LOAD_CMD) == 0xC138FD09
    assert ioctl.ioctl_number(ioctl.DM_TABLE_CLEAR_CMD) == 0xC138FD0A
    assert ioctl.ioctl_number(ioctl.DM_TABLE_STATUS_CMD) == 0xC138FD0C
    assert (ioctl.DM_READONLY_FLAG, ioctl.DM_SUSPEND_FLAG, ioctl.DM_STATUS_TABLE_FLAG,
            ioctl.DM_INACTIVE_PRESENT_FLAG, ioctl.DM_BUFFER_FULL_FLAG,
            ioctl.DM_SKIP_LOCKFS_FLAG, ioctl.DM_NOFLUSH_FLAG) == (
        0x1, 0x2, 0x10, 0x40, 0x100, 0x400, 0x800)


def test_header_fields_at_their_offsets() -> None:
    buf = ioctl.pack_header("dmrecover-s-pseudo", data_size=400,
                            flags=ioctl.DM_SUSPEND_FLAG | ioctl.DM_NOFLUSH_FLAG,
                            target_count=3, event_nr=ioctl.RESUME_EVENT_NR)
    assert len(buf) == 400
    assert struct.unpack_from("<3I", buf, 0) == (4, 0, 0)
    assert struct.unpack_from("<I", buf, 12)[0] == 400  # data_size
    assert struct.unpack_from("<I", buf, 16)[0] == 312  # data_start
    assert struct.unpack_from("<I", buf, 20)[0] == 3  # target_count
    assert struct.unpack_from("<I", buf, 28)[0] == 0x802  # flags
    assert struct.unpack_from("<I", buf, 32)[0] == 0x600000  # udev flags << 16, no cookie
    assert struct.unpack_from("<Q", buf, 40)[0] == 0  # dev
    assert bytes(buf[48:48 + 19]) == b"dmrecover-s-pseudo\0"
    assert bytes(buf[176:312]) == b"\0" * 136 and bytes(buf[312:]) == b"\0" * 88


def test_load_buffer_is_laid_out_as_libdevmapper_does() -> None:
    buf = ioctl.load_buffer("dmrecover-t--1-origin", ioctl.parse_table(
        ["0 2048 linear /dev/loop1 0", "2048 6144 linear /dev/loop2 2048"]), read_only=True)
    assert buf.hex() == LOAD_HEX


@pytest.mark.parametrize("plen", range(1, 20))
def test_every_spec_starts_8_byte_aligned_and_round_trips(plen: int) -> None:
    targets = [ioctl.Target(i * 8, 8, "linear", "x" * (plen + i) + " 0") for i in range(5)]
    buf = ioctl.load_buffer("n", targets, read_only=False)
    assert len(buf) % 8 == 0 and struct.unpack_from("<I", buf, 28)[0] == 0
    assert unpack_load(buf) == targets


def test_a_backslash_reaches_the_target_as_written() -> None:
    buf = ioctl.load_buffer("n", [ioctl.Target(0, 8, "linear", "/dev/a\\b 0")],
                            read_only=False)
    assert b"/dev/a\\\\b 0\0" in buf  # doubled: dm_split_args unescapes it
    assert unpack_load(buf)[0].params == "/dev/a\\b 0"


def test_bad_tables_and_names_are_refused() -> None:
    with pytest.raises(StackError, match="empty"):
        ioctl.parse_table(["", "  "])
    for line in ("x 8 linear /dev/a 0", "0 0 linear /dev/a 0", "0 8", "0 8 " + "t" * 16):
        with pytest.raises(StackError, match="bad device-mapper table line"):
            ioctl.parse_table(line)
    for name in ("", "a/b", "n" * 128):
        with pytest.raises(StackError, match="not usable"):
            ioctl.pack_header(name, data_size=312)
    assert ioctl.parse_table("0 8 error\n8 8 linear /dev/a 8\n") == [
        ioctl.Target(0, 8, "error", ""), ioctl.Target(8, 8, "linear", "/dev/a 8")]


def _status_answer(buf: bytearray, targets: list[ioctl.Target]) -> None:
    """Fill buf as the kernel's retrieve_status does (next relative to data_start), setting
    DM_BUFFER_FULL_FLAG when they do not fit."""
    pos, full = ioctl.HEADER.size, False
    for t in targets:
        params = t.params.encode() + b"\0"
        if pos + ioctl.SPEC.size + len(params) > len(buf):
            full = True
            break
        nxt = (pos + ioctl.SPEC.size + len(params) + 7) // 8 * 8 - ioctl.HEADER.size
        ioctl.SPEC.pack_into(buf, pos, t.start, t.length, 0, nxt, t.type.encode())
        buf[pos + ioctl.SPEC.size:pos + ioctl.SPEC.size + len(params)] = params
        pos = ioctl.HEADER.size + nxt
    hdr = ioctl.unpack_header(buf)
    ioctl.HEADER.pack_into(buf, 0, *ioctl.DM_VERSION, pos, ioctl.HEADER.size, len(targets), 1,
                           hdr.flags | (ioctl.DM_BUFFER_FULL_FLAG if full else 0), 0, 0,
                           (253 << 8) | 4, hdr.name.encode(), b"")


def test_table_status_grows_its_buffer_until_the_answer_fits(monkeypatch) -> None:
    targets = [ioctl.Target(i * 8, 8, "linear", f"7:{i % 200} {i * 8}") for i in range(2000)]
    sizes: list[int] = []

    def kernel(cmd: int, buf: bytearray, *, what: str, name: str) -> bytearray:
        assert cmd == ioctl.DM_TABLE_STATUS_CMD and buf[28] & ioctl.DM_STATUS_TABLE_FLAG
        sizes.append(len(buf))
        _status_answer(buf, targets)
        return buf

    monkeypatch.setattr(ioctl, "_ioctl", kernel)
    assert ioctl.table_status("n", table=True) == targets
    assert sizes[0] == ioctl.STATUS_BUFFER and sizes == [sizes[0] * 2 ** i
                                                         for i in range(len(sizes))]
    assert len(sizes) > 1


# ----------------------------------------------------------------------------- the swap


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch) -> FakeKernel:
    monkeypatch.setattr(dm, "_udevsync", False)  # no udevadm settle
    monkeypatch.setattr(ioctl.time, "sleep", lambda s: None)
    k = FakeKernel(devs={"d": Dev(live=["0 8 linear /dev/old 0"])})
    return k.install(monkeypatch)


NEW = "0 8 linear /dev/new 0"


def test_swap_loads_then_one_resume(kernel: FakeKernel) -> None:
    done = ioctl.swap("d", NEW, suspend_first=False)
    assert kernel.ops() == ["load", "resume"]
    resume_flags = kernel.calls[1][2]
    assert resume_flags & ioctl.DM_SKIP_LOCKFS_FLAG and not resume_flags & ioctl.DM_SUSPEND_FLAG
    assert kernel.devs["d"] == Dev(live=[NEW])
    assert done.suspend == 0 and done.pause == done.resume >= 0 and done.end >= done.start


def test_swap_suspend_first_suspends_loads_resumes(kernel: FakeKernel) -> None:
    done = ioctl.swap("d", NEW, suspend_first=True, read_only=True)
    assert kernel.ops() == ["suspend", "load", "resume"]
    assert kernel.calls[0][2] & ioctl.DM_SUSPEND_FLAG
    assert not kernel.calls[0][2] & ioctl.DM_NOFLUSH_FLAG  # in-flight I/O completes first
    assert kernel.calls[1][2] & ioctl.DM_READONLY_FLAG
    assert kernel.devs["d"] == Dev(live=[NEW], read_only=True)
    assert done.pause >= done.suspend + done.load + done.resume - 1e-9


@pytest.mark.parametrize("first", [True, False])
def test_a_failed_load_keeps_the_old_table_resumed(kernel: FakeKernel, first: bool) -> None:
    kernel.fail.add("load")
    with pytest.raises(StackError):
        ioctl.swap("d", NEW, suspend_first=first)
    assert kernel.devs["d"] == Dev(live=["0 8 linear /dev/old 0"])
    assert "load" in kernel.ops() and ("suspend" in kernel.ops()) == first


@pytest.mark.parametrize("fault", ["swap", "suspend"])
def test_a_failed_swap_ends_resumed_on_the_old_table(kernel: FakeKernel, fault: str) -> None:
    """swap: the kernel drops the new table and keeps the device suspended; suspend: it gives
    the table back as inactive (a plain resume would swap it in after all). Each time the
    device ends resumed, on its old table, nothing loaded."""
    kernel.fail_once.add(fault)
    with pytest.raises(StackError):
        ioctl.swap("d", NEW, suspend_first=False)
    assert kernel.devs["d"] == Dev(live=["0 8 linear /dev/old 0"])
    want = ["load", "resume", "status"] + (["clear"] if fault == "suspend" else ["resume"])
    assert kernel.ops() == want


def test_a_resume_failing_after_the_swap_is_retried(kernel: FakeKernel) -> None:
    """The tables swapped, then the resume failed: the device is resumed (on the new table,
    which shows the same data); the caller still hears of the failure."""
    kernel.fail_once.add("resume")
    with pytest.raises(StackError):
        ioctl.swap("d", NEW, suspend_first=False)
    assert kernel.devs["d"] == Dev(live=[NEW])
    assert kernel.ops() == ["load", "resume", "status", "resume"]


def test_given_up_with_the_table_loaded_nothing_stays_loaded(kernel: FakeKernel) -> None:
    def loaded() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ioctl.swap("d", NEW, suspend_first=False, loaded=loaded)
    assert kernel.ops() == ["load", "status", "clear"]
    assert kernel.devs["d"] == Dev(live=["0 8 linear /dev/old 0"])


def test_a_device_that_never_resumes_is_reported(kernel: FakeKernel, monkeypatch) -> None:
    monkeypatch.setattr(ioctl, "RESUME_ATTEMPTS", 3)
    kernel.fail.add("resume")
    with pytest.raises(StackError, match="stays suspended") as err:
        ioctl.swap("d", NEW, suspend_first=True)
    assert err.value.hint == "run `dmsetup resume d`"
    assert kernel.ops().count("resume") == 4  # the swap's, then 3 attempts


def test_a_missing_device(kernel: FakeKernel) -> None:
    assert ioctl.dev_status("gone") is None
    with pytest.raises(StackError, match="ENXIO"):
        ioctl.swap("gone", NEW, suspend_first=False)


class _Waiter:
    def __init__(self, kernel: FakeKernel, log: list[str]) -> None:
        self.kernel, self.log = kernel, log
        log.append(f"watch after {len(kernel.calls)} ioctls")

    def wait(self, check) -> None:
        self.log.append(f"wait after {self.kernel.ops()}")

    def close(self) -> None:
        self.log.append("close")


@pytest.mark.parametrize("first", [True, False])
def test_swap_waits_for_its_own_udev_event_watched_from_before_the_pause(
        kernel: FakeKernel, monkeypatch: pytest.MonkeyPatch, first: bool) -> None:
    """No blanket `udevadm settle`: the device's change event, its monitor started before the
    first ioctl (finding the UUID costs a dmsetup start: never inside the pause)."""
    log: list[str] = []
    monkeypatch.setattr(dm, "_udevsync", True)  # udevd runs: the event is waited for
    monkeypatch.setattr(dm, "change_waiter", lambda name: _Waiter(kernel, log))
    ioctl.swap("d", NEW, suspend_first=first)
    ops = ["suspend", "load", "resume"] if first else ["load", "resume"]
    assert log == ["watch after 0 ioctls", f"wait after {ops}"]


def test_a_failed_swap_closes_its_udev_watch(kernel: FakeKernel,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    log: list[str] = []
    monkeypatch.setattr(dm, "_udevsync", True)  # udevd runs: the event is waited for
    monkeypatch.setattr(dm, "change_waiter", lambda name: _Waiter(kernel, log))
    kernel.fail.add("load")
    with pytest.raises(StackError):
        ioctl.swap("d", NEW, suspend_first=True)
    assert log == ["watch after 0 ioctls", "close"]
