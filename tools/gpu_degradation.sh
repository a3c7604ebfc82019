#!/usr/bin/env bash
# Issue 33 on a lent GPU, one command: the paper's schedule on Fashion-MNIST (scale
# paper-fashion: 64k iterations of batch 128, lr /10 at 32k and 48k, the 110-layer warm-up)
# for ResNet and plain 20/56/110, the six sub-runs at once sharing the GPU (--jobs). At the
# deadline (MINUTES) `timeout` sends Ctrl-C: each sub-run stops at a checkpoint and is
# parked in the archive (reproduce/archive.py), which comes back under $OUT beside the log,
# `--status` and each sub-run's speed; the same command on the next lent GPU (or any
# machine, with the archive committed) goes on from there. The Fashion-MNIST files travel
# with the tree in data/fashion-mnist/ (FASHION_DIR), since the lent machine has no network.
#
#   cp /usr/share/datasets/fashion-mnist/* data/fashion-mnist/   # before the device call
#   OUT=... MINUTES=9 tools/gpu_degradation.sh
#
# SCALE, JOBS, ARCHIVE and EXTRA (more reproduce flags) change it, e.g. on a CPU to try it:
# SCALE=smoke JOBS=2 MINUTES=0.5 EXTRA="--set schedule.iterations=100000".
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || make setup
OUT="${OUT:-runs/gpu-degradation}"
mkdir -p "$OUT"
ARCHIVE="${ARCHIVE:-$OUT/sub-runs}"
# shellcheck disable=SC2206  # EXTRA is flags, split on purpose
ARGS=(degradation --scale "${SCALE:-paper-fashion}" --out runs/reproduce/gpu-degradation
      --data-dir "${FASHION_DIR:-$PWD/data/fashion-mnist}" --archive "$ARCHIVE" ${EXTRA:-})
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv
status=0
echo "== $(date -u '+%F %T') UTC, ${MINUTES:-9} minutes" >> "$OUT/reproduce.log"  # a log per call, kept
timeout -s INT "${MINUTES:-9}m" .venv/bin/resnetlab reproduce "${ARGS[@]}" --jobs "${JOBS:-6}" \
  >> "$OUT/reproduce.log" 2>&1 || status=$?
tail -n 30 "$OUT/reproduce.log"
echo "reproduce ended with $status (124 or 130: stopped at the deadline, sub-runs parked)"
.venv/bin/resnetlab reproduce "${ARGS[@]}" --status | tee "$OUT/status.txt"
.venv/bin/python - "$ARCHIVE" <<'PY' | tee "$OUT/speed.txt"
"""Each archived or parked sub-run: iterations reached and the median images/s it logged."""
import json, statistics, sys
from pathlib import Path

for d in sorted(p for p in Path(sys.argv[1]).iterdir() if (p / "metrics.jsonl").is_file()):
    rows = [json.loads(ln) for ln in (d / "metrics.jsonl").read_text().splitlines() if ln]
    speed = [r["images_per_s"] for r in rows if r.get("kind") == "train"]
    last = max((r["iteration"] for r in rows), default=0)
    median = statistics.median(speed) if speed else 0
    print(f"{d.name}: logged to iteration {last}, median {median:.0f} images/s")
PY
