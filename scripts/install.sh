#!/usr/bin/env bash
# Put dmrecover where a real system looks for it, as root (scripts/bootstrap.sh runs this):
#   /usr/local/sbin/dmrecover                         -> this tree's .venv/bin/dmrecover
#   /etc/udev/rules.d/56-dmrecover.rules              udev rules for the dm backend's devices
#   /etc/systemd/system/dmrecover-session@.service    the unit that resumes a session at boot
#   /usr/local/share/man/man8/dmrecover.8             dmrecover(8), generated from the parser
#   /usr/share/bash-completion/completions/dmrecover  bash completion, generated from the parser
# Idempotent: a file is rewritten only when its content changed. scripts/uninstall.sh removes
# exactly these. DESTDIR=/some/dir installs under that directory instead (for tests and
# packaging): nothing is reloaded then.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
dest=${DESTDIR:-}
py="$here/.venv/bin/python"
if [ -z "$dest" ] && [ "$(id -u)" -ne 0 ]; then
    echo "install: needs root (it writes to /usr/local, /etc): run it as root" >&2
    exit 1
fi
if [ ! -x "$here/.venv/bin/dmrecover" ]; then
    echo "install: $here/.venv/bin/dmrecover is missing: run scripts/bootstrap.sh first" >&2
    exit 1
fi
changed=""

# put FILE MODE: move the new content from stdin into $dest$FILE when it differs
put() {
    local target="$dest$1" mode=$2 tmp
    mkdir -p "$(dirname "$target")"
    tmp=$(mktemp "$target.XXXXXX")
    cat >"$tmp"
    chmod "$mode" "$tmp"
    if [ -f "$target" ] && [ ! -L "$target" ] && cmp -s "$tmp" "$target"; then
        rm -f "$tmp"
        return
    fi
    mv -f "$tmp" "$target"
    changed="$changed $1"
}

link="$dest/usr/local/sbin/dmrecover"
mkdir -p "$(dirname "$link")"
if [ -e "$link" ] && [ ! -L "$link" ]; then
    echo "install: $link exists and is not a link: move it away, then run this again" >&2
    exit 1
fi
if [ "$(readlink "$link" 2>/dev/null)" != "$here/.venv/bin/dmrecover" ]; then
    ln -sfn "$here/.venv/bin/dmrecover" "$link"
    changed="$changed /usr/local/sbin/dmrecover"
fi
put /etc/udev/rules.d/56-dmrecover.rules 0644 <"$here/udev/56-dmrecover.rules"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The unit with this interpreter and the state root filled in, as `live-restore` writes it.
"$py" -c 'import sys
from dmrecover.session.boot import unit_text
from dmrecover.session.record import state_root
sys.stdout.write(unit_text(sys.executable, state_root()))' >"$work/unit"
put /etc/systemd/system/dmrecover-session@.service 0644 <"$work/unit"
"$py" -m dmrecover.cli.manpage man >"$work/man"
put /usr/local/share/man/man8/dmrecover.8 0644 <"$work/man"
"$py" -m dmrecover.cli.manpage bash-completion >"$work/completion"
put /usr/share/bash-completion/completions/dmrecover 0644 <"$work/completion"

if [ -z "$dest" ]; then
    case "$changed" in *udev*)
        udevadm control --reload 2>/dev/null || true;; esac
    case "$changed" in *systemd*)
        [ -d /run/systemd/system ] && systemctl daemon-reload || true;; esac
fi
if [ -n "$changed" ]; then
    echo "install: installed$changed"
fi
