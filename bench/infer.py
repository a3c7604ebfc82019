"""`python bench/infer.py --help`: same as `resnetlab bench infer` (see docs/performance.md)."""

import sys

from resnetlab.benchmarks import run_benchmark

if __name__ == "__main__":
    sys.exit(run_benchmark("infer", sys.argv[1:]))
