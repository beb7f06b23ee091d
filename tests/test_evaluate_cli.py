"""``tcmlib-eval`` / ``python -m tcmlib.evaluate`` on tiny fabricated files.

Oracle: the public library functions called directly on the same arrays (the command must print
exactly their numbers); bad files must exit with status 2 and one line naming the file and the fault.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

from tcmlib.evaluate import EvalReport, eval_report, main
from tcmlib.metrics.opis import utility_curves
from tcmlib.metrics.retrieval import recall_and_map_at_r
from tcmlib.report import opis_bootstrap_ci, rates_at_threshold, threshold_for_far

ROOT = Path(__file__).resolve().parents[1]


def _data(n: int = 150, d: int = 8, classes: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    x = (rng.normal(size=(n, d)) + 1.2 * np.eye(classes, d)[y]).astype(np.float32)
    return x, y, y % 2


@pytest.fixture()
def files(tmp_path: Path) -> dict[str, Path]:
    x, y, g = _data()
    out = {"emb": tmp_path / "emb.npy", "lab": tmp_path / "lab.npy", "grp": tmp_path / "grp.npy",
           "npz": tmp_path / "all.npz"}
    np.save(out["emb"], x)
    np.save(out["lab"], y)
    np.save(out["grp"], g)
    np.savez(out["npz"], embeddings=x, labels=y, groups=g)
    return out


def _run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    assert main([*argv, "--json", "--n-boot", "200", "--no-progress"]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_numbers_equal_the_library_called_directly(files, capsys) -> None:
    got = _run_json(capsys, str(files["emb"]), str(files["lab"]), "--groups", str(files["grp"]), "--far", "0.05")
    x, y, g = (torch.from_numpy(np.load(files[k])) for k in ("emb", "lab", "grp"))
    recall, mapr = recall_and_map_at_r(x, y, (1, 2, 4, 8), groups=g)
    assert got["retrieval"] == {**{f"R@{k}": v for k, v in recall.items()}, "MAP@R": mapr}
    t = threshold_for_far(x, y, 0.05)
    assert got["threshold"] == t
    rates = rates_at_threshold(x, y, t)
    assert (got["global_FAR"], got["global_FRR"]) == (rates.global_far, rates.global_frr)
    assert got["per_class"] == {"count": rates.far.numel(), **rates.summary(0.05)}
    assert got["per_group"] == {"count": 2, **rates_at_threshold(x, y, t, groups=g).summary(0.05)}
    curves = utility_curves(x, y)
    ci = opis_bootstrap_ci(curves, n_boot=200)
    assert (got["OPIS"], got["OPIS_CI"]) == (curves.opis, [ci.lo, ci.hi])
    assert got["OPIS"] == pytest.approx(float(curves.utility.var(dim=1, unbiased=False).mean()))
    assert got["eps_OPIS"] == curves.eps_opis(0.1)
    assert got["distance_range"] == list(curves.distance_range) and got["FAR_range"] == [0.01, 0.1]
    assert got["posthoc"] is None and got["num_queries"] == 150 and got["dim"] == 8


def test_npz_input_text_report_plot_and_posthoc(files, capsys, tmp_path) -> None:
    png = tmp_path / "curves.png"
    assert main([str(files["npz"]), "--posthoc", "--clusters", "3", "--plot", str(png), "--n-boot", "100",
                 "--no-progress"]) == 0
    text = capsys.readouterr().out
    for needle in ("R@1", "MAP@R", "OPIS", "10%-OPIS", "distance range: d in [", "at most 0.25",
                   "per class FAR", "per group (2)", "per-class oracle"):
        assert needle in text, needle
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from tcmlib.posthoc import compare_thresholding

    x, y, _ = _data()
    got = _run_json(capsys, str(files["npz"]), "--posthoc", "--clusters", "3")
    assert got["posthoc"] == json.loads(json.dumps(compare_thresholding(x, y, 0.01, n_clusters=3).rows))


def test_calibration_set_chooses_the_threshold(files, capsys, tmp_path) -> None:
    cx, cy, _ = _data(seed=1)
    np.save(tmp_path / "cx.npy", cx)
    np.save(tmp_path / "cy.npy", cy)
    got = _run_json(capsys, str(files["emb"]), str(files["lab"]), "--calibration", str(tmp_path / "cx.npy"),
                    str(tmp_path / "cy.npy"))
    t = threshold_for_far(cx, cy, 0.01)
    assert got["threshold"] == t and got["threshold_source"] == "calibration set"
    assert got["calibration_FAR"] == rates_at_threshold(cx, cy, t).global_far


def test_gallery(files, capsys, tmp_path) -> None:
    gx, gy, _ = _data(n=80, seed=2)
    np.savez(tmp_path / "gal.npz", embeddings=gx, labels=gy)
    argv = [str(files["emb"]), str(files["lab"]), "--gallery", str(tmp_path / "gal.npz")]
    got = _run_json(capsys, *argv)
    x, y, _ = _data()
    recall, mapr = recall_and_map_at_r(x, y, (1, 2, 4, 8), reference=gx, reference_labels=gy)
    assert got["retrieval"] == {**{f"R@{k}": v for k, v in recall.items()}, "MAP@R": mapr}
    assert got["num_gallery"] == 80 and got["pairs"].startswith("query x gallery pairs")
    # every pair-based number: query x gallery pairs (the library's own oracle: tests/test_report.py)
    t = threshold_for_far(x, y, 0.01, reference=gx, reference_labels=gy)
    rates = rates_at_threshold(x, y, t, reference=gx, reference_labels=gy)
    assert got["threshold"] == t and (got["global_FAR"], got["global_FRR"]) == (rates.global_far, rates.global_frr)
    assert got["per_class"] == {"count": rates.far.numel(), **rates.summary(0.01)}
    curves = utility_curves(x, y, reference=gx, reference_labels=gy)
    ci = opis_bootstrap_ci(curves, n_boot=200)
    assert (got["OPIS"], got["OPIS_CI"], got["eps_OPIS"]) == (curves.opis, [ci.lo, ci.hi], curves.eps_opis(0.1))
    grp = tmp_path / "g.npy"
    np.save(grp, np.arange(150) % 3)  # groups of the queries
    got = _run_json(capsys, *argv, "--groups", str(grp))
    g_rates = rates_at_threshold(x, y, t, groups=np.arange(150) % 3, reference=gx, reference_labels=gy)
    assert got["per_group"] == {"count": 3, **g_rates.summary(0.01)}
    assert main([*argv, "--posthoc", "--no-progress"]) == 2
    assert "posthoc" in capsys.readouterr().err


def _bad(tmp_path: Path, case: str) -> tuple[list[str], str]:
    x, y, _ = _data(n=20)
    e, lab = tmp_path / "e.npy", tmp_path / "l.npy"
    np.save(e, x)
    np.save(lab, y)
    if case == "missing":
        return [str(tmp_path / "nope.npy"), str(lab)], "nope.npy does not exist"
    if case == "3d":
        np.save(e, x.reshape(20, 2, 4))
        return [str(e), str(lab)], r"shape \(20, 2, 4\); expected \(N, D\)"
    if case == "length":
        np.save(lab, y[:15])
        return [str(e), str(lab)], r"shape \(15,\); expected \(20,\)"
    if case == "nan":
        x[3, 1] = np.nan
        np.save(e, x)
        return [str(e), str(lab)], r"embeddings \(.*e\.npy\) contains NaN or inf in 1 of 20 rows"
    if case == "float_labels":
        np.save(lab, y + 0.5)
        return [str(e), str(lab)], "integer"
    if case == "strings":
        np.save(lab, np.array(["a"] * 20))
        return [str(e), str(lab)], "dtype <U1; expected numbers"
    if case == "pickle":
        np.save(lab, np.array([{"a": 1}] * 20, dtype=object), allow_pickle=True)
        return [str(e), str(lab)], "not a readable .npy"
    if case == "not_npy":
        lab.write_text("1,2,3\n")
        return [str(e), str(lab)], "not a readable .npy"
    if case == "npz_keys":
        np.savez(tmp_path / "a.npz", x=x, y=y)
        return [str(tmp_path / "a.npz")], r"holds arrays \['x', 'y'\]"
    if case == "no_labels":
        return [str(e)], "no labels"
    if case == "groups":
        np.save(tmp_path / "g.npy", y[:5])
        return [str(e), str(lab), "--groups", str(tmp_path / "g.npy")], r"shape \(20,\)"
    if case == "gallery_files":
        return [str(e), str(lab), "--gallery", str(e), str(lab), str(lab)], "one .npz or two .npy"
    if case == "calibration_dim":  # the library's check (tcmlib.report), reached through the command
        np.save(tmp_path / "c.npy", x[:, :5])
        return [str(e), str(lab), "--calibration", str(tmp_path / "c.npy"), str(lab)], \
            "calibration embeddings have dimension 5, the evaluation ones 8: both must come from the same model"
    if case == "far":
        return [str(e), str(lab), "--far", "1.5"], "far"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing", "3d", "length", "nan", "float_labels", "strings", "pickle", "not_npy",
                                  "npz_keys", "no_labels", "groups", "gallery_files", "calibration_dim", "far"])
def test_bad_files_exit_2_with_one_clear_line(case, tmp_path, capsys) -> None:
    argv, match = _bad(tmp_path, case)
    assert main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tcmlib-eval: error: ") and "Traceback" not in err
    import re

    assert re.search(match, err, re.IGNORECASE), err


def test_evaluate_in_python_short_repr_and_progress_bar(capsys) -> None:
    x, y, _ = _data()
    ev = eval_report(x, y, n_boot=50, progress=True)
    assert isinstance(ev, EvalReport)
    r = repr(ev)
    assert len(r) < 300 and r.startswith("EvalReport(N=150") and "OPIS=" in r
    assert "tcmlib-eval" in capsys.readouterr().err  # the bar, on stderr
    eval_report(x, y, n_boot=50)  # N < 20,000: no bar by default
    assert "tcmlib-eval" not in capsys.readouterr().err
    assert not math.isnan(ev.to_dict()["OPIS"])


def test_console_script_and_module_entry_point(files) -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["tcmlib-eval"] == "tcmlib.evaluate:main"
    proc = subprocess.run([sys.executable, "-m", "tcmlib.evaluate", str(files["emb"]), str(files["lab"]), "--json",
                           "--n-boot", "20"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["num_queries"] == 150
    proc = subprocess.run([sys.executable, "-m", "tcmlib.evaluate", str(files["emb"]) + ".missing"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "does not exist" in proc.stderr
    bad_cal = files["emb"].parent / "cal8x3.npy"
    np.save(bad_cal, np.ones((8, 3), dtype=np.float32))
    np.save(files["emb"].parent / "cal_lab.npy", np.arange(8) % 2)
    proc = subprocess.run([sys.executable, "-m", "tcmlib.evaluate", str(files["emb"]), str(files["lab"]), "--calibration",
                           str(bad_cal), str(files["emb"].parent / "cal_lab.npy")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip() == ("tcmlib-eval: error: calibration embeddings have dimension 3, the evaluation ones "
                                   "8: both must come from the same model")


def _cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tcmlib.evaluate", *argv, "--no-progress"], capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("far, meant", [("1", "0.01"), ("5", "0.05"), ("0.7", "0.007")])
def test_a_far_target_that_looks_like_a_percent_is_refused(files, far, meant) -> None:
    """--far 1 used to report at 100 % FAR without a word; now: exit 2, one line, the fraction it meant."""
    proc = _cli(str(files["emb"]), str(files["lab"]), "--far", far)
    assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    line = proc.stderr.strip()
    assert "\n" not in line and line.startswith(f"tcmlib-eval: error: --far {far} would accept")
    assert f"not a percentage: for {float(far):g} % pass --far {meant}" in line


def test_the_two_fars_are_named_in_one_line_and_opis_far_sets_the_range(files) -> None:
    """--far sets the threshold, --opis-far (alias --far-range) OPIS's range; the report says which is which."""
    proc = _cli(str(files["emb"]), str(files["lab"]), "--far", "1e-3", "--n-boot", "20")
    assert proc.returncode == 0, proc.stderr[-2000:]
    note = [ln for ln in proc.stdout.splitlines() if "OPIS and eps-OPIS average over" in ln]
    assert len(note) == 1, proc.stdout
    assert ("global FAR 1 % .. 10 %, not at the threshold above: its FAR 0.10 % lies outside that range"
            in note[0]) and "--opis-far LO HI" in note[0]
    assert "OPIS" in proc.stdout and "(at most 0.25; lower is more consistent)" in proc.stdout
    x, y = (torch.from_numpy(np.load(files[k])) for k in ("emb", "lab"))
    for flag in ("--opis-far", "--far-range"):
        proc = _cli(str(files["emb"]), str(files["lab"]), "--far", "1e-3", flag, "1e-4", "1e-2", "--json",
                    "--n-boot", "20")
        assert proc.returncode == 0, proc.stderr[-2000:]
        got = json.loads(proc.stdout)
        want = utility_curves(x, y, far_range=(1e-4, 1e-2))
        assert got["FAR_range"] == [1e-4, 1e-2] and got["OPIS"] == want.opis
        assert got["distance_range"] == list(want.distance_range) and got["FAR_target"] == 1e-3
    proc = _cli(str(files["emb"]), str(files["lab"]), "--far", "0.05", "--n-boot", "20")
    assert "the threshold above (FAR 5.00 %) is one of them" in proc.stdout
