"""``benchmarks/gpu_check.sh``, the one command a session lent a GPU runs, stays runnable where no GPU is:
its shell parses, every option it passes a benchmark exists there, every test file it selects holds
tests its ``-k cuda`` picks, and its first checks (``benchmarks/gpu_smoke.py``) run through on the CPU
at tiny sizes, and skip what they cannot import."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
SMOKE = ROOT / "benchmarks" / "gpu_smoke.py"


def test_gpu_check_parses() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_gpu_check_passes_only_options_the_benchmarks_take() -> None:
    calls = re.findall(r"benchmarks/(\w+\.py)([^\n]*)", SCRIPT.read_text())  # (script, rest of its line)
    assert {name for name, _ in calls} == {"gpu_smoke.py", "tcm_vs_pml.py", "retrieval_vs_pml.py", "opis_cost.py"}
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


def _smoke(tmp_path: Path, *prefix: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "smoke.json"
    res = subprocess.run([sys.executable, *prefix, str(SMOKE), "--device", "cpu", "--dry-run", "--json", str(out)],
                         capture_output=True, text=True, cwd=ROOT, timeout=400,
                         env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res, json.loads(out.read_text())


def test_gpu_smoke_dry_run_on_the_cpu(tmp_path: Path) -> None:
    res, rec = _smoke(tmp_path)
    table = res.stdout.split("\n\n")[-1]
    for label in ("fit fp16", "fit bf16", "step (GPU alone)", "loader", "evaluate", "smooth_ap", "rs@k", "tcm"):
        assert re.search(rf"^{re.escape(label)} ", table, re.M), (label, table)
    assert "gpu_smoke: all checks passed" in res.stdout
    dry = rec["sizes"]
    for amp in ("fp16", "bf16"):
        fit = rec[f"fit {amp}"]
        assert fit["steps"] == dry["fit_steps"] and fit["s_per_step"] > 0
        assert (fit["scale"] is not None) == (amp == "fp16")  # a GradScaler only for fp16
    assert rec["step (GPU alone)"]["images_per_s"] > 0 and rec["loader"]["images_per_s"] > 0
    ev = rec["evaluate"]
    assert ev["n"] == dry["eval_n"] and set(ev["metrics"]) == {"R@1", "R@10", "R@100", "MAP@R", "OPIS", "eps_OPIS"}
    assert 0 < ev["metrics"]["R@10"] < 1  # the fabricated embeddings are neither hopeless nor trivial
    assert ev["device_vs_cpu_f64"] == [0.0, 0.0]  # (the device is the CPU here)
    for name in ("smooth_ap", "rs@k", "tcm"):
        loss = rec["losses"][name]
        assert 0 < loss["value"] and loss["value_rel"] < 1e-5 and loss["grad_rel"] < 1e-4, (name, loss)


BLOCK_TORCHVISION = """
import runpy, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torchvision":
            raise ImportError(f"No module named {name!r}")
sys.meta_path.insert(0, Block())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_gpu_smoke_skips_what_it_cannot_import(tmp_path: Path) -> None:
    res, rec = _smoke(tmp_path, "-c", BLOCK_TORCHVISION)
    for label in ("fit fp16", "fit bf16", "step (GPU alone)", "loader"):
        assert re.search(rf"^{re.escape(label)} .*SKIPPED: No module named 'torchvision", res.stdout, re.M), label
        assert "skipped" in rec[label]
    assert "metrics" in rec["evaluate"] and "smooth_ap" in rec["losses"]  # the rest still ran
    assert "all checks passed (skipped ones said so above)" in res.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_gpu_smoke_says_when_there_is_no_gpu() -> None:
    res = subprocess.run([sys.executable, str(SMOKE), "--device", "cuda", "--quick"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert res.returncode == 2 and "no CUDA device" in res.stderr and "Traceback" not in res.stderr
