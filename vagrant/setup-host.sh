#!/usr/bin/env bash
# Prepare this host to run the Vagrant VM tests: vagrant with the libvirt provider under qemu's
# software emulation (no KVM here), plus what vagrant/build-box.sh needs. Idempotent. Starts
# virtlogd and libvirtd by hand when no systemd runs as PID 1 (containers, CI runners).
set -euo pipefail

pkgs=(vagrant vagrant-libvirt libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients
      dnsmasq-base debootstrap qemu-utils qemu-system-x86 ovmf iptables rsync openssh-client
      python3-venv python3-pip)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup-host: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# libvirt's daemons: through systemd when it runs, else by hand.
if [ "$(cat /proc/1/comm 2>/dev/null)" = systemd ]; then
    systemctl start virtlogd libvirtd
else
    # Daemons keep no descriptor of the caller (a lock held by run-kernel-tests.sh, say).
    pgrep -x virtlogd >/dev/null || virtlogd -d 9>&- 8>&-
    pgrep -x libvirtd >/dev/null || libvirtd -d 9>&- 8>&-
fi
for _ in $(seq 1 30); do
    virsh -c qemu:///system version >/dev/null 2>&1 && break
    sleep 1
done
# Read the capabilities whole first: with pipefail, `grep -q` closing the pipe early would make
# virsh die of SIGPIPE and the check fail at random.
caps=$(virsh -c qemu:///system capabilities 2>/dev/null || true)
if ! grep -q "domain type='qemu'" <<<"$caps"; then
    echo "setup-host: libvirt offers no qemu domain type for this host" >&2
    exit 1
fi
echo "setup-host: libvirt ready (qemu:///system)"
