"""A small model of the kernel's dm-ioctl.c behind ioctl._ioctl (no root): it decodes the
buffers ioctl.py packs and keeps each device's live table, loaded table and suspension the way
do_suspend, do_resume, table_load and table_clear do, with failures to inject."""

from __future__ import annotations

import errno
from dataclasses import dataclass, field

import pytest

from dmrecover.backends.dm import ioctl
from dmrecover.errors import StackError


@dataclass
class Dev:
    live: list[str]
    inactive: list[str] | None = None
    suspended: bool = False
    read_only: bool = False


@dataclass
class FakeKernel:
    devs: dict[str, Dev] = field(default_factory=dict)
    calls: list[tuple[str, str, int]] = field(default_factory=list)  # (op, name, flags)
    #: ops that fail: "load", "suspend", "swap" (do_resume's table swap), "resume"
    fail: set[str] = field(default_factory=set)
    fail_once: set[str] = field(default_factory=set)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> FakeKernel:
        monkeypatch.setattr(ioctl, "_ioctl", self.ioctl)
        return self

    def ops(self) -> list[str]:
        return [c[0] for c in self.calls]

    def _failing(self, op: str) -> bool:
        if op in self.fail_once:
            self.fail_once.discard(op)
            return True
        return op in self.fail

    @staticmethod
    def _err(code: int, what: str, name: str) -> StackError:
        return StackError(f"{what} failed: ({errno.errorcode[code]})", returncode=code)

    def ioctl(self, cmd: int, buf: bytearray, *, what: str, name: str) -> bytearray:
        hdr = ioctl.unpack_header(buf)
        assert hdr.version == ioctl.DM_VERSION and hdr.data_size == len(buf)
        assert hdr.data_start == ioctl.HEADER.size and hdr.name == name
        op = {ioctl.DM_DEV_STATUS_CMD: "status", ioctl.DM_TABLE_LOAD_CMD: "load",
              ioctl.DM_TABLE_CLEAR_CMD: "clear", ioctl.DM_TABLE_STATUS_CMD: "table",
              ioctl.DM_DEV_SUSPEND_CMD: "suspend" if hdr.flags & ioctl.DM_SUSPEND_FLAG
              else "resume"}[cmd]
        self.calls.append((op, name, hdr.flags))
        dev = self.devs.get(name)
        if dev is None:
            raise self._err(errno.ENXIO, what, name)
        if op == "load":
            if self._failing("load"):
                raise self._err(errno.EINVAL, what, name)
            dev.inactive = [t.line() for t in unpack_load(buf)]
            dev.read_only = bool(hdr.flags & ioctl.DM_READONLY_FLAG)
        elif op == "clear":
            dev.inactive = None
        elif op == "suspend":
            if self._failing("suspend"):
                raise self._err(errno.EINTR, what, name)
            dev.suspended = True
        elif op == "resume":
            if dev.inactive is not None:
                new, dev.inactive = dev.inactive, None
                if not dev.suspended:
                    if self._failing("suspend"):  # the new table goes back, inactive
                        dev.inactive = new
                        raise self._err(errno.EINTR, what, name)
                    dev.suspended = True
                if self._failing("swap"):  # the new table is dropped, device suspended
                    raise self._err(errno.EINVAL, what, name)
                dev.live = new
            if dev.suspended:
                if self._failing("resume"):
                    raise self._err(errno.EINVAL, what, name)
                dev.suspended = False
        flags = ((ioctl.DM_SUSPEND_FLAG if dev.suspended else 0)
                 | (ioctl.DM_INACTIVE_PRESENT_FLAG if dev.inactive is not None else 0)
                 | (ioctl.DM_READONLY_FLAG if dev.read_only else 0)
                 | ioctl.DM_ACTIVE_PRESENT_FLAG)
        ioctl.HEADER.pack_into(buf, 0, *ioctl.DM_VERSION, len(buf), ioctl.HEADER.size,
                               len(dev.live), 0, flags, 0, 0, 0, name.encode(), b"")
        return buf


def unpack_load(buf: bytes | bytearray) -> list[ioctl.Target]:
    """The targets of a DM_TABLE_LOAD buffer (`next` relative to each entry), as the kernel's
    populate_table reads them."""
    hdr = ioctl.unpack_header(buf)
    out = []
    pos = hdr.data_start
    for _ in range(hdr.target_count):
        assert pos % 8 == 0 and pos + ioctl.SPEC.size <= len(buf)
        start, length, status, nxt, ttype = ioctl.SPEC.unpack_from(buf, pos)
        assert status == 0 and nxt >= ioctl.SPEC.size
        params = bytes(buf[pos + ioctl.SPEC.size:]).split(b"\0", 1)[0].decode()
        out.append(ioctl.Target(start, length, ttype.rstrip(b"\0").decode(),
                                params.replace("\\\\", "\\")))
        pos += nxt
    return out
