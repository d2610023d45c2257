#!/usr/bin/env bash
# The kernel (device-mapper) suite, in a Vagrant VM on a real Debian 12 kernel:
#   host: prepare vagrant/libvirt, build the box when missing, build a wheelhouse of dmrecover
#         and its dependencies, `vagrant up` (vagrant/vm-lib.sh, shared with run-bench.sh);
#   guest: install dmrecover from the wheelhouse into a venv, offline (as on an air-gapped
#          server), run `pytest tests/kernel` as root;
#   then the power cuts, then `vagrant destroy -f`, whatever happened, and exit with pytest's
#   status (or the power cuts' when pytest passed).
# Extra arguments go to pytest. DMRECOVER_KEEP_VM=1 keeps the VM for debugging (its dot folder
# is printed). DMRECOVER_POWERCUT: 1 (the default) runs every power cut after a full run (no
# pytest arguments), 0 none, or a list such as "dm-clone:hydration dm-clone:swap" runs those
# (also after a run with pytest arguments). DMRECOVER_BENCH="<bench_dm.py arguments>" (may be
# " ") runs bench/bench_dm.py after pytest, on the tree as it is then (see vagrant/run-bench.sh);
# its JSON goes to DMRECOVER_BENCH_JSON (default bench-dm-<UTC time>.json here).
set -euo pipefail
bench_json=$(realpath -m "${DMRECOVER_BENCH_JSON:-bench-dm-$(date -u +%Y%m%dT%H%M%SZ).json}")
log_name=kernel-tests
. "$(dirname "$0")/vm-lib.sh"
vm_up

# Started by scripts/run-tests.sh beside the host suite: the guest's tests wait until it ends.
if [ -n "${DMRECOVER_KERNEL_GATE:-}" ]; then
    log "waiting for the host suite to finish"
    flock -s "$DMRECOVER_KERNEL_GATE" true
    log "host suite finished"
fi

set +e
pytest_args=""
for a in "$@"; do pytest_args+=" $(printf '%q' "$a")"; done
# --durations: the slowest tests named in every run's log (the suite's time is budgeted).
guest_root "/opt/dmrecover/bin/pytest -p no:cacheprovider --durations=15 tests/kernel$pytest_args"
rc=$?
log "pytest exit status $rc"

# The bench before the power cuts: on the guest as booted, not after a crash.
rc_bench=0
if [ -n "${DMRECOVER_BENCH:-}" ]; then
    # shellcheck disable=SC2086  # the bench's arguments, split on purpose
    guest_bench "$bench_json" $DMRECOVER_BENCH || { log "bench FAILED"; rc_bench=1; }
fi

# Power cuts: the guest starts a session (tests/kernel/powercut.py), the host pulls the plug
# (virsh destroy) and boots the guest again, and the guest checks that the session's boot unit
# brought the application back and finished the restore with every acknowledged write on DEST.
rc_pc=0
powercut() {  # $1: backend (dm or dm-clone), $2: when the power goes (see powercut.py)
    local py=/opt/dmrecover/bin/python dom up
    guest "cd /vagrant && sudo $py -m tests.kernel.powercut start $2 $1" || return 1
    dom=$(cat "$VAGRANT_DOTFILE_PATH/machines/default/libvirt/id")
    virsh -c qemu:///system destroy "$dom" >/dev/null
    log "power cut ($1) during the $2 (virsh destroy); booting again"
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
cuts=${DMRECOVER_POWERCUT:-1}
case "$cuts" in
    0) cuts="" ;;
    1) if [ $# -eq 0 ]; then
           cuts="dm:restore dm:merge dm-clone:hydration dm-clone:swap"
       else
           cuts=""
       fi ;;
esac
for cut in $cuts; do
    if powercut "${cut%%:*}" "${cut#*:}"; then
        log "power cut ${cut%%:*} during the ${cut#*:}: passed"
    else
        log "power cut ${cut%%:*} during the ${cut#*:}: FAILED"; rc_pc=1
    fi
done
set -e
[ $rc -ne 0 ] && exit $rc
[ $rc_pc -ne 0 ] && exit $rc_pc
exit $rc_bench
