"""`make package`'s check: the wheel and sdist in DIST install into a new, empty environment
and work there as a user would run them (issue 34).

    python tools/check_wheel.py dist

1. The wheel holds what resnetlab needs at run time besides Python files (the C source
   of the fused kernels, the serving page, py.typed) and states its dependencies as
   ranges (`wheel_problems`).
2. A new virtual environment (in a temporary folder, removed at the end) gets the wheel,
   with constraints.txt's versions; `resnetlab --help` and a smoke training run (which,
   where there is a C compiler, builds the shipped kernel source) run there from another
   folder, so nothing of this checkout is imported.
3. The sdist is built and installed over it the same way, and `resnetlab --help` runs.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from email.parser import Parser
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Files the package reads at run time that are not Python modules.
DATA_FILES = ("resnetlab/kernels/bn_act.c", "resnetlab/serve/page.html", "resnetlab/py.typed")
RANGED = ("torch", "torchvision")  # never pinned: an install must keep the user's torch


def version() -> str:
    text = (ROOT / "src/resnetlab/__init__.py").read_text()
    found = re.search(r'^__version__ = "([^"]+)"', text, re.M)
    assert found, "src/resnetlab/__init__.py has no __version__"
    return found.group(1)


def wheel_problems(wheel: Path) -> list[str]:
    """What is wrong with a built wheel; empty if nothing."""
    problems = []
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta_name = next((n for n in names if n.endswith(".dist-info/METADATA")), None)
        if meta_name is None:
            return [f"{wheel.name} has no METADATA"]
        meta = Parser().parsestr(z.read(meta_name).decode())
        entry = next((n for n in names if n.endswith(".dist-info/entry_points.txt")), "")
        scripts = z.read(entry).decode() if entry else ""
    problems += [f"{wheel.name} lacks {f}" for f in DATA_FILES if f not in names]
    if meta["Version"] != version():
        problems.append(f"the wheel says version {meta['Version']}, the package {version()}")
    for req in meta.get_all("Requires-Dist") or []:
        name = re.split(r"[ <>=!~;\[]", req, maxsplit=1)[0]
        if name in RANGED and "==" in req:
            problems.append(f"{name} is pinned ({req}): installing resnetlab would replace "
                            "the environment's torch")
    if "resnetlab = resnetlab.cli:main" not in scripts:
        problems.append("the wheel has no `resnetlab` command")
    return problems


def _run(argv: list[str], cwd: Path) -> str:
    print("$", " ".join(argv), flush=True)
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done.stdout + done.stderr


def main(dist: str) -> int:
    folder = Path(dist).resolve()
    v = version()
    wheel = folder / f"resnetlab-{v}-py3-none-any.whl"
    sdist = folder / f"resnetlab-{v}.tar.gz"
    for path in (wheel, sdist):
        if not path.is_file():
            sys.exit(f"{path} is missing: build it first (`make package`)")
    problems = wheel_problems(wheel)
    if problems:
        sys.exit("\n".join(problems))
    with tempfile.TemporaryDirectory(prefix="resnetlab-package-") as tmp:
        where = Path(tmp)
        py = where / "venv/bin/python"
        _run([sys.executable, "-m", "venv", str(where / "venv")], where)
        pip = [str(py), "-m", "pip", "install", "--quiet", "-c", str(ROOT / "constraints.txt")]
        _run([*pip, str(wheel)], where)
        cli = str(where / "venv/bin/resnetlab")
        _run([cli, "--help"], where)
        out = _run([cli, "train", "--preset", "smoke", "--out", str(where / "run")], where)
        if shutil.which("cc") and "fused BN-ReLU kernels: on" not in out:
            sys.exit(f"the installed package did not build its kernels:\n{out}")
        print(out.strip().splitlines()[-1])
        _run([*pip, "--force-reinstall", "--no-deps", str(sdist)], where)
        _run([cli, "--help"], where)
    print(f"resnetlab {v}: wheel and sdist installed into a new environment and ran")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "dist"))
