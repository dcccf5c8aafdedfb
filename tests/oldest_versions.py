"""The oldest versions pyproject.toml allows, as pip constraints: `python tests/oldest_versions.py`.

`make test-oldest` installs them into their own venv and runs the suite there, so every
declared floor is one that works (docs/development.md). Requirements whose marker does not hold
on this Python (tomli on 3.11+) are left out.
"""

from __future__ import annotations

import sys
from pathlib import Path

from packaging.requirements import Requirement

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent


def oldest_versions() -> dict[str, str]:
    """Package name -> the lowest version its `>=` specifier allows."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    floors = {}
    for line in project["dependencies"]:
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        floor = [s.version for s in requirement.specifier if s.operator == ">="]
        if len(floor) != 1:
            sys.exit(f"{line}: give it one '>=' floor, which `make test-oldest` installs")
        floors[requirement.name] = floor[0]
    return floors


if __name__ == "__main__":
    print("\n".join(f"{name}=={version}" for name, version in oldest_versions().items()))
