"""Issue 34: the package as the ecosystem expects it. The wheel holds the kernel source,
the serving page and py.typed, states torch as a range and carries the one version; the
whole install into a new environment is `make package` (tools/check_wheel.py), slow."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import resnetlab

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import check_wheel  # noqa: E402


def _build(kind: str, out: Path, isolated: bool) -> Path:
    argv = [sys.executable, "-m", "build", f"--{kind}", "--outdir", str(out), str(ROOT)]
    done = subprocess.run(argv + ([] if isolated else ["--no-isolation"]),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    (built,) = out.glob("*.whl" if kind == "wheel" else "*.tar.gz")
    return built


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build("wheel", tmp_path_factory.mktemp("dist"), isolated=False)


def test_the_wheel_holds_what_the_package_needs(wheel: Path) -> None:
    assert wheel.name == f"resnetlab-{resnetlab.__version__}-py3-none-any.whl"
    assert check_wheel.wheel_problems(wheel) == []


def test_a_pinned_torch_is_a_problem(wheel: Path, tmp_path: Path) -> None:
    """The check itself can fail: a wheel that pins torch, or lacks the kernel source."""
    bad = tmp_path / wheel.name
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(bad, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("METADATA"):
                data, n = re.subn(rb"^Requires-Dist: torch\b[^\n]*$",
                                  b"Requires-Dist: torch==2.14.1", data, flags=re.M)
                assert n == 1
            if not item.filename.endswith("bn_act.c"):
                dst.writestr(item, data)
    problems = check_wheel.wheel_problems(bad)
    assert any("torch is pinned" in p for p in problems), problems
    assert any("bn_act.c" in p for p in problems), problems


@pytest.mark.slow
def test_the_wheel_and_sdist_install_into_a_new_environment_and_train(tmp_path: Path) -> None:
    _build("wheel", tmp_path, isolated=True)
    _build("sdist", tmp_path, isolated=True)
    assert check_wheel.main(str(tmp_path)) == 0
