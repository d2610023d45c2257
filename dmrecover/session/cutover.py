"""The cutover: from the pseudo-volume to DEST, as an explicit state machine.

Restart mode, one method per persisted phase, in the order of `RESTART_PHASES`:

    stop-app    stop the application (escalating: stop command, SIGTERM, SIGKILL), then
                look for processes other than the application holding the mount: if any,
                the cutover is refused, the application starts again on the pseudo-volume
                (never left stopped), the state is back to ready and the refusal names them.
                Looked at after the stop, not before: a daemon the start command forked
                holds the mount too, and only the stop says what is left.
    unmount     tear the presentation down (refused -> the application starts again on the
                pseudo-volume, the state is back to ready, the reason recorded)
    merge       finish the restore if needed, merge the overlay into DEST (idempotent)
    mount-dest  mount DEST at the mount point
    start-app   start the application on DEST
    discard     drop the overlay -> done

Each phase is persisted before it runs. A crash before merge resumes as a restore (the stack is
rebuilt, the application comes back on the pseudo-volume and the cutover runs again later);
from merge on, `run(resume=phase)` continues at that phase (every later phase is idempotent).

Online mode (`Backend.supports_online_cutover`): one phase, online-merge: DEST takes over under
the running application; a crash midway resumes as a restore.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from dmrecover.backends.base import Presentation
from dmrecover.engine.pseudovolume import PseudoVolume, mark_merged
from dmrecover.errors import StackError
from dmrecover.session.record import Phase, SessionRecord, State
from dmrecover.session.services import Services
from dmrecover.system import lvm
from dmrecover.testhooks import fault_point

log = logging.getLogger(__name__)

RESTART_PHASES = (Phase.STOP_APP, Phase.UNMOUNT, Phase.MERGE, Phase.MOUNT_DEST,
                  Phase.START_APP, Phase.DISCARD)
#: Phases a new session process continues; a crash in an earlier one resumes as a restore.
RESUMABLE_PHASES = RESTART_PHASES[RESTART_PHASES.index(Phase.MERGE):]

# Refuse(message, **record changes): records a refused request for the CLI waiting on it.
Refuse = Callable[..., None]


class Refused(Exception):
    """A phase declined to go on; the state was put back (the application runs)."""


class Cutover:
    """One cutover run over the session's record, services, volume and presentation."""

    def __init__(self, record: SessionRecord, services: Services, volume: PseudoVolume,
                 presentation: Presentation | None, refuse: Refuse) -> None:
        self.record = record
        self.services = services
        self.volume = volume
        self.presentation = presentation  # None when resumed (the stack is gone)
        self.refuse = refuse
        self.timings = dict(record.timings)
        self._steps: dict[Phase, Callable[[], None]] = {
            Phase.STOP_APP: self.stop_app,
            Phase.UNMOUNT: self.unmount,
            Phase.MERGE: self.merge,
            Phase.MOUNT_DEST: self.mount_dest,
            Phase.START_APP: self.start_app,
            Phase.DISCARD: self.discard,
        }

    # ------------------------------------------------------------ driver

    def run(self, resume: Phase | None = None) -> bool:
        """Run the restart cutover from the start, or from a persisted phase (one of
        RESUMABLE_PHASES). True when done; False when refused (the application runs on)."""
        if resume is None:
            first = 0
        else:
            if resume not in RESUMABLE_PHASES:
                raise ValueError(f"a cutover does not resume at phase {resume}")
            log.info("resuming the cutover at phase %s", resume)
            first = RESTART_PHASES.index(resume)
        for phase in RESTART_PHASES[first:]:
            extra = {"error": None} if phase == Phase.STOP_APP else {}
            self.record.set_state(State.CUTTING_OVER, phase=phase, timings=self.timings,
                                  **extra)
            try:
                self._steps[phase]()
            except Refused:
                return False
        self.timings["done"] = time.time()
        self.record.set_state(State.DONE, phase=None, timings=self.timings, pid=None,
                              error=None, app_started=True)
        return True

    # ------------------------------------------------------------ phases

    def stop_app(self) -> None:
        self.timings["cutover_started"] = time.time()
        app = self.services.app
        warnings = app.stop()
        self.timings["app_stopped"] = time.time()
        self.record.add_warnings(warnings)
        self.record.save(app_handle=app.handle.to_dict())  # its stop log, for status
        stray = self._stray_holders()
        if stray:
            r = self.record
            self._restart_on_pseudo_volume(
                f"cutover refused: {r.mountpoint} is held by {stray}, not by the "
                f"application; the application runs again on the pseudo-volume; "
                f"`dmrecover cutover {r.name}` retries once they are gone")

    def unmount(self) -> None:
        assert self.presentation is not None, "unmount runs in the process that built the stack"
        try:
            fault_point("cutover-unmount")
            # Problems after the unmount (a layer another mount namespace keeps busy): DEST is
            # safe, nothing writes through it any more; say so and go on.
            self.record.add_warnings(self.presentation.teardown())
        except StackError as err:
            self._restart_on_pseudo_volume(f"cutover refused: {err}")
        self.presentation = None
        self.timings["unmounted"] = time.time()

    def merge(self) -> None:
        v = self.volume
        self._finish_restore()
        fault_point("cutover-merge")
        self.timings["merged_bytes"] = self.services.backend.merge_into_dest(
            v, self.record.context())
        self.timings["merged"] = time.time()

    def mount_dest(self) -> None:
        r = self.record
        self.services.host.mount_dest(r.dest, r.mountpoint, r.fstype,
                                      on_loop=lambda dev: r.save(dest_loop=dev))
        self.timings["dest_mounted"] = time.time()

    def start_app(self) -> None:
        handle = self.services.app.start()
        t = self.timings
        t["app_restarted"] = time.time()
        if "cutover_started" in t:
            # downtime: from the moment the application is told to stop until it runs again
            t["cutover_downtime"] = t["app_restarted"] - t["cutover_started"]
        self.record.save(app_handle=handle.to_dict(), app_started=True, timings=t)

    def discard(self) -> None:
        self.volume.discard_overlay()
        self._remove_overlay_lvs()

    # ------------------------------------------------------------ online

    def run_online(self) -> bool:
        """DEST takes over under the running application (the backend swaps the device in
        place); the application is never stopped. A crash midway resumes as a restore."""
        assert self.presentation is not None
        r = self.record
        self.timings["cutover_started"] = time.time()
        r.set_state(State.CUTTING_OVER, phase=Phase.ONLINE_MERGE, error=None,
                    timings=self.timings)
        self._finish_restore()
        self.volume.flush()
        pause = self.presentation.online_cutover(
            r.dest, on_phase=lambda p: r.save(online_phase=p))
        # "merged" before the backend drops what the merge consumed: resume trusts it.
        mark_merged(r.engine_path)
        self.services.backend.finish_online_cutover(r.context())
        self._remove_overlay_lvs()
        t = self.timings
        t["online_max_pause"] = pause
        t["merged"] = t["done"] = time.time()
        t["cutover_downtime"] = 0.0
        r.set_state(State.DONE, phase=None, timings=t, pid=None, error=None, app_started=True,
                    devices=self.presentation.devices())
        return True

    # ------------------------------------------------------------ helpers

    def _finish_restore(self) -> None:
        v = self.volume
        v.stop_restore()
        if not v.restored_all():
            # Crash right after the restore ended, before its map was synced: finish it.
            v.start_restore()
            v.wait_restored()
            v.stop_restore()

    def _remove_overlay_lvs(self) -> None:
        """The merged COW's or the clone metadata's LV (--overlay VG) is of no more use; DEST's
        LV (--dest-vg) holds the data and stays. Idempotent (a resumed discard)."""
        r = self.record
        gone = [lvm.LogicalVolume.from_dict(d) for d in r.lvs if d.get("role") != "dest"]
        if gone:
            r.add_warnings(lvm.remove_all(r.name, gone))

    def _restart_on_pseudo_volume(self, message: str) -> None:
        """The cutover cannot go on: start the application again on the pseudo-volume (it is
        never left stopped), back to ready, record the refusal; raises Refused."""
        handle = self.services.app.start()
        self.record.set_state(State.READY, phase=None, app_handle=handle.to_dict())
        self.refuse(message, cutover_requested=False)
        raise Refused(message)

    def _stray_holders(self) -> str | None:
        mine = {p.pid for p in self.services.app.processes()}
        return self.services.host.stray_holders(self.record.mountpoint, mine)
