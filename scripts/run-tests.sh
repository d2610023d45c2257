#!/usr/bin/env bash
# The whole test suite: unit and loop-device integration tests on this host, then the kernel
# (device-mapper) suite inside the VM. Run scripts/bootstrap.sh first (the README's line does).
set -uo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
.venv/bin/ruff check dmrecover tests bench
rc_lint=$?
# The layering contract (.importlinter): a lower layer never imports a higher one.
.venv/bin/lint-imports --no-cache
rc_layers=$?
[ $rc_layers -eq 0 ] || rc_lint=$rc_layers
# The kernel stage's slow set-up (box build when missing, wheelhouse, VM boot, install in the
# guest: 6-15 min) runs beside the host suite; its tests wait for the host suite to end (a
# shared lock on the gate file, held here until then) so that the emulated guest and the
# host's timing-sensitive tests do not compete for the two cores while either measures.
# Its output is kept in a log and shown once the host suite is done.
vm_pid=""
if [ -x vagrant/run-kernel-tests.sh ]; then
    gate=$(mktemp /tmp/dmrecover-gate.XXXXXX)
    vm_log=$(mktemp /tmp/dmrecover-kernel-stage.XXXXXX)
    exec 8>"$gate"
    flock 8
    DMRECOVER_KERNEL_GATE=$gate vagrant/run-kernel-tests.sh >"$vm_log" 2>&1 8>&- &
    vm_pid=$!
fi
.venv/bin/python -m pytest -q tests/unit tests/integration "$@"
rc_host=$?
rc_vm=0
if [ -n "$vm_pid" ]; then
    flock -u 8
    exec 8>&-
    echo "kernel stage (started beside the host suite; its log so far, then live):"
    tail -n +1 -f --pid="$vm_pid" "$vm_log"
    wait "$vm_pid"
    rc_vm=$?
    rm -f "$gate" "$vm_log"
fi
echo "lint: $rc_lint, host suite: $rc_host, kernel suite (VM): $rc_vm"
[ $rc_lint -eq 0 ] && [ $rc_host -eq 0 ] && [ $rc_vm -eq 0 ]
