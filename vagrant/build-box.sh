#!/usr/bin/env bash
# Build the Debian 12 Vagrant box (libvirt provider) that the kernel tests run in, from Debian's
# own packages: no box is downloaded. Skips the build when the box is already added and its boot
# files are in place. About 4-5 minutes on 2 cores without KVM.
#
#   vagrant/build-box.sh            build and add the box if missing
#   vagrant/build-box.sh --force    rebuild and re-add it
#
# The box's name carries a hash of this script (vagrant/box-name.sh): a changed recipe (a
# package, the dm-clone module) is a new box, so a machine that cached an older box builds the
# right one instead of testing on a stale image. Older boxes of this recipe are removed.
#
# Debian builds no dm-clone (`clone` target, CONFIG_DM_CLONE unset): the box gets dm-clone.ko
# built out of tree from Debian's linux-source for the box's own kernel (same suite, so the
# source, headers and image versions match), in /lib/modules/KVER/updates; the compiler and the
# sources are purged again afterwards.
#
# The image has no bootloader: the VM boots the guest's kernel and initrd directly (the project's
# Vagrantfile points libvirt at them), so they are copied to $DMRECOVER_BOOT_DIR, which must be
# readable by the libvirt-qemu user.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
BOX_NAME=${DMRECOVER_BOX:-$("$here/box-name.sh")}
BOOT_DIR=${DMRECOVER_BOOT_DIR:-$("$here/box-name.sh" --boot-dir)}
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
    # (debootstrap resolves no virtual package: python3-cffi-backend provides cryptography's
    # python3-cffi-backend-api-min/max)
    python3-cryptography python3-cffi-backend python3-psycopg2
    sqlite3 fio
    # a real application for the --app-unit tests (its unit: postgresql@15-main)
    postgresql-15
    # building dm-clone.ko (purged after the build)
    linux-headers-amd64 linux-source-6.1 make gcc xz-utils
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

# dm-clone.ko for the box's kernel, from the box's own linux-source (recipe:
# ../shared/DM-CLONE.md), then the build tools go again.
build_dm_clone() {
    chroot "$root" /bin/sh -eu <<'CHROOT'
kver=$(ls /lib/modules | head -n1)
b=/root/build-dm-clone
mkdir -p $b/persistent-data
cd /root
tar -xJf /usr/src/linux-source-6.1.tar.xz --wildcards 'linux-source-6.1/drivers/md/*'
s=/root/linux-source-6.1/drivers/md
cp $s/dm-clone-target.c $s/dm-clone-metadata.c $s/dm-clone-metadata.h $s/dm.h $s/dm-stats.h $b/
for h in dm-bitset.h dm-array.h dm-btree.h dm-block-manager.h dm-space-map-metadata.h \
         dm-space-map.h dm-transaction-manager.h; do
    cp $s/persistent-data/$h $b/persistent-data/
done
printf 'obj-m := dm-clone.o\ndm-clone-y := dm-clone-target.o dm-clone-metadata.o\n' >$b/Kbuild
make -s -C /lib/modules/$kver/build M=$b modules >$b/build.log 2>&1 || { tail -n 30 $b/build.log; exit 1; }
install -D -m 0644 $b/dm-clone.ko /lib/modules/$kver/updates/dm-clone.ko
depmod -a $kver
modinfo -F vermagic /lib/modules/$kver/updates/dm-clone.ko
rm -rf $b /root/linux-source-6.1
# debootstrap marks nothing automatic: name what the build pulled in.
pk=$(dpkg-query -W -f='${Package}\n' 'linux-headers-*' 'linux-kbuild-*' 'linux-compiler-gcc-*' \
     'linux-source-*' gcc gcc-12 cpp cpp-12 make 2>/dev/null || true)
DEBIAN_FRONTEND=noninteractive apt-get purge -y -qq $pk >/dev/null \
    || echo "build-box: warning: could not purge the build tools" >&2
rm -f /usr/src/linux-source-6.1.tar.xz
CHROOT
    echo "build-box: dm-clone.ko built for $(ls "$root/lib/modules" | head -n1)"
}

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
# blivet (the LVM-backed overlay and DEST, issue 11) runs on Debian's libblockdev 2 and its
# gobject bindings: installed with apt's own resolver (debootstrap resolves no virtual package,
# and libblockdev-plugins-all pulls in a dozen plugins), from the host's mirror.
cp /etc/resolv.conf "$root/etc/resolv.conf"
chroot "$root" /bin/sh -eu <<'CHROOT'
apt-get update -qq >/dev/null
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    python3-gi python3-blockdev python3-bytesize python3-parted gir1.2-blockdev-2.0 \
    libblockdev-plugins-all >/dev/null
apt-get clean
CHROOT
build_dm_clone

install -m 0600 -o 1000 -g 1000 "$pub" "$root/home/vagrant/.ssh/authorized_keys"
cleanup

mkdir -p "$BOOT_DIR"
cp "$(readlink -f "$root/vmlinuz")" "$BOOT_DIR/vmlinuz.new"
cp "$(readlink -f "$root/initrd.img")" "$BOOT_DIR/initrd.img.new"
chmod 0644 "$BOOT_DIR"/*.new
mv "$BOOT_DIR/vmlinuz.new" "$BOOT_DIR/vmlinuz"
mv "$BOOT_DIR/initrd.img.new" "$BOOT_DIR/initrd.img"
chmod 0755 "$BOOT_DIR" "$(dirname "$BOOT_DIR")" "$(dirname "$(dirname "$BOOT_DIR")")"

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
# Boxes of older recipes (and their boot files) only take space now; DMRECOVER_KEEP_OLD_BOXES=1
# keeps them (a VM of an older box still running uses its image as a backing file).
prefix=${BOX_NAME%-*}
[ "${DMRECOVER_KEEP_OLD_BOXES:-0}" = 1 ] || for old in $(vagrant box list 2>/dev/null | awk '{print $1}'); do
    case $old in "$prefix" | "$prefix"-*) ;; *) continue ;; esac
    [ "$old" = "$BOX_NAME" ] && continue
    vagrant box remove -f --all "$old" >/dev/null 2>&1 || true
    if [ "$old" = "$prefix" ]; then  # the box before recipe hashes: boot files at the top
        rm -f "$(dirname "$BOOT_DIR")/vmlinuz" "$(dirname "$BOOT_DIR")/initrd.img"
    else
        rm -rf "${BOOT_DIR%/*}/${old##*-}"
    fi
    for v in $(virsh -c qemu:///system vol-list default 2>/dev/null | awk -v b="${old//\//-VAGRANTSLASH-}" 'index($1, b) == 1 {print $1}'); do
        virsh -c qemu:///system vol-delete --pool default "$v" >/dev/null 2>&1 || true
    done
done
rm -rf "$WORK"
echo "build-box: box $BOX_NAME added in $(( $(date +%s) - t0 ))s"
