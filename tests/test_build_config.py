"""The book builds cannot hang for long: ipykernel 6.x, and the smoke build's cell timeout.

ipykernel 7.x intermittently loses an ``execute_reply`` (nbclient then waits forever; upstream:
vscode-jupyter #17228 / #17410, nbclient #312), so requirements.txt pins the newest 6.x.  The smoke
book (``make browser``) is built from ``_config.yml`` with its cell timeout lowered to 600 s, so a hung
cell fails it in minutes; the default build keeps 3600 s for real training.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ipykernel_pinned_to_6x() -> None:
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", (ROOT / "requirements.txt").read_text(), re.M))
    assert pins["ipykernel"].startswith("6."), "ipykernel 7.x loses execute replies: keep the 6.x pin"
    import ipykernel

    assert ipykernel.__version__ == pins["ipykernel"], "the environment is not the pinned one: run make install"


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_smoke_book_config_times_out_cells_within_10_minutes(tmp_path: Path) -> None:
    jb_config = pytest.importorskip("jupyter_book.config")
    smoke = tmp_path / "_config.yml"
    dry = subprocess.run(["make", "-n", "browser", f"SMOKE_CONFIG={smoke}", f"PY={sys.executable}"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    writer = [line for line in dry.splitlines() if "safe_dump" in line]
    assert len(writer) == 1, dry
    subprocess.run(writer[0], shell=True, cwd=ROOT, check=True)
    assert f"--config {smoke}" in dry, "the smoke build must use the generated config"

    def timeout(path: Path) -> int:
        cfg, _ = jb_config.get_final_config(user_yaml=path, sourcedir=ROOT, cli_config={"latex_individualpages": False})
        return int(cfg["nb_execution_timeout"])

    assert 0 < timeout(smoke) <= 600
    assert timeout(ROOT / "_config.yml") >= 3600  # the real build trains models
