#!/usr/bin/env bash
# Remove what scripts/install.sh put on the system (nothing else): the dmrecover link in
# /usr/local/sbin, the udev rules, the session unit template, the man page and the bash
# completion. Sessions' state dirs (/var/lib/dmrecover) and this tree's .venv stay. A session
# whose boot unit is still enabled would no longer resume after a reboot: uninstall refuses
# then, unless --force. DESTDIR as for install.sh.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
dest=${DESTDIR:-}
force=0
case "${1:-}" in
    --force) force=1;;
    "") ;;
    *) echo "usage: scripts/uninstall.sh [--force]" >&2; exit 2;;
esac
if [ -z "$dest" ] && [ "$(id -u)" -ne 0 ]; then
    echo "uninstall: needs root: run it as root" >&2
    exit 1
fi
enabled=$(ls "$dest"/etc/systemd/system/*.wants/dmrecover-session@*.service 2>/dev/null || true)
if [ -n "$enabled" ] && [ $force -eq 0 ]; then
    echo "uninstall: sessions still resume at boot:" $(basename -a $enabled) \
        "- finish them (dmrecover status), or run this with --force" >&2
    exit 1
fi
removed=""
link="$dest/usr/local/sbin/dmrecover"
if [ -L "$link" ] && [ "$(readlink "$link")" = "$here/.venv/bin/dmrecover" ]; then
    rm -f "$link"
    removed="$removed /usr/local/sbin/dmrecover"
elif [ -e "$link" ] || [ -L "$link" ]; then
    echo "uninstall: leaving $link: it does not point into $here/.venv" >&2
fi
for f in /etc/udev/rules.d/56-dmrecover.rules /etc/systemd/system/dmrecover-session@.service \
         /usr/local/share/man/man8/dmrecover.8 /usr/share/bash-completion/completions/dmrecover
do
    if [ -e "$dest$f" ]; then
        rm -f "$dest$f"
        removed="$removed $f"
    fi
done
if [ -z "$dest" ]; then
    case "$removed" in *udev*)
        udevadm control --reload 2>/dev/null || true;; esac
    case "$removed" in *systemd*)
        [ -d /run/systemd/system ] && systemctl daemon-reload || true;; esac
fi
echo "uninstall: removed${removed:- nothing}"
