"""``benchmarks/gpu_check.sh``, the one command a session lent a GPU runs, stays runnable where no GPU is:
its shell parses, every option it passes a benchmark exists there, and every test file it selects holds
tests its ``-k cuda`` picks."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def test_gpu_check_parses() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_gpu_check_passes_only_options_the_benchmarks_take() -> None:
    calls = re.findall(r"benchmarks/(\w+\.py)([^\n]*)", SCRIPT.read_text())  # (script, rest of its line)
    assert {name for name, _ in calls} == {"tcm_vs_pml.py", "retrieval_vs_pml.py", "opis_cost.py"}
    for name, args in calls:
        usage = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), "--help"], capture_output=True,
                               text=True, check=True, cwd=ROOT).stdout
        takes = set(re.findall(r"--[a-z][a-z-]*", usage))
        for option in re.findall(r"--[a-z][a-z-]*", args):
            assert option in takes, f"gpu_check.sh passes {option} to {name}, which does not take it"


def test_gpu_check_selects_test_files_with_cuda_tests() -> None:
    files = re.findall(r"tests/(test_\w+\.py)", SCRIPT.read_text())
    assert files
    for name in files:
        text = (ROOT / "tests" / name).read_text()
        assert re.search(r"^def test_\w*cuda\w*\(", text, re.M), f"{name} has no test that -k cuda selects"
