#!/usr/bin/env bash
# bench/bench_dm.py in a fresh Vagrant VM (a real Debian 12 kernel with device-mapper and the
# box's dm-clone module): the same host, box, wheelhouse and install steps as the kernel suite
# (vagrant/vm-lib.sh), then the bench as root in the guest; its table is printed here and its
# JSON copied back to DMRECOVER_BENCH_JSON (default bench-dm-<UTC time>.json in the current
# directory). The VM is destroyed at the end. run-kernel-tests.sh runs the same step after the
# suite when DMRECOVER_BENCH is set (one VM boot for both).
#   vagrant/run-bench.sh [bench_dm.py arguments, e.g. --size 256M --runtime 5]
set -euo pipefail
out=$(realpath -m "${DMRECOVER_BENCH_JSON:-bench-dm-$(date -u +%Y%m%dT%H%M%SZ).json}")
log_name=run-bench
. "$(dirname "$0")/vm-lib.sh"
vm_up
guest_bench "$out" "$@"
