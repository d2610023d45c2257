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
.venv/bin/python -m pytest -q tests/unit tests/integration "$@"
rc_host=$?
rc_vm=0
if [ -x vagrant/run-kernel-tests.sh ]; then
    vagrant/run-kernel-tests.sh
    rc_vm=$?
fi
echo "lint: $rc_lint, host suite: $rc_host, kernel suite (VM): $rc_vm"
[ $rc_lint -eq 0 ] && [ $rc_host -eq 0 ] && [ $rc_vm -eq 0 ]
