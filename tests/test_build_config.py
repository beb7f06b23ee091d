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


def test_no_output_capturing_widgets_in_executed_chapters() -> None:
    """``interact`` / ``interactive`` / ``Output`` widgets stall unattended execution.

    Found with a debug-logged kernel and py-spy (``make test`` hung in chapter 3, ipykernel 6 and 7
    alike): the kernel sent the cell's ``execute_reply`` and went idle, while nbclient, mirroring the
    ``Output`` widget's new outputs, sent a ``comm_msg`` on the shell socket whose reply it was
    awaiting; the awaiting poll missed the reply (an edge-triggered wake-up lost to the concurrent
    send) and slept until the cell timeout. Chapters use widgets that need no ``Output`` capture
    (e.g. a slider observed by an ``Image`` widget).
    """
    bad = []
    for md in sorted((ROOT / "notebooks").glob("*.md")):
        for i, line in enumerate(md.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(r"\b(interact|interactive|interact_manual|interactive_output)\s*\(|widgets\.Output\s*\(", code):
                bad.append(f"{md.name}:{i}: {line.strip()}")
    assert not bad, "Output-capturing widgets stall the executed build:\n" + "\n".join(bad)


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_test_runs_the_chapters_once_from_the_wheel_with_timeout_and_reruns() -> None:
    """``make test`` runs the chapters only through the wheel-installed run, with hang protection."""
    dry = subprocess.run(["make", "-n", "test", f"PY={sys.executable}"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    pytest_lines = [line for line in dry.splitlines() if " -m pytest " in line and "-m browser" not in line]
    unit = [line for line in pytest_lines if "tests -q" in line]
    chapters = [line for line in pytest_lines if "-m notebooks" in line]
    assert len(unit) == 1 and "not notebooks" in unit[0], pytest_lines
    assert len(chapters) == 1 and "tests/test_packaging.py" in chapters[0], pytest_lines
    assert re.search(r"TCMLIB_NBMAKE_ARGS=\"[^\"]*--nbmake-timeout=300\b", chapters[0]), chapters[0]
    assert "--reruns 2" in chapters[0], chapters[0]
    assert not any("--nbmake" in line and "TCMLIB_NBMAKE_ARGS" not in line for line in pytest_lines), (
        "the chapters run once, from the installed wheel, not also from the checkout")
