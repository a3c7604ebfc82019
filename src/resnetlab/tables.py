"""Tables and durations for people: plain text for the terminal, Markdown for reports."""

from __future__ import annotations

from collections.abc import Sequence


def format_table(headers: Sequence[object], rows: Sequence[Sequence[object]],
                 markdown: bool = False) -> str:
    """Plain text (text columns left-aligned, numbers right-aligned, a rule under the
    header), or with `markdown` a GitHub-flavoured Markdown table."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in r] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(r) + " |" for r in cells]
        lines.insert(1, "|" + "---|" * len(headers))
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [all(isinstance(r[i], int | float) for r in rows) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) if num else c.ljust(w)
                       for c, w, num in zip(r, widths, numeric, strict=True)).rstrip()
             for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_duration(seconds: float) -> str:
    """'42 s', '5.2 min', '2.4 h': as a person says how long something takes."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"
