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

from dmrecover.system import command

log = logging.getLogger(__name__)

UNIT_DIR = Path("/etc/systemd/system")
TEMPLATE = "dmrecover-session@.service"


def systemd_running() -> bool:
    """True when systemd is the init system (units can be enabled and will run at boot)."""
    return Path("/run/systemd/system").is_dir()


def unit_name(session: str) -> str:
    escaped = command.run(["systemd-escape", session]).stdout.strip()
    return f"dmrecover-session@{escaped}.service"


def unit_text(python: str, state_root: str) -> str:
    return f"""[Unit]
Description=dmrecover live-restore session %I
Documentation=man:dmrecover(8)
After=local-fs.target systemd-udevd.service systemd-modules-load.service
Wants=systemd-udevd.service
StartLimitIntervalSec=600
StartLimitBurst=5

[Service]
Type=simple
Environment=DMRECOVER_STATE_ROOT={state_root}
ExecStart={python} -m dmrecover.session.boot %I
# SIGTERM (shutdown) goes to the session process only: it stops the application and takes
# the stack down itself. The application it started lives in this unit's cgroup and must keep
# running when the session process exits after the cutover: so no killing of the cgroup.
KillMode=process
TimeoutStopSec=300
Restart=on-failure
RestartSec=5

[Install]
WantedBy=multi-user.target
"""


def enable(session: str) -> bool:
    """Install the unit template (if changed) and enable the session's instance (not start:
    the session process runs already). False where systemd does not run."""
    from dmrecover.session.session import state_root

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
    """The unit's command: resume the session in the foreground, unless it is finished."""
    from dmrecover.errors import DmrecoverError
    from dmrecover.session.session import ACTIVE_STATES, Session, resume_session

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m dmrecover.session.boot SESSION", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s: %(message)s")
    name = argv[0]
    try:
        sess = Session.load(name)
        if sess.state not in ACTIVE_STATES:  # done, aborted, failed: the operator decides
            print(f"session {name} is {sess.state}: disabling its boot unit")
            disable(name)
            return 0
        if sess.alive():
            print(f"session {name} runs already")
            return 0
        return resume_session(name, foreground=True)
    except DmrecoverError as err:
        print(f"dmrecover: error: {err}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
