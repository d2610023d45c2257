"""The VM itself: a real kernel with device-mapper and udevd, dmrecover installed."""

import shutil
import subprocess


def test_guest_has_device_mapper_and_udev():
    subprocess.run(["modprobe", "dm-snapshot"], check=True)
    out = subprocess.run(["dmsetup", "targets"], check=True, capture_output=True, text=True)
    assert "snapshot-merge" in out.stdout
    assert subprocess.run(["udevadm", "control", "--ping"]).returncode == 0
    assert shutil.which("dmrecover")
