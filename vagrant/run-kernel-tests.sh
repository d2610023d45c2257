#!/usr/bin/env bash
# The kernel (device-mapper) suite, in a Vagrant VM on a real Debian 12 kernel:
#   host: prepare vagrant/libvirt, build the box when missing, build a wheelhouse of dmrecover
#         and its dependencies, `vagrant up`;
#   guest: install dmrecover from the wheelhouse into a venv, offline (as on an air-gapped
#          server), run `pytest tests/kernel` as root;
#   then `vagrant destroy -f`, whatever happened, and exit with pytest's status.
# Extra arguments go to pytest. DMRECOVER_KEEP_VM=1 keeps the VM for debugging (its dot folder
# is printed).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
t_start=$(date +%s)
log() { echo "kernel-tests [$(( $(date +%s) - t_start ))s]: $*"; }

[ "$(id -u)" -eq 0 ] || { echo "kernel-tests: run as root (libvirt, box build)" >&2; exit 1; }

# One VM at a time on this machine: the host has 2 cores and the guest is emulated. Nothing
# long-lived may inherit the lock's descriptor: setup-host.sh may start libvirtd and virtlogd,
# which would then hold the lock for ever (it happened: every later run waited on it).
exec 9>/var/lock/dmrecover-kernel-tests.lock
flock 9

vagrant/setup-host.sh 9>&-
# The box of this recipe (its name carries the hash of build-box.sh), built when missing.
DMRECOVER_BOX=${DMRECOVER_BOX:-$(vagrant/box-name.sh)}
DMRECOVER_BOOT_DIR=${DMRECOVER_BOOT_DIR:-$(vagrant/box-name.sh --boot-dir)}
export DMRECOVER_BOX DMRECOVER_BOOT_DIR
vagrant/build-box.sh 9>&-
log "host and box ready"

# Each run gets its own Vagrant state and domain name, so runs from several work trees (and a
# leftover from a killed run) never collide.
run_dir=$(mktemp -d /var/tmp/dmrecover-vm.XXXXXX)
export VAGRANT_CWD="$here/vagrant"
export VAGRANT_DOTFILE_PATH="$run_dir/.vagrant"
export DMRECOVER_VM_PREFIX="dmrecover-$(basename "$run_dir" | tr -c 'a-zA-Z0-9\n' '-')-"
mkdir -p /var/log/dmrecover-vagrant
export DMRECOVER_CONSOLE_LOG="/var/log/dmrecover-vagrant/console-$(basename "$run_dir").log"
wheelhouse="$here/vagrant/.wheelhouse"

finish() {
    rc=$?
    if [ "${DMRECOVER_KEEP_VM:-0}" = 1 ]; then
        log "keeping the VM: VAGRANT_CWD=$VAGRANT_CWD VAGRANT_DOTFILE_PATH=$VAGRANT_DOTFILE_PATH"
    else
        vagrant destroy -f >/dev/null 2>&1 || true
        rm -rf "$run_dir"
    fi
    rm -rf "$wheelhouse"
    log "done, exit $rc (console log: $DMRECOVER_CONSOLE_LOG)"
    exit $rc
}
trap finish EXIT
trap 'exit 130' INT TERM

# The wheelhouse: dmrecover and every dependency as wheels for the guest's Python (3.11, the
# same Debian release as this host). pyfuse3 and trio come from Debian's packages in the guest.
rm -rf "$wheelhouse"
py=python3
[ -x .venv/bin/python ] && py=.venv/bin/python
"$py" -m pip wheel -q --wheel-dir "$wheelhouse" ".[test,lvm]" >/dev/null
log "wheelhouse: $(ls "$wheelhouse" | wc -l) wheels"

vagrant up --provider libvirt 9>&-
log "VM up"

guest() { vagrant ssh -c "$*" -- -o LogLevel=ERROR; }
guest "set -e
sudo python3 -m venv --system-site-packages /opt/dmrecover
sudo /opt/dmrecover/bin/pip install -q --no-index --find-links /vagrant/vagrant/.wheelhouse 'dmrecover[test,lvm]'
/opt/dmrecover/bin/dmrecover --version"
log "dmrecover installed in the guest"

# Started by scripts/run-tests.sh beside the host suite: the guest's tests wait until it ends.
if [ -n "${DMRECOVER_KERNEL_GATE:-}" ]; then
    log "waiting for the host suite to finish"
    flock -s "$DMRECOVER_KERNEL_GATE" true
    log "host suite finished"
fi

set +e
pytest_args=""
for a in "$@"; do pytest_args+=" $(printf '%q' "$a")"; done
guest "cd /vagrant && sudo env PATH=/opt/dmrecover/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin DMRECOVER_IN_VM=1 \
    /opt/dmrecover/bin/pytest -p no:cacheprovider tests/kernel$pytest_args"
rc=$?
log "pytest exit status $rc"

# Power cut during a live restore (DMRECOVER_POWERCUT=0 skips it): the guest starts a dm
# session, the host pulls the plug (virsh destroy) and boots the guest again, and the guest
# checks that the session's boot unit brought the application back and finished the restore.
rc_pc=0
powercut() {  # $1: restore or merge (when the power goes)
    local py=/opt/dmrecover/bin/python dom up
    guest "cd /vagrant && sudo $py -m tests.kernel.powercut start $1" || return 1
    dom=$(cat "$VAGRANT_DOTFILE_PATH/machines/default/libvirt/id")
    virsh -c qemu:///system destroy "$dom" >/dev/null
    log "power cut during the $1 (virsh destroy); booting again"
    virsh -c qemu:///system start "$dom" >/dev/null
    up=0
    for _ in $(seq 1 90); do
        if vagrant ssh -c true -- -o LogLevel=ERROR -o ConnectTimeout=5 >/dev/null 2>&1; then
            up=1; break
        fi
        sleep 5
    done
    [ $up = 1 ] || { log "the guest did not come back after the power cut"; return 1; }
    guest "cd /vagrant && sudo $py -m tests.kernel.powercut check"
}
if [ "${DMRECOVER_POWERCUT:-1}" = 1 ] && [ $# -eq 0 ]; then
    for when in restore merge; do
        if powercut $when; then
            log "power cut during the $when: passed"
        else
            log "power cut during the $when: FAILED"; rc_pc=1
        fi
    done
fi
set -e
[ $rc -ne 0 ] && exit $rc
exit $rc_pc
