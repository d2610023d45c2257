#!/usr/bin/env bash
# The name of the box the kernel tests need: dmrecover/bookworm-<hash of build-box.sh>, so a
# changed recipe means a new box (build-box.sh builds it, the Vagrantfile boots it).
#   vagrant/box-name.sh              the box name
#   vagrant/box-name.sh --boot-dir   where that box's kernel and initrd are kept
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
hash=$(sha256sum "$here/build-box.sh" | cut -c1-12)
if [ "${1:-}" = --boot-dir ]; then
    echo "${DMRECOVER_BOOT_ROOT:-/var/lib/dmrecover-vagrant/boot}/$hash"
else
    echo "dmrecover/bookworm-$hash"
fi
