"""Issue 34: the package as the ecosystem expects it. The wheel holds the kernel source,
the serving page and py.typed, states torch as a range and carries the one version; the
whole install into a new environment is `make package` (tools/check_wheel.py), slow."""

from __future__ import annotations

import subprocess
import sys
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


def test_the_wheel_holds_what_the_package_needs(tmp_path: Path) -> None:
    wheel = _build("wheel", tmp_path, isolated=False)
    assert wheel.name == f"resnetlab-{resnetlab.__version__}-py3-none-any.whl"
    assert check_wheel.wheel_problems(wheel) == []


def test_a_pinned_torch_is_a_problem(tmp_path: Path) -> None:
    """The check itself can fail: a wheel that pins torch, or lacks the kernel source."""
    import zipfile

    good = _build("wheel", tmp_path, isolated=False)
    bad = tmp_path / "bad" / good.name
    bad.parent.mkdir()
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("METADATA"):
                data = data.replace(b"Requires-Dist: torch<3,>=2.14.1",
                                    b"Requires-Dist: torch==2.14.1")
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
