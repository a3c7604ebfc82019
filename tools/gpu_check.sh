#!/usr/bin/env bash
# The GPU check (`resnetlab bench gpu-check`) on a lent GPU machine, within 8 minutes: set
# up the venv if needed, then run it on CUDA. The Fashion-MNIST files can travel with the tree in
# data/fashion-mnist/ (FASHION_DIR), since the lent machine has no network.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || make setup
export FASHION_DIR="${FASHION_DIR:-$PWD/data/fashion-mnist}"
timeout 480 .venv/bin/resnetlab bench gpu-check --device cuda --json "${OUT:-.}/gpu-check.json"
