"""The mutation score per module from `mutmut results --all true` (make mutation's output).

Usage: .venv/bin/mutmut results --all true | python bench/mutation_table.py
Prints a Markdown table per module: killed (timeouts included), not killed, not checked.
"""

from __future__ import annotations

import collections
import sys


def table(lines: list[str]) -> str:
    counts: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for line in lines:
        name, _, status = line.strip().rpartition(": ")
        if not name:
            continue
        module = name.split(".x")[0]
        counts[module][status] += 1
    rows = ["| module | killed | not killed | not checked | score of checked |",
            "| --- | ---: | ---: | ---: | ---: |"]
    for module, c in sorted(counts.items()):
        killed = c["killed"] + c["timeout"]
        checked = sum(c.values()) - c["not checked"]
        # Anything checked and not killed counts against the score: survived, and "no
        # tests" (no selected test calls the function), "suspicious", "segfault".
        score = f"{100 * killed / checked:.0f}%" if checked else "-"
        rows.append(f"| {module} | {killed} | {checked - killed} | {c['not checked']} | "
                    f"{score} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table(sys.stdin.read().splitlines()))
