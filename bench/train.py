"""`python bench/train.py --help`: same as `resnetlab bench train` (see docs/performance.md)."""

import sys

from resnetlab.benchmarks import run_benchmark

if __name__ == "__main__":
    sys.exit(run_benchmark("train", sys.argv[1:]))
