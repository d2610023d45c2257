#!/usr/bin/env bash
# Build the Debian 12 Vagrant box (libvirt provider) that the kernel tests run in, from Debian's
# own packages: no box is downloaded. Skips the build when the box is already added and its boot
# files are in place. About 4-5 minutes on 2 cores without KVM.
#
#   vagrant/build-box.sh            build and add the box if missing
#   vagrant/build-box.sh --force    rebuild and re-add it
#
# The image has no bootloader: the VM boots the guest's kernel and initrd directly (the project's
# Vagrantfile points libvirt at them), so they are copied to $DMRECOVER_BOOT_DIR, which must be
# readable by the libvirt-qemu user.
set -euo pipefail

BOX_NAME=${DMRECOVER_BOX:-dmrecover/bookworm}
BOOT_DIR=${DMRECOVER_BOOT_DIR:-/var/lib/dmrecover-vagrant/boot}
WORK=${DMRECOVER_BOX_WORK:-/var/tmp/dmrecover-box}
SUITE=bookworm
force=0
[ "${1:-}" = --force ] && force=1

if [ $force -eq 0 ] && grep -q "^${BOX_NAME} " <<<"$(vagrant box list 2>/dev/null)" \
        && [ -r "$BOOT_DIR/vmlinuz" ] && [ -r "$BOOT_DIR/initrd.img" ]; then
    echo "build-box: box $BOX_NAME already added, boot files in $BOOT_DIR: nothing to do"
    exit 0
fi

[ "$(id -u)" -eq 0 ] || { echo "build-box: run as root (debootstrap, chroot)" >&2; exit 1; }

# The Debian mirror apt on this host uses (first deb.debian.org-style URI of the main archive).
mirror=${DMRECOVER_MIRROR:-}
if [ -z "$mirror" ]; then
    mirror=$(apt-get indextargets --format '$(REPO_URI)' 'Origin: Debian' \
             2>/dev/null | grep -v security | head -n1 || true)
    mirror=${mirror:-http://deb.debian.org/debian/}
fi

pub=$(ls /usr/share/rubygems-integration/all/gems/vagrant-*/keys/vagrant.pub 2>/dev/null | head -n1 || true)
[ -n "$pub" ] || pub=$(find / -xdev -path '*vagrant*/keys/vagrant.pub' 2>/dev/null | head -n1)
[ -n "$pub" ] || { echo "build-box: Vagrant's keys/vagrant.pub not found (install vagrant)" >&2; exit 1; }

root="$WORK/root"
cleanup() {
    for m in dev/pts dev proc sys; do
        mountpoint -q "$root/$m" 2>/dev/null && umount -l "$root/$m"
    done
    return 0
}
trap cleanup EXIT
cleanup
rm -rf "$WORK"
mkdir -p "$WORK"

pkgs=(
    # a small real server: systemd as PID 1, udevd, ssh, DHCP
    systemd-sysv udev dbus kmod openssh-server sudo ifupdown isc-dhcp-client iproute2 netbase
    ca-certificates procps psmisc util-linux linux-image-amd64 initramfs-tools rsync
    # what dmrecover and its kernel tests need
    python3 python3-venv python3-pyfuse3 python3-trio fuse3 dmsetup lvm2 xfsprogs e2fsprogs
    sqlite3
)
echo "build-box: debootstrap $SUITE from $mirror"
t0=$(date +%s)
debootstrap --variant=minbase --include="$(IFS=,; echo "${pkgs[*]}")" \
    "$SUITE" "$root" "$mirror" >"$WORK/debootstrap.log" 2>&1 \
    || { tail -n 30 "$WORK/debootstrap.log" >&2; exit 1; }
echo "build-box: debootstrap done in $(( $(date +%s) - t0 ))s"

echo dmrecover-vm >"$root/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\tdmrecover-vm\n' >"$root/etc/hosts"
echo '/dev/vda / ext4 rw,errors=remount-ro 0 1' >"$root/etc/fstab"
cat >"$root/etc/network/interfaces" <<'NET'
auto lo
iface lo inet loopback
auto eth0
iface eth0 inet dhcp
NET
printf 'virtio_pci\nvirtio_blk\nvirtio_net\next4\n' >>"$root/etc/initramfs-tools/modules"
# The guest resolves the host's apt mirror the same way the host does.
cp /etc/apt/sources.list "$root/etc/apt/sources.list" 2>/dev/null || true
if [ -d /etc/apt/sources.list.d ]; then
    for f in /etc/apt/sources.list.d/debian.sources; do
        [ -f "$f" ] && cp "$f" "$root/etc/apt/sources.list.d/"
    done
fi

mount -t proc proc "$root/proc"
mount -t sysfs sys "$root/sys"
mount --bind /dev "$root/dev"
mount --bind /dev/pts "$root/dev/pts"
chroot "$root" /bin/sh -eu <<'CHROOT'
useradd -m -s /bin/bash -G sudo vagrant
echo 'vagrant:vagrant' | chpasswd
printf 'vagrant ALL=(ALL) NOPASSWD: ALL\nDefaults:vagrant !requiretty\n' >/etc/sudoers.d/vagrant
chmod 0440 /etc/sudoers.d/vagrant
install -d -m 0700 -o vagrant -g vagrant /home/vagrant/.ssh
echo 'UseDNS no' >/etc/ssh/sshd_config.d/vagrant.conf
systemctl enable ssh networking >/dev/null 2>&1
# Timers that would compete with the tests for the emulated CPU.
systemctl mask apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer \
    man-db.timer >/dev/null 2>&1 || true
update-initramfs -u -k all >/dev/null
CHROOT
install -m 0600 -o 1000 -g 1000 "$pub" "$root/home/vagrant/.ssh/authorized_keys"
cleanup

mkdir -p "$BOOT_DIR"
cp "$(readlink -f "$root/vmlinuz")" "$BOOT_DIR/vmlinuz.new"
cp "$(readlink -f "$root/initrd.img")" "$BOOT_DIR/initrd.img.new"
chmod 0644 "$BOOT_DIR"/*.new
mv "$BOOT_DIR/vmlinuz.new" "$BOOT_DIR/vmlinuz"
mv "$BOOT_DIR/initrd.img.new" "$BOOT_DIR/initrd.img"
chmod 0755 "$BOOT_DIR" "$(dirname "$BOOT_DIR")"

echo "build-box: making the disk image"
rm -rf "$root/var/cache/apt/archives/"*.deb
truncate -s 8G "$WORK/rootfs.img"
mkfs.ext4 -q -F -L root -d "$root" "$WORK/rootfs.img"
qemu-img convert -O qcow2 -c "$WORK/rootfs.img" "$WORK/box.img"
rm -f "$WORK/rootfs.img"
echo '{"provider": "libvirt", "format": "qcow2", "virtual_size": 8}' >"$WORK/metadata.json"
cat >"$WORK/Vagrantfile" <<'VF'
Vagrant.configure("2") do |config|
  config.vm.provider :libvirt do |libvirt|
    libvirt.driver = "qemu"
  end
end
VF
tar -C "$WORK" -cf "$WORK/dmrecover.box" metadata.json Vagrantfile box.img
# A re-added box must also replace the copy libvirt's storage pool keeps of the old image.
if grep -q "^${BOX_NAME} " <<<"$(vagrant box list 2>/dev/null)"; then
    vagrant box remove -f --all "$BOX_NAME" >/dev/null
    for v in $(virsh -c qemu:///system vol-list default 2>/dev/null | awk -v b="${BOX_NAME//\//-VAGRANTSLASH-}" 'index($1, b) == 1 {print $1}'); do
        virsh -c qemu:///system vol-delete --pool default "$v" >/dev/null || true
    done
fi
vagrant box add -f --name "$BOX_NAME" "$WORK/dmrecover.box" >/dev/null
rm -rf "$WORK"
echo "build-box: box $BOX_NAME added in $(( $(date +%s) - t0 ))s"
