"""`python bench/data.py --help`: same as `resnetlab bench data` (see docs/performance.md)."""

import sys

from resnetlab.benchmarks import run_benchmark

if __name__ == "__main__":
    sys.exit(run_benchmark("data", sys.argv[1:]))
