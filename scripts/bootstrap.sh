#!/usr/bin/env bash
# Everything dmrecover needs on a fresh Debian 12 machine, as root: apt packages, a venv in
# .venv with dmrecover installed (editable) and its test tools, then scripts/install.sh puts
# `dmrecover` on root's PATH (/usr/local/sbin), the udev rules, the session unit, the man page
# and the bash completion where they belong (scripts/uninstall.sh removes them).
# Idempotent: a second run is quick.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
if [ "$(id -u)" -ne 0 ]; then
    echo "bootstrap: needs root (apt packages, loop devices): run it as root" >&2
    exit 1
fi
pkgs=$(grep -v '^\s*#' scripts/apt-packages.txt | grep -v '^\s*$' | tr '\n' ' ')
missing=""
for p in $pkgs; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "bootstrap: installing$missing"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing >/dev/null
fi
# Debian's own python3, with system site packages: blivet's GObject bindings (gi) come from
# Debian, the rest from PyPI.
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import gi' 2>/dev/null; then
    rm -rf .venv
    /usr/bin/python3 -m venv --system-site-packages .venv
fi
# Every module of the install_requires and the test and lvm extras in setup.cfg: one missing (a
# new dependency since the last run) reinstalls. blivet is looked up, not imported (its import
# talks to DBus).
if ! .venv/bin/python -c 'import dmrecover, blake3, zstandard, pyudev, psutil, rich, boto3, cryptography, pytest, hypothesis, importlinter' 2>/dev/null \
        || ! .venv/bin/python -c 'import importlib.util as u; raise SystemExit(u.find_spec("blivet") is None)' \
        || [ ! -x .venv/bin/ruff ]; then
    .venv/bin/pip install -q --upgrade pip >/dev/null
    .venv/bin/pip install -q -e ".[test,lvm]"
fi
scripts/install.sh
echo "bootstrap: ready: dmrecover (/usr/local/sbin/dmrecover -> $here/.venv/bin/dmrecover)"
