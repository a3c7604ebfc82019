"""The measured distributions behind the thresholds of the `stochastic` tests.

Runs the tests marked `stochastic` (or those `-k` selects) once per seed offset, training
precision and instruction-set cap, each run appending what its tests measured
(`variant.record(...)` in tests/conftest.py) to one JSON-lines file, then prints n, min and
max of every measured quantity per test and precision: the table docs/testing.md keeps.

    .venv/bin/python tools/threshold_spread.py --seeds 10 [-k overfits] [--out F.jsonl]
    .venv/bin/python tools/threshold_spread.py --summarise F.jsonl

A test that fails during a measurement run still records what it measured first; the
table then shows where its threshold would have to move.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What the two pytest processes of `make test` each hold (OpenVINO and ONNX Runtime load
# into a process of their own; OpenVINO refuses to run under the AVX2 cap).
SELECTIONS = ("stochastic and not slow and not runtimes", "stochastic and runtimes and not slow")
AVX2_CAP = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


def _wider_than_avx2() -> bool:
    return "avx512f" in Path("/proc/cpuinfo").read_text()


def measure(seeds: int, precisions: list[str], keyword: str, out: Path) -> None:
    caps = [("native", {})] + ([("avx2", AVX2_CAP)] if _wider_than_avx2() else [])
    for isa, cap in caps:
        for precision in precisions:
            for seed in range(seeds):
                for selection in SELECTIONS:
                    if isa == "avx2" and "not runtimes" not in selection:
                        continue
                    env = {**os.environ, **cap, "RESNETLAB_TEST_SEED_OFFSET": str(seed),
                           "RESNETLAB_TEST_PRECISION": precision,
                           "RESNETLAB_TEST_RECORD": str(out)}
                    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-m", selection, *(["-k", keyword] if keyword else [])]
                    rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL).returncode
                    print(f"{isa} {precision} seed {seed} [{selection}]: pytest exit {rc}",
                          flush=True)


def summarise(path: Path) -> str:
    """One row per (test, quantity, precision, isa): n, min, max."""
    values: dict[tuple[str, str, str, str], list[float]] = defaultdict(list)
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        for key, value in rec.items():
            if key not in ("test", "seed", "precision", "isa"):
                values[(rec["test"], key, rec["precision"], rec["isa"])].append(value)
    rows = ["| test | quantity | precision | ISA | n | min | max |",
            "|---|---|---|---|---|---|---|"]
    for (test, key, precision, isa), vs in sorted(values.items()):
        rows.append(f"| {test} | {key} | {precision} | {isa} | {len(vs)} | {min(vs):.4g} | "
                    f"{max(vs):.4g} |")
    return "\n".join(rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=10, help="seed offsets 0..N-1")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("-k", dest="keyword", default="", help="pytest -k expression")
    p.add_argument("--out", type=Path, default=Path("threshold-spread.jsonl"))
    p.add_argument("--summarise", type=Path, help="only print the table of this file")
    args = p.parse_args()
    if args.summarise:
        print(summarise(args.summarise))
        return 0
    measure(args.seeds, args.precisions.split(","), args.keyword, args.out.resolve())
    print(summarise(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
