#!/bin/sh
# The benchmark report (issue 12): fio on the pseudo-volume against DEST direct, RTO and memory
# by volume size up to 1 TiB, the background restore under an application load; writes
# docs/benchmarks.md and its plots (docs/benchmarks/*.png). Root; needs fio and matplotlib
# (the `bench` extra: .venv/bin/pip install -e '.[bench]'). Takes 15-30 minutes.
#   scripts/bench.sh [--quick]   (--quick: smaller sizes, shorter fio jobs)
set -eu
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=$(mktemp -d /var/tmp/dmrecover-bench.XXXXXX)
trap 'rm -rf "$OUT"' EXIT
REPORT=${BENCH_REPORT:-docs/benchmarks}  # the report goes to $REPORT.md, plots to $REPORT/
SIZES=1G,8G,64G,1T LIVE=8G,32G RUNTIME=8
if [ "${1:-}" = "--quick" ]; then SIZES=1G,8G LIVE=2G RUNTIME=4; fi
$PY bench/bench_scale.py --sizes "$SIZES" --live-size "$LIVE" --json "$OUT/scale.json"
$PY bench/bench_fio.py --runtime "$RUNTIME" --stages --breakdown --json "$OUT/fio.json"
$PY bench/bench_fio.py --runtime "$RUNTIME" --loop-buffered --json "$OUT/fio-buffered.json"
$PY bench/report.py --fio "$OUT/fio.json" --fio-buffered "$OUT/fio-buffered.json" \
    --scale "$OUT/scale.json" --out "$REPORT.md" --plots "$REPORT" --note "${BENCH_NOTE:-}"
echo "wrote $REPORT.md"
