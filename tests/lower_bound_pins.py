"""Print the pip requirements of the lower-bound environment (``make lower-bounds``), one per line.

Every ``name>=X.Y`` of pyproject.toml (the dependencies and the ``all`` extra) becomes
``name==X.Y.*``: the oldest minor series the bounds admit, at its last patch release (torch 2.5.*,
torchvision 0.20.*, numpy 1.25.*, ...).  The test tools (pytest, hypothesis, pytest-rerunfailures)
keep their requirements.txt pins.  Not a test module (pytest collects only ``test_*.py``).
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEST_TOOLS = ("pytest", "hypothesis", "pytest-rerunfailures")


def lower_bound_pins() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = []
    for req in [*project["dependencies"], *project["optional-dependencies"]["all"]]:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*>=\s*(\d+)\.(\d+)(?:\.\d+)*", req.strip())
        if m is None:
            raise SystemExit(f"pyproject requirement {req!r} is not of the form name>=X.Y: no lower bound to test")
        pins.append(f"{m[1]}=={m[2]}.{m[3]}.*")
    exact = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", (ROOT / "requirements.txt").read_text(), re.M))
    return pins + [f"{name}=={exact[name]}" for name in TEST_TOOLS]


if __name__ == "__main__":
    sys.stdout.write("\n".join(lower_bound_pins()) + "\n")
