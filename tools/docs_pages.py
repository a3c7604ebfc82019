"""The docs' generated references, written into docs/reference/ by `make docs`:

    python tools/docs_pages.py            # write them
    python tools/docs_pages.py --check    # exit 1 naming each one the code has moved from

Each is made from the code it describes and committed, so that it reads on the
repository's own pages too; the suite (tests/test_docs.py) fails when one differs from
what the code makes now:
- cli.md from the argparse parser of `resnetlab` (every verb and flag),
- models.md from the model registry, counted by the code,
- config.md from the config dataclasses (every key, type, default) and the comments
  beside their fields (the meaning; a field without one is an error).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import os
import sys
import textwrap
import tokenize
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from resnetlab.cli import build_parser
from resnetlab.config import ClusterConfig, TrainConfig
from resnetlab.models.complexity import model_summary
from resnetlab.models.registry import PAPER_MACS, list_models

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "docs" / "reference"


def _text(text: object) -> str:
    """Help text as Markdown shows it: `<scale>` and the like are text, not HTML tags."""
    return str(text).replace("<", "&lt;").replace(">", "&gt;")


def _cell(text: object) -> str:
    return _text(text).replace("|", "\\|").replace("\n", " ")


# ------------------------------------------------------------------------------ the CLI

def _flags(action: argparse.Action) -> str:
    names = ", ".join(f"`{o}`" for o in action.option_strings) or f"`{action.dest}`"
    if action.metavar and action.option_strings:
        names += f" `{action.metavar}`"
    return names


def _default(action: argparse.Action) -> str:
    """The default of a flag that takes a value; none for switches, None and empty lists."""
    d = action.default
    if not action.option_strings or action.nargs == 0 or d is None or d == [] \
            or d is argparse.SUPPRESS:
        return ""
    return f"`{d}`"


def _parser_page(name: str, parser: argparse.ArgumentParser, level: int) -> Iterator[str]:
    yield f"{'#' * level} `{name}`"
    yield ""
    if parser.description:
        yield _text(parser.description)
        yield ""
    yield "```text"
    yield parser.format_usage().strip()
    yield "```"
    yield ""
    rows, children = [], []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            children = list(action.choices.items())
            continue
        choices = (f" (one of: {', '.join(map(str, action.choices))})"
                   if action.choices and not isinstance(action.choices, dict) else "")
        rows.append(f"| {_flags(action)} | {_cell(action.help or '')}{_cell(choices)} | "
                    f"{_cell(_default(action))} |")
    if rows:
        yield "| argument | meaning | default |"
        yield "|---|---|---|"
        yield from rows
        yield ""
    if parser.epilog:
        yield "```text"
        yield parser.epilog.strip()
        yield "```"
        yield ""
    for child, sub in children:
        yield from _parser_page(f"{name} {child}", sub, min(level + 1, 4))


def cli_page() -> str:
    # argparse wraps usage lines at the terminal's width: fix it, so the page is the same
    # from any terminal (the suite compares it with the committed one)
    columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"
    try:
        lines = list(_parser_page("resnetlab", build_parser(), 2))
    finally:
        if columns is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = columns
    head = ["# Command line: `resnetlab`", "",
            "Generated from the parser itself (`make docs`): every command and flag "
            "`resnetlab` accepts, with its help text. `resnetlab COMMAND --help` prints the "
            "same.", ""]
    return "\n".join(head + lines) + "\n"


# --------------------------------------------------------------------------- the models

def _human(n: float) -> str:
    return f"{n / 1e9:.2f} G" if n >= 1e8 else f"{n / 1e6:.1f} M"


def models_page() -> str:
    lines = ["# Model table", "",
             "Generated from the registry (`resnetlab.list_models()`) by `make docs`, counted "
             "by the code at each model's native input size (`resnetlab models` prints the "
             "same). Mult-adds are the multiply-accumulates of the convolutions and the fc "
             "layer, the unit the paper calls FLOPs. Any CIFAR depth 6n+2 is also built on "
             "request as `cifar_resnetN` (`resnetlab.cifar_resnet(N)`).", "",
             "| model | family | block | shortcut | depth | parameters | mult-adds | input | "
             "paper Table 1 |", "|---|---|---|---|---|---|---|---|---|"]
    for name in list_models():
        s = model_summary(name)
        paper = f"{PAPER_MACS[name] / 1e9:.1f} G" if name in PAPER_MACS else ""
        lines.append(f"| `{name}` | {s['family']} | {s['block']} | {s['shortcut']} | "
                     f"{s['depth']} | {s['params']:,} | {_human(s['macs'])} | "
                     f"{s['input_size']} px | {paper} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the config

def field_comments(cls: type) -> dict[str, str]:
    """The comment beside each field of dataclass `cls`, or else the comment lines just
    above it: this code base's one place for what a setting means."""
    lines, _ = inspect.getsourcelines(cls)
    source = textwrap.dedent("".join(lines))
    trailing: dict[int, str] = {}
    alone: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            row, col = tok.start
            text = tok.string.lstrip("#").strip()
            before = source.splitlines()[row - 1][:col]
            (trailing if before.strip() else alone)[row] = text
    comments: dict[str, str] = {}
    body = ast.parse(source).body[0]
    assert isinstance(body, ast.ClassDef)
    for node in body.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        own = [trailing[r] for r in range(node.lineno, (node.end_lineno or node.lineno) + 1)
               if r in trailing]
        above, row = [], node.lineno - 1
        while row in alone:
            above.insert(0, alone[row])
            row -= 1
        if own or above:
            comments[node.target.id] = " ".join(above + own)
    return comments


def _type_name(tp: Any) -> str:
    if typing.get_args(tp):
        return str(tp).replace("typing.", "")
    return str(getattr(tp, "__name__", tp))


def config_rows(cls: type, prefix: str = "") -> Iterator[tuple[str, str, str, str]]:
    """(key, type, default, meaning) of every setting of `cls`, nested sections dotted."""
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = prefix + f.name
        if dataclasses.is_dataclass(tp):
            yield from config_rows(tp, key + ".")  # type: ignore[arg-type]
            continue
        if f.name not in comments:
            raise SystemExit(f"docs: config key {key} ({cls.__name__}) has no comment to say "
                             "what it means; add one beside the field")
        default = (f.default_factory() if f.default_factory is not dataclasses.MISSING
                   else f.default)
        yield key, _type_name(tp), repr(default), comments[f.name]


def config_page() -> str:
    lines = ["# Configuration", "",
             "Every setting of a training run, generated from the config dataclasses "
             "(`resnetlab.config.TrainConfig` and its sections) and the comments beside their "
             "fields by `make docs`. Settings come from these defaults, then a preset "
             "(`--preset`, or the recipe sized from an image folder), then `--config "
             "FILE.yaml`, then each `--set key=value` (YAML values: `--set "
             "schedule.milestones=[100,200]`); a run saves the result as its `config.yaml`. "
             "`resnetlab train --print-config` shows it resolved.", "",
             "| key | type | default | meaning |", "|---|---|---|---|"]
    lines += _config_table(TrainConfig)
    lines += ["", "## Cluster section", "",
              "Where `--executor` runs jobs and with what (`resnetlab.config.ClusterConfig`): "
              "the `cluster:` section of a `--cluster-config FILE.yaml`, then the flags of "
              "`train` and `reproduce` (`--partition`, `--time-limit`, ...); [the researcher's "
              "guide](../distributed.md#slurm-through-submitit-executor-slurm) shows both.", "",
              "| key | type | default | meaning |", "|---|---|---|---|",
              *_config_table(ClusterConfig)]
    return "\n".join(lines) + "\n"


def _config_table(cls: type) -> list[str]:
    # a | inside a code span would end the table cell, escaped or not
    return [f"| `{key}` | `{tp.replace(' | ', ' or ')}` | `{_cell(default)}` | {_cell(meaning)} |"
            for key, tp, default, meaning in config_rows(cls)]


PAGES = {"cli.md": cli_page, "models.md": models_page, "config.md": config_page}
GENERATED = "<!-- made by tools/docs_pages.py from the code: edit the code, then `make docs` -->\n"


def stale() -> list[str]:
    """The generated pages whose committed text is not what the code makes now."""
    return [name for name, make in PAGES.items()
            if not (REFERENCE / name).is_file()
            or (REFERENCE / name).read_text() != GENERATED + make()]


def main(argv: list[str]) -> int:
    if "--check" in argv:
        old = stale()
        for name in old:
            print(f"docs/reference/{name} is not what the code makes now: run `make docs`")
        return 1 if old else 0
    for name, make in PAGES.items():
        (REFERENCE / name).write_text(GENERATED + make())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
