"""The mutation score per module from `mutmut results --all true` (make mutation's output).

Usage: .venv/bin/mutmut results --all true | python tools/mutation_table.py [EQUIVALENTS]

Prints a Markdown table per module: killed (timeouts included), equivalent, not killed,
not checked, and the score of the checked mutants that are not equivalent; then the
survivors by name. EQUIVALENTS (default: tools/mutation_equivalents.txt beside this file)
lists, one per line, a mutant that no input can tell from the code and why; a listed
mutant that was killed, or that mutmut no longer writes, is reported as stale.
"""

from __future__ import annotations

import collections
import sys
from pathlib import Path

DEFAULT_EQUIVALENTS = Path(__file__).with_name("mutation_equivalents.txt")


def read_equivalents(text: str) -> dict[str, str]:
    """{mutant name: reason} from lines `name  reason`; blank lines and # comments skipped."""
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, reason = line.partition(" ")
            out[name] = reason.strip()
    return out


def table(lines: list[str], equivalents: dict[str, str] | None = None) -> str:
    equivalents = equivalents or {}
    status: dict[str, str] = {}
    for line in lines:
        name, _, state = line.strip().rpartition(": ")
        if name:
            status[name] = state
    counts: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    survivors = []
    for name, state in status.items():
        killed = state in ("killed", "timeout")
        if name in equivalents and not killed and state != "not checked":
            state = "equivalent"
        elif not killed and state != "not checked":
            # Anything checked and not killed counts against the score: survived, "no
            # tests" (no selected test calls the function), "suspicious", "segfault".
            survivors.append(f"- {name}: {state}")
        counts[name.split(".x")[0]]["killed" if killed else state] += 1
    rows = ["| module | killed | equivalent | not killed | not checked | score |",
            "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for module, c in sorted(counts.items()):
        real = sum(c.values()) - c["not checked"] - c["equivalent"]
        score = f"{100 * c['killed'] / real:.1f}%" if real else "-"
        rows.append(f"| {module} | {c['killed']} | {c['equivalent']} | {real - c['killed']} | "
                    f"{c['not checked']} | {score} |")
    stale = [n for n in equivalents if status.get(n) in (None, "killed", "timeout")]
    out = "\n".join(rows)
    if survivors:
        out += "\n\nNot killed:\n" + "\n".join(sorted(survivors))
    if stale:
        out += "\n\nStale entries of the equivalents list (killed, or no longer written):\n" + \
            "\n".join(f"- {n}" for n in stale)
    return out


if __name__ == "__main__":
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_EQUIVALENTS
    print(table(sys.stdin.read().splitlines(),
                read_equivalents(path.read_text()) if path.exists() else {}))
