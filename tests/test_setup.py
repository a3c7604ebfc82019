"""Issue 16, item 10: `make setup` installs the versions the suite passed with."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def _pins() -> dict[str, str]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    pairs = [ln.split("==") for ln in lines if ln and not ln.startswith("#")]
    return {canonicalize_name(name): version for name, version in pairs}


def test_every_dependency_is_pinned() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    wanted = [*project["dependencies"], *(r for extra in ("dev", "deploy", "serve", "docs",
                                                          "cluster") for r in extras[extra])]
    pins = _pins()
    names = {canonicalize_name(Requirement(r).name) for r in wanted}
    assert names - set(pins) == set()
    assert all(re.fullmatch(r"[0-9][0-9A-Za-z.+!-]*", v) for v in pins.values())
    # and the setup installs with them
    assert "pip install --quiet -c constraints.txt -e '.[dev,deploy,serve,docs,cluster]'" in \
        (ROOT / "Makefile").read_text()


def test_the_environment_is_the_pinned_one() -> None:
    """What tools/pin.py reads from this environment is constraints.txt: every package the
    project needs, at the pinned version. (`make upgrade` leaves this one out: it tests
    newer versions before pinning them.)"""
    now = subprocess.run([sys.executable, str(ROOT / "tools" / "pin.py")], check=True,
                         capture_output=True, text=True).stdout
    assert [ln for ln in now.splitlines() if not ln.startswith("#")] == \
        [ln for ln in (ROOT / "constraints.txt").read_text().splitlines()
         if not ln.startswith("#")]
