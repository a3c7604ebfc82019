"""Write the versions installed for resnetlab[dev,deploy,serve,docs,cluster], and everything
they need, as pip constraints (`make upgrade`; `make setup` installs with them).

Walks the requirements of the installed distributions from resnetlab's own, evaluating
their environment markers here, so the file holds what this project needs and nothing
else that happens to be in the environment.
"""

from __future__ import annotations

import sys
from importlib import metadata

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def closure(root: str, extras: set[str]) -> dict[str, str]:
    """{distribution name: installed version} of `root[extras]` and its requirements."""
    seen: dict[str, str] = {}
    walked: set[tuple[str, str]] = set()  # (distribution, extra or "") already followed
    todo = [(root, extras)]
    while todo:
        name, wanted = todo.pop()
        dist = metadata.distribution(name)
        key = canonicalize_name(dist.metadata["Name"])
        seen[key] = dist.version
        for extra in {"", *wanted} - {e for k, e in walked if k == key}:
            walked.add((key, extra))
            for text in dist.requires or []:
                req = Requirement(text)
                if req.marker is None or req.marker.evaluate({"extra": extra}):
                    if req.marker is None and extra:
                        continue  # followed with extra ""
                    todo.append((req.name, set(req.extras)))
    return seen


def main() -> int:
    pins = closure("resnetlab", {"dev", "deploy", "serve", "docs", "cluster"})
    pins.pop("resnetlab")
    print("# Written by `make upgrade` (tools/pin.py) from an environment that passed the")
    print("# whole test suite; `make setup` installs with these versions.")
    for name in sorted(pins):
        print(f"{name}=={pins[name]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
