# Shared by vagrant/run-kernel-tests.sh and vagrant/run-bench.sh (sourced, not run): take the
# VM lock, prepare the host and the box, build the wheelhouse, boot a fresh VM, install
# dmrecover in it; `guest CMD` runs a command there; the VM is destroyed on exit.
# The caller sets `log_name` first and calls vm_up.

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$here"
t_start=$(date +%s)
log() { echo "${log_name:-vm} [$(( $(date +%s) - t_start ))s]: $*"; }

vm_up() {
    [ "$(id -u)" -eq 0 ] || { echo "${log_name:-vm}: run as root (libvirt, box build)" >&2; exit 1; }

    # One VM at a time on this machine: the host has 2 cores and the guest is emulated.
    # Nothing long-lived may inherit the lock's descriptor: setup-host.sh may start libvirtd
    # and virtlogd, which would then hold the lock for ever (it happened: every later run
    # waited on it).
    exec 9>/var/lock/dmrecover-kernel-tests.lock
    flock 9

    vagrant/setup-host.sh 9>&-
    # The box of this recipe (its name carries the hash of build-box.sh), built when missing.
    DMRECOVER_BOX=${DMRECOVER_BOX:-$(vagrant/box-name.sh)}
    DMRECOVER_BOOT_DIR=${DMRECOVER_BOOT_DIR:-$(vagrant/box-name.sh --boot-dir)}
    export DMRECOVER_BOX DMRECOVER_BOOT_DIR
    vagrant/build-box.sh 9>&-
    log "host and box ready"

    # Each run gets its own Vagrant state and domain name, so runs from several work trees (and
    # a leftover from a killed run) never collide.
    run_dir=$(mktemp -d /var/tmp/dmrecover-vm.XXXXXX)
    export VAGRANT_CWD="$here/vagrant"
    export VAGRANT_DOTFILE_PATH="$run_dir/.vagrant"
    export DMRECOVER_VM_PREFIX="dmrecover-$(basename "$run_dir" | tr -c 'a-zA-Z0-9\n' '-')-"
    mkdir -p /var/log/dmrecover-vagrant
    export DMRECOVER_CONSOLE_LOG="/var/log/dmrecover-vagrant/console-$(basename "$run_dir").log"
    wheelhouse="$here/vagrant/.wheelhouse"
    trap vm_finish EXIT
    trap 'exit 130' INT TERM

    # The wheelhouse: dmrecover and every dependency as wheels for the guest's Python (3.11, the
    # same Debian release as this host).
    rm -rf "$wheelhouse"
    local py=python3
    [ -x .venv/bin/python ] && py=.venv/bin/python
    "$py" -m pip wheel -q --wheel-dir "$wheelhouse" ".[test,lvm]" >/dev/null
    log "wheelhouse: $(ls "$wheelhouse" | wc -l) wheels"

    vagrant up --provider libvirt 9>&-
    log "VM up"

    guest "set -e
sudo python3 -m venv --system-site-packages /opt/dmrecover
sudo /opt/dmrecover/bin/pip install -q --no-index --find-links /vagrant/vagrant/.wheelhouse 'dmrecover[test,lvm]'
/opt/dmrecover/bin/dmrecover --version"
    log "dmrecover installed in the guest"
}

vm_finish() {
    local rc=$?
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

guest() { vagrant ssh -c "$*" -- -o LogLevel=ERROR; }

# Root in the guest, with the installed dmrecover first on PATH, in the synced work tree.
guest_root() {
    guest "cd /vagrant && sudo env PATH=/opt/dmrecover/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin DMRECOVER_IN_VM=1 $*"
}

# bench/bench_dm.py in the guest, on the work tree as it is now (`vagrant rsync` first: the
# bench imports dmrecover from /vagrant, so a bench at the end of a long run measures the
# latest tree); the table goes to stdout, the JSON to the host file $1. Other arguments go to
# the bench.
guest_bench() {
    local out=$1; shift
    local args="" a
    for a in "$@"; do args+=" $(printf '%q' "$a")"; done
    vagrant rsync >/dev/null 9>&-
    log "bench on $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- dmrecover bench || echo ' with uncommitted changes under dmrecover/ or bench/')"
    guest_root "/opt/dmrecover/bin/python bench/bench_dm.py --json /var/tmp/bench-dm.json$args" || return 1
    guest "sudo cat /var/tmp/bench-dm.json" > "$out"
    log "bench JSON: $out"
}
