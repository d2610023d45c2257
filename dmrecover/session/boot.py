"""A session survives a reboot: a systemd unit resumes it at boot.

`live-restore` enables `dmrecover-session@<session>.service` where systemd runs (PID 1); at
boot the unit runs `python -m dmrecover.session.boot <session>`, which rebuilds the stack from the
persisted state (the COW file keeps every acknowledged write, the restored map what is on
DEST), mounts the pseudo-volume, starts the application and resumes the restore, in the
foreground of the unit. A session that is done or aborted disables its unit instead.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import dmrecover
from dmrecover.errors import DmrecoverError, SessionError
from dmrecover.session.control import load_session, resume_session
from dmrecover.session.record import ACTIVE_STATES, state_root
from dmrecover.system import command

log = logging.getLogger(__name__)

UNIT_DIR = Path("/etc/systemd/system")
TEMPLATE = "dmrecover-session@.service"


def packaged_unit() -> Path:
    """The unit template shipped with the package (systemd/ in the source tree)."""
    return Path(dmrecover.__file__).with_name("data") / TEMPLATE


def systemd_running() -> bool:
    """True when systemd is the init system (units can be enabled and will run at boot)."""
    return Path("/run/systemd/system").is_dir()


def unit_name(session: str) -> str:
    escaped = command.run(["systemd-escape", session]).stdout.strip()
    return f"dmrecover-session@{escaped}.service"


def unit_text(python: str, root: str) -> str:
    """The shipped template with this interpreter and state root filled in."""
    try:
        template = packaged_unit().read_text()
    except OSError as err:
        raise SessionError(f"the packaged unit {packaged_unit()} is unreadable: {err}",
                           hint="reinstall dmrecover") from err
    return template.replace("@PYTHON@", python).replace("@STATE_ROOT@", root)


def enable(session: str) -> bool:
    """Install the unit template (if changed) and enable the session's instance (not start:
    the session process runs already). False where systemd does not run."""
    if not systemd_running():
        return False
    text = unit_text(sys.executable, state_root())
    path = UNIT_DIR / TEMPLATE
    if not path.exists() or path.read_text() != text:
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        command.run(["systemctl", "daemon-reload"], what="systemctl daemon-reload")
    command.run(["systemctl", "enable", "--quiet", unit_name(session)],
                what=f"enabling the boot unit of session {session}")
    # The unit and its enablement must survive a power cut right after this (an empty unit
    # file reads as "masked"): systemctl does not sync what it writes.
    os.sync()
    log.info("enabled %s", unit_name(session))
    return True


def disable(session: str) -> None:
    if systemd_running():
        command.run(["systemctl", "disable", "--quiet", unit_name(session)], check=False)


def main(argv: list[str] | None = None) -> int:
    """The unit's command: resume the session in the foreground, unless it is finished.
    It reports through logging (the journal), like the session process itself."""
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s: %(message)s")
    if len(argv) != 1:
        log.error("usage: python -m dmrecover.session.boot SESSION")
        return 2
    name = argv[0]
    try:
        record = load_session(name)
        if record.state not in ACTIVE_STATES:  # done, aborted, failed: the operator decides
            log.info("session %s is %s: disabling its boot unit", name, record.state)
            disable(name)
            return 0
        if record.alive():
            log.info("session %s runs already", name)
            return 0
        resume_session(name, foreground=True)
        return 0
    except DmrecoverError as err:
        log.error("dmrecover: error: %s", err)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
