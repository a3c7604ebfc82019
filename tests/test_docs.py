"""Issue 34: the documentation is checked like code.

- The site builds with every warning an error (broken links and anchors, pages missing
  from the navigation, API references to names that do not exist), and the committed
  references generated from the code (docs/reference/cli.md, models.md, config.md) are
  what the code makes now and hold what it has.
- The Python snippets of the README and the docs run; the public API's docstring examples
  run as doctests.
- Every `resnetlab ...` command shown is accepted by the parser, and the cheap ones run;
  every `make` target the README names exists.
"""

from __future__ import annotations

import argparse
import doctest
import importlib
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from resnetlab.cli import build_parser, main
from resnetlab.config import ClusterConfig, TrainConfig
from resnetlab.models.registry import list_models

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import docs_pages  # noqa: E402

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"(?:^<!-- (snippet.*?) -->\n)?^```(\w+)\n(.*?)^```", re.S | re.M)
# The modules of the public API whose docstrings carry examples (docs/reference/api.md).
DOCTESTED = ["resnetlab.models.factory", "resnetlab.models.convert",
             "resnetlab.models.complexity", "resnetlab.models.registry",
             "resnetlab.models.resnet", "resnetlab.config"]
QUIET = {"NO_MKDOCS_2_WARNING": "1", "DISABLE_MKDOCS_2_WARNING": "true"}


def blocks(page: Path, language: str) -> list[tuple[str, str]]:
    """(directive, code) of each fenced block of `language`; the directive is the HTML
    comment just above it (`snippet: skip (why)` or `snippet-setup: CODE`), or ''."""
    return [(m.group(1) or "", m.group(3)) for m in FENCE.finditer(page.read_text())
            if m.group(2) == language]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d",
                           str(out)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **QUIET}, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return out


def test_the_site_builds_with_no_warning(site: Path) -> None:
    for page in PAGES[1:]:
        assert (site / f"{page.stem}.html").is_file(), f"{page.name} is not in the site"


def test_the_generated_references_are_what_the_code_makes_now() -> None:
    assert docs_pages.stale() == [], "run `make docs` and commit docs/reference/"


def test_a_config_key_without_a_meaning_is_an_error() -> None:
    from dataclasses import dataclass

    @dataclass
    class Section:
        said: int = 1  # a meaning
        unsaid: int = 2

    with pytest.raises(SystemExit, match="unsaid"):
        list(docs_pages.config_rows(Section))


def _commands(name: str, parser: argparse.ArgumentParser
              ) -> list[tuple[str, argparse.ArgumentParser]]:
    """Every command of the CLI, nested ones included, with its parser."""
    found = [(name, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child, sub in action.choices.items():
                found += _commands(f"{name} {child}", sub)
    return found


def test_the_generated_references_hold_what_the_code_has(site: Path) -> None:
    cli = (site / "reference/cli.html").read_text()
    sections = {m.group(1): m.group(2) for m in re.finditer(
        r'<h[234] id="[^"]*"><code>(resnetlab[^<]*)</code>(.*?)(?=<h[234] |$)', cli, re.S)}
    for name, parser in _commands("resnetlab", build_parser()):
        assert name in sections, f"{name} has no section"
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
                continue
            assert action.help, f"{name} {action.dest} has no help text"
            for flag in action.option_strings:
                assert f"<code>{flag}</code>" in sections[name], f"{name} {flag}"
    assert "runs/reproduce/&lt;scale&gt;" in cli  # help texts' <...> kept as text
    models = (site / "reference/models.html").read_text()
    for name in list_models():
        assert f"<code>{name}</code>" in models, name
    assert "<td>25,557,032</td>" in models  # resnet50, paper Table 1's net
    config = (site / "reference/config.html").read_text()
    for section in ("optim.lr", "schedule.milestones", "data.dataset", "finetune.init",
                    "log.tensorboard"):
        assert f"<code>{section}</code>" in config, section
    # one header row per table: the training settings and the cluster section
    assert config.count("<tr>") - 2 == len(list(docs_pages.config_rows(TrainConfig))) + \
        len(list(docs_pages.config_rows(ClusterConfig)))
    assert "<code>array_parallelism</code>" in config and 'id="cluster-section"' in config
    api = (site / "reference/api.html").read_text()
    for name in ("resnetlab.create_model", "resnetlab.load_model", "resnetlab.save_weights",
                 "resnetlab.config.resolve", "resnetlab.serve.build_app"):
        assert f'id="{name}"' in api, name


@pytest.mark.parametrize("module", DOCTESTED)
def test_the_api_examples_run(module: str) -> None:
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{module} has no example"
    assert result.failed == 0


@pytest.mark.parametrize("page", [p for p in PAGES if any(
    not d.startswith("snippet: skip") for d, _ in blocks(p, "python"))], ids=lambda p: p.name)
def test_the_python_snippets_run(page: Path, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Each page's snippets in one namespace, in order, as a reader would paste them."""
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "__snippet__"}
    for directive, code in blocks(page, "python"):
        if directive.startswith("snippet: skip"):
            continue
        if directive.startswith("snippet-setup:"):
            exec(directive.removeprefix("snippet-setup:").strip(), namespace)
        exec(compile(code, f"{page.name} snippet", "exec"), namespace)


def test_a_skipped_snippet_says_why() -> None:
    skipped = [d for p in PAGES for d, _ in blocks(p, "python") if d.startswith("snippet: skip")]
    assert all(re.fullmatch(r"snippet: skip \(.{20,}\)", d) for d in skipped), skipped


def commands(page: Path) -> list[list[str]]:
    """The `resnetlab` command lines of a page's console and bash blocks, as argv lists
    (after `resnetlab` or `-m resnetlab`), continuation lines joined."""
    found = []
    for language in ("console", "bash"):
        for _, code in blocks(page, language):
            for line in code.replace("\\\n", " ").splitlines():
                line = line.removeprefix("$ ").strip()
                if "resnetlab" not in line or line.startswith("#"):
                    continue
                words = shlex.split(line, comments=True)
                for i, word in enumerate(words):
                    if word.endswith("resnetlab") and (i == 0 or words[i - 1] == "-m"):
                        found.append(words[i + 1:])
                        break
    return found


@pytest.mark.parametrize("page", [p for p in PAGES if commands(p)], ids=lambda p: p.name)
def test_every_command_shown_is_accepted(page: Path) -> None:
    parser = build_parser()
    for argv in commands(page):
        if "--help" in argv:
            continue
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"{page.name}: `resnetlab {shlex.join(argv)}` is refused by the parser")


def test_the_cheap_commands_shown_run(capsys: pytest.CaptureFixture[str]) -> None:
    """The commands that read no data set nor run: they print what the docs say."""
    cheap = [argv for page in PAGES for argv in commands(page)
             if (argv[:1] == ["info"] and "--machine" not in argv)
             or argv[:1] == ["models"] or "--help" in argv]
    assert len(cheap) >= 4
    for argv in cheap:
        try:
            code = main(argv)
        except SystemExit as e:  # --help
            code = e.code
        assert code == 0, argv
        assert capsys.readouterr().out.strip(), argv


def test_every_make_target_named_exists() -> None:
    makefile = (ROOT / "Makefile").read_text()
    named = set(re.findall(r"`make ([a-z-]+)`", " ".join(p.read_text() for p in PAGES)))
    assert {"demo", "test", "docs", "docs-serve"} <= named
    for target in named:
        assert re.search(rf"^{target}:", makefile, re.M), f"`make {target}` has no target"
