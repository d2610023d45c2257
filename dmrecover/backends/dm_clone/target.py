"""The device-mapper `clone` target: tables, status, metadata sizing.

    clone <metadata dev> <destination dev> <source dev> <region size>
          [<#features> no_hydration] [<#core args> hydration_threshold N hydration_batch_size N]

Status: `<meta block> <used>/<total meta blocks> <region sectors> <hydrated>/<total regions>
<hydrating> <#features> <features>* <#core args> <core args>* <rw|ro> <needs_check|->`, or
`Fail` when the metadata failed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dmrecover.backends.dm import dmsetup as dm
from dmrecover.errors import StackError
from dmrecover.testhooks import restore_delay

TARGET = "clone"
#: 64 KiB regions: a write smaller than a region first copies its region from the source (an
#: on-demand fetch when it is not restored yet), so regions stay small; the kernel copies
#: HYDRATION_BATCH consecutive regions per kcopyd job, so hydration still moves 1 MiB at once.
REGION_SECTORS = 128
HYDRATION_BATCH = 16
#: Regions hydrating at once (the target's default is 1 MiB worth in flight).
HYDRATION_THRESHOLD = 64


def metadata_size(volume_size: int, region_sectors: int = REGION_SECTORS) -> int:
    """Bytes of the metadata device: the superblock and space maps, plus the region bitset
    (one bit a region, in 4 KiB array blocks of 64-bit words with their btree) with slack."""
    regions = -(-volume_size // (region_sectors * dm.SECTOR))
    bitset = -(-regions // 8)
    size = 4 * 1024 * 1024 + 4 * bitset
    return -(-size // 4096) * 4096


def clone_table(metadata: str, dest: str, source: str, size_bytes: int, *,
                hydrate: bool = False, region_sectors: int = REGION_SECTORS) -> str:
    """A clone table; hydration starts off unless `hydrate` (it is enabled by a message once
    the stack is up, so creating the device never starts a flood of fetches by itself)."""
    features = "0" if hydrate else "1 no_hydration"
    # A test that slows the restore down (DMRECOVER_TEST_RESTORE_DELAY) slows the kernel's copy
    # too, one region at a time: on this backend hydration is the background restore, and a
    # power cut or a kill "during hydration" needs hydration still running.
    threshold, batch = (1, 1) if restore_delay() else (HYDRATION_THRESHOLD, HYDRATION_BATCH)
    core = f"4 hydration_threshold {threshold} hydration_batch_size {batch}"
    return (f"0 {dm.sectors(size_bytes)} {TARGET} {metadata} {dest} {source} "
            f"{region_sectors} {features} {core}")


@dataclass(frozen=True)
class CloneStatus:
    """What the clone target reports."""

    region_sectors: int
    hydrated: int
    regions: int
    hydrating: int
    hydration_enabled: bool
    read_only_metadata: bool = False
    needs_check: bool = False
    failed: bool = False

    @property
    def complete(self) -> bool:
        return not self.failed and self.regions > 0 and self.hydrated == self.regions

    @property
    def fraction(self) -> float:
        return self.hydrated / self.regions if self.regions else 0.0

    def as_dict(self) -> dict:
        """For the session's status (`Presentation.stats()`)."""
        region = self.region_sectors * dm.SECTOR
        return {"hydrated_regions": self.hydrated, "regions": self.regions,
                "hydrating_regions": self.hydrating, "region_bytes": region,
                "hydrated_bytes": self.hydrated * region, "hydrated_fraction": self.fraction,
                "hydration_enabled": self.hydration_enabled, "complete": self.complete,
                "metadata_failed": self.failed or self.needs_check or self.read_only_metadata}


_STATUS_RE = re.compile(r"^(\d+) (\d+)/(\d+) (\d+) (\d+)/(\d+) (\d+) (.*)$")


def parse_status(line: str) -> CloneStatus:
    """Parse one `dmsetup status` line of a clone device."""
    parts = line.split(None, 3)
    if len(parts) < 4 or parts[2] != TARGET:
        raise StackError(f"not a clone status line: {line!r}")
    rest = parts[3].strip()
    if rest.startswith("Fail"):
        return CloneStatus(0, 0, 0, 0, False, failed=True)
    m = _STATUS_RE.match(rest)
    if not m:
        raise StackError(f"unexpected clone status {line!r}")
    tail = m.group(8).split()
    try:
        nfeat = int(tail[0])
        features = tail[1:1 + nfeat]
        ncore = int(tail[1 + nfeat])
        after = tail[2 + nfeat + ncore:]
    except (IndexError, ValueError) as err:
        raise StackError(f"unexpected clone status {line!r}") from err
    mode = after[0] if after else "rw"
    return CloneStatus(region_sectors=int(m.group(4)), hydrated=int(m.group(5)),
                       regions=int(m.group(6)), hydrating=int(m.group(7)),
                       hydration_enabled="no_hydration" not in features,
                       read_only_metadata=mode == "ro",
                       needs_check=len(after) > 1 and after[1] == "needs_check")


def status(name: str) -> CloneStatus:
    return parse_status(dm.status(name).splitlines()[0])


def enable_hydration(name: str) -> None:
    dm.message(name, "enable_hydration")


def disable_hydration(name: str) -> None:
    dm.message(name, "disable_hydration")
