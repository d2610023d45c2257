"""Fakes for driving the session state machine without root: a backend whose presentation
records every step (and fails at a chosen one), an application, a pseudo-volume and a host.

They share one `events` list, so a test can assert the order in which the session did things.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dmrecover.backends.base import (
    Backend,
    BackendContext,
    Leftover,
    Presentation,
    SessionLookup,
    UndoStack,
)
from dmrecover.errors import AppError, SessionError, StackError
from dmrecover.session.app import AppHandle, AppSpec
from dmrecover.session.record import SessionRecord, State
from dmrecover.session.runner import SessionRunner
from dmrecover.session.services import Services

BUILD_STEPS = ("origin", "device", "mount")


class FakePresentation(Presentation):
    def __init__(self, backend: FakeBackend, volume: Any, ctx: BackendContext) -> None:
        self.backend = backend
        self.volume = volume
        self.ctx = ctx
        self.undo = UndoStack()

    def build(self) -> None:
        b = self.backend
        try:
            for step in BUILD_STEPS:
                if b.fail_at == step:
                    raise StackError(f"fake failure at {step}")
                b.events.append(f"build:{step}")
                b.live.add(step)
                self.undo.push(step, lambda s=step: self._undo(s))
                if self.ctx.on_change is not None:
                    self.ctx.on_change(self.devices())
        except BaseException:
            self.undo.unwind()
            raise

    def _undo(self, step: str) -> None:
        self.backend.events.append(f"undo:{step}")
        self.backend.live.discard(step)

    def teardown(self) -> list[str]:
        if self.backend.busy:
            raise StackError(f"{self.ctx.mountpoint} is busy")
        self.backend.events.append("teardown")
        self.undo.pop("mount")()
        return self.undo.unwind()

    def devices(self) -> dict:
        return {"fake": sorted(self.backend.live)}

    def online_cutover(self, dest: str, *,
                       on_phase: Callable[[str], None] | None = None) -> float:
        self.backend.events.append("online-cutover")
        if on_phase is not None:
            on_phase("merging")
        if self.backend.fail_online:
            raise StackError("fake online merge failure")
        return 0.002


class FakeBackend(Backend):
    name = "fake"
    description = "records calls; fails where told"

    def __init__(self, events: list[str] | None = None, *, online: bool = False) -> None:
        self.events = events if events is not None else []
        self.supports_online_cutover = online  # type: ignore[misc] - per instance here
        self.fail_at: str | None = None  # a BUILD_STEPS step
        self.fail_merge = False
        self.fail_online = False
        self.busy = False  # teardown refused: something holds the mount
        self.live: set[str] = set()  # what the presentation built and did not undo
        self.dead_torn_down = 0
        self.source_waits = False  # a dead session's kernel side waits for its source

    def dead_source_waits(self, ctx: BackendContext) -> bool:
        return self.source_waits

    def serve_dead_source(self, volume: Any, ctx: BackendContext) -> Callable[[], None]:
        self.events.append("serve-source")
        return lambda: self.events.append("stop-serving")

    def probe(self) -> None:
        return None

    def present(self, volume: Any, ctx: BackendContext) -> FakePresentation:
        return FakePresentation(self, volume, ctx)

    def merge_into_dest(self, volume: Any, ctx: BackendContext) -> int:
        if self.fail_merge:
            raise StackError("fake merge failure")
        self.events.append("merge")
        volume.merged = True
        return 4096

    def finish_online_cutover(self, ctx: BackendContext) -> None:
        self.events.append("finish-online")

    def teardown_dead(self, ctx: BackendContext) -> list[str]:
        self.events.append("teardown-dead")
        self.dead_torn_down += 1
        self.live.clear()
        return ["removed the fake stack"]

    def leftovers(self, sessions: SessionLookup) -> list[Leftover]:
        return []

    def remove_leftover(self, item: Leftover) -> None:
        return None


class FakeApp:
    def __init__(self, events: list[str]) -> None:
        self.events = events
        self.handle = AppHandle()
        self.spec = AppSpec(start="fake")
        self.running = False
        self.fail_start = False
        self.starts = 0
        self.tracking_warning: str | None = None
        self.stop_warnings: list[str] = []  # what stop() returns (the escalation's steps)

    def start(self) -> AppHandle:
        if self.fail_start:
            raise AppError("fake application would not start")
        self.starts += 1
        self.events.append("app:start")
        self.running = True
        self.handle = AppHandle(pid=1000 + self.starts)
        return self.handle

    def stop(self) -> list[str]:
        self.events.append("app:stop")
        self.running = False
        return list(self.stop_warnings)

    def state(self) -> str:
        return "running" if self.running else "stopped"

    def processes(self) -> list:
        return []

    def status(self) -> dict:
        return {"tracking": "fake"}

    def release(self) -> None:
        self.events.append("app:release")


class FakeRestorer:
    def __init__(self, volume: FakeVolume) -> None:
        self.volume = volume
        self.running = False

    def stats(self) -> dict:
        return {"error": self.volume.restore_error} if self.volume.restore_error else {}


class FakeVolume:
    """Restores at once when `instant` (else when the test sets `restored`)."""

    def __init__(self, events: list[str], *, instant: bool = True) -> None:
        self.events = events
        self.instant = instant
        self.restored = False
        self.merged = False
        self.closed = False
        self.discarded = False
        self.restore_error: str | None = None
        self.restorer = FakeRestorer(self)
        self.on_restored: Callable[[], None] | None = None

    def start_restore(self) -> None:
        self.events.append("restore:start")
        if self.instant:
            self.restored = True
            if self.on_restored is not None:
                self.on_restored()

    def stop_restore(self) -> None:
        self.restorer.running = False

    def restored_all(self) -> bool:
        return self.restored

    def wait_restored(self, timeout: float | None = None) -> bool:
        self.restored = True
        return True

    def flush(self) -> None:
        return None

    def stats(self) -> dict:
        return {"total_bytes": 1 << 20, "restored_bytes": (1 << 20) if self.restored else 0}

    def discard_overlay(self) -> None:
        if not self.merged:
            raise SessionError("refusing to discard the overlay: it is not merged")
        self.events.append("discard")
        self.discarded = True

    def close(self) -> None:
        self.closed = True


@dataclass
class FakeHost:
    events: list[str]
    stray: str | None = None
    mounted: list[str] = field(default_factory=list)

    def stray_holders(self, mountpoint: str, mine: set[int]) -> str | None:
        return self.stray

    def mount_dest(self, dest: str, mountpoint: str, fstype: str | None,
                   on_loop: Callable[[str], None]) -> None:
        self.events.append("mount-dest")
        self.mounted.append(mountpoint)


@dataclass
class World:
    """One fake world: every fake shares `events`."""

    events: list[str]
    backend: FakeBackend
    app: FakeApp
    volume: FakeVolume
    host: FakeHost

    def services(self, record: SessionRecord | None = None) -> Services:
        def open_volume(rec: SessionRecord, backend: Backend,
                        on_restored: Callable[[], None] | None) -> Any:
            self.volume.on_restored = on_restored
            self.events.append("open-volume")
            return self.volume

        return Services(backend=self.backend, app=self.app, open_volume=open_volume,
                        host=self.host)

    def get_backend(self, name: str) -> Backend:
        assert name == "fake", name
        return self.backend


def make_world(*, online: bool = False, instant: bool = True) -> World:
    events: list[str] = []
    return World(events, FakeBackend(events, online=online), FakeApp(events),
                 FakeVolume(events, instant=instant), FakeHost(events))


def make_record(state_dir: Path, *, cutover: str = "auto", name: str = "s") -> SessionRecord:
    """A session as live-restore leaves it: configured, state starting."""
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / "mnt").mkdir(exist_ok=True)
    r = SessionRecord(state_dir=str(state_dir), name=name, repo="/repo", backup="b1",
                      backup_name="vol", size=1 << 20, chunk_size=65536, fstype="ext4",
                      dest=str(state_dir / "dest.img"), mountpoint=str(state_dir / "mnt"),
                      app=AppSpec(start="fake"), backend="fake", cutover_mode=cutover,
                      engine_dir=str(state_dir), timings={"command_started": 1.0})
    r.set_state(State.STARTING)
    return r


def brought_up(world: World, record: SessionRecord) -> SessionRunner:
    """A session runner over the world's fakes, opened and brought up: the stack is built and
    the application runs on the pseudo-volume."""
    runner = SessionRunner(record, world.services())
    runner.open()
    runner.bring_up()
    return runner
