"""Fakes shared by the backend unit tests: the session layer's answers and mount entries."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from dmrecover.system.mounts import MountEntry


@dataclass
class FakeSessions:
    """A SessionLookup over declared state dirs: {dir: (live, state)}."""

    dirs: dict[str, tuple[bool, str | None]] = field(default_factory=dict)
    root: str = "/var/lib/dmrecover"

    def state_dir_of(self, path: str) -> str | None:
        d = os.path.dirname(path)
        while d not in self.dirs and d != "/":
            d = os.path.dirname(d)
        return d if d in self.dirs else None

    def state_dir_for(self, session: str) -> str:
        return os.path.join(self.root, session)

    def is_live(self, state_dir: str) -> bool:
        return self.dirs.get(state_dir, (False, None))[0]

    def state(self, state_dir: str) -> str | None:
        return self.dirs.get(state_dir, (False, None))[1]


def mount_entry(target: str, source: str, fstype: str = "ext4") -> MountEntry:
    return MountEntry(mount_id=1, parent_id=0, major=0, minor=0, root="/", target=target,
                      options="rw", fstype=fstype, source=source, super_options="rw")
