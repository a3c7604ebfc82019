"""`python bench/time_to_accuracy.py`: same as `resnetlab bench time-to-accuracy`."""

import sys

from resnetlab.benchmarks import run_benchmark

if __name__ == "__main__":
    sys.exit(run_benchmark("time-to-accuracy", sys.argv[1:]))
