"""Fixtures for the kernel suite (runs as root inside the VM, on a kernel with device-mapper)."""

from __future__ import annotations

import os
import subprocess
import uuid as uuidlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dmrecover.backends.dm import dmsetup as dm
from tests.apps.livekit import Sandbox
from tests.kernel.kernelutil import dm_state, sh, teardown_sandbox

pytestmark = pytest.mark.kernel


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:  # the hook sees every test of the run
            item.add_marker(pytest.mark.kernel)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """A failed kernel test carries the guest's kernel log (dm-snapshot invalidations, loop and
    FUSE I/O errors are only there): the VM is gone by the time anyone reads the report."""
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        r = subprocess.run(["dmesg", "--ctime"], capture_output=True, text=True)
        report.sections.append(("kernel log (last 150 lines)",
                                "\n".join((r.stdout or r.stderr).splitlines()[-150:])))
        box = getattr(item, "funcargs", {}).get("box")
        for log in sorted(Path(box.state_root).glob("*/session.log")) if box else []:
            lines = log.read_text(errors="replace").splitlines()
            report.sections.append((f"{log} (last 80 lines)", "\n".join(lines[-80:])))


@pytest.fixture(scope="session", autouse=True)
def _kernel_ready() -> None:
    if os.geteuid() != 0:
        pytest.fail("the kernel suite runs as root (in the VM: vagrant/run-kernel-tests.sh)")
    dm.probe()
    dm.install_udev_rules()


@pytest.fixture
def session_name() -> str:
    """A unique session name, with a '-' in it to exercise the name escaping."""
    return f"t-{uuidlib.uuid4().hex[:8]}"


@pytest.fixture
def loops(tmp_path: Path) -> Iterator[Callable[..., str]]:
    """make(size) -> a loop device over a fresh sparse file; all detached at the end."""
    made: list[str] = []

    def make(size: int, name: str | None = None) -> str:
        f = tmp_path / (name or f"disk{len(made)}.img")
        with open(f, "wb") as fh:
            fh.truncate(size)
        dev = sh("losetup", "-f", "--show", str(f)).strip()
        made.append(dev)
        return dev

    try:
        yield make
    finally:
        for dev in reversed(made):
            subprocess.run(["losetup", "-d", dev], capture_output=True)


@pytest.fixture
def owned_cleanup(session_name: str) -> Iterator[str]:
    """Removes the test session's dm devices at the end, whatever happened."""
    try:
        yield session_name
    finally:
        for _ in range(3):
            left = [d for d in dm.list_owned(session_name)]
            if not left:
                break
            for d in sorted(left, key=lambda d: d.open_count):
                subprocess.run(["dmsetup", "remove", "--force", "--retry", d.name],
                               capture_output=True)



@pytest.fixture
def box(tmp_path: Path) -> Iterator[Sandbox]:
    """A live-restore sandbox under tmp_path. At the end, passed or failed, none of its
    sessions' dm devices, loops, mounts or boot units is left (`dmsetup ls` and `losetup -a`
    as before the test)."""
    sb = Sandbox(tmp_path)
    before = dm_state()
    try:
        yield sb
    finally:
        teardown_sandbox(sb, before)
