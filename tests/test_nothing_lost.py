"""Issue 27: a run folder is never overwritten silently, a report is never lost to a bad output option,
and the remaining unclear messages name what is wrong and what to do.  Where a user meets an item on
the command line, it is tested as a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

import tcmlib.evaluate as ev
from tcmlib.study import load_runs
from tcmlib.train import TrainConfig, embed, fit, load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tcmlib" / "configs" / "glyphs_tiny.yaml"
FAST = dict(batch_size=16, m=4, dim=16, steps_per_epoch=2, progress=False, eval_batch_size=512,
            checkpoint_every_steps=0, eval_ks=[1, 2])
CLI_OVERRIDES = [f"{k}={json.dumps(v)}" for k, v in FAST.items()] + ["epochs=1"]


def tiny(run_dir: Path, **kw: Any) -> TrainConfig:
    return load_config(TINY, **{**FAST, "run_dir": str(run_dir), "epochs": 1, **kw})


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("TCMLIB_SMOKE", None)
    return env


def _train(run_dir: Path, *flags: str, overrides: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "tcmlib.train", "--config", str(TINY), *flags, "--override", f"run_dir={run_dir}",
           *CLI_OVERRIDES, *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=300)


def _one_error_line(proc: subprocess.CompletedProcess[str], prog: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), lines
    return lines[0]


def _files(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run_dir.iterdir()) if p.is_file()}


# --------------------------------------------------------------------------- a run folder is a record

@pytest.fixture(scope="module")
def results_no_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 1-epoch run whose checkpoints are gone: config.yaml, metrics.jsonl / .csv, nothing to resume."""
    run = tmp_path_factory.mktemp("nocheckpoint") / "run"
    fit(tiny(run))
    shutil.rmtree(run / "checkpoints")
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "metrics.csv", "metrics.jsonl"]
    return run


def _copy(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / "run"))


@pytest.mark.parametrize("flags,overrides", [(["--resume"], ["seed=1"]), (["--resume"], []), ([], []),
                                             ([], ["lr=0.01"])],
                         ids=["resume_seed", "resume_same", "fresh_same", "fresh_lr"])
def test_cli_refuses_to_overwrite_results_without_a_checkpoint(results_no_checkpoint: Path, tmp_path: Path,
                                                               flags: list[str], overrides: list[str]) -> None:
    run = _copy(results_no_checkpoint, tmp_path)
    before = _files(run)
    proc = _train(run, *flags, overrides=tuple(overrides))
    msg = _one_error_line(proc, "tcmlib-train")
    assert _files(run) == before  # config.yaml and metrics untouched
    assert "metrics.jsonl, 1 epoch record" in msg and "--restart" in msg and "new run_dir" in msg, msg
    if flags:
        assert "no checkpoint to resume from" in msg, msg
    for change in overrides:  # the differing key is named with both values
        key, value = change.split("=")
        assert f"differs in ['{key}']" in msg and f"now {yaml.safe_load(value)!r}" in msg, msg
    if not overrides:
        assert "differs" not in msg, msg


def test_cli_restart_starts_over_and_replaces_the_record(results_no_checkpoint: Path, tmp_path: Path) -> None:
    run = _copy(results_no_checkpoint, tmp_path)
    (run / "metrics.jsonl").write_text('{"epoch": 1, "marker": "old"}\n{"epoch": 2, "marker": "old"}\n')
    proc = _train(run, "--resume", "--restart", overrides=("seed=1",))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"restart: removed {run / 'metrics.jsonl'}" in proc.stdout + proc.stderr
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs] == [1] and "marker" not in recs[0] and "R@1" in recs[0]
    assert yaml.safe_load((run / "config.yaml").read_text())["seed"] == 1
    assert (run / "checkpoints").is_dir()


def test_another_runs_config_alone_is_refused_own_config_alone_starts(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({**dict(vars(tiny(run))), "lr": 0.5, "m": 8}))
    with pytest.raises(FileExistsError, match=r"another run's config.yaml \(it differs in \['lr', 'm'\]: "
                                              r"lr: config.yaml 0.5, now 0.001; m: config.yaml 8, now 4\)"):
        fit(tiny(run))
    assert yaml.safe_load((run / "config.yaml").read_text())["lr"] == 0.5
    # this run's own config.yaml (a run stopped before its first result; safe fields may differ): starts
    (run / "config.yaml").write_text(yaml.safe_dump({**dict(vars(tiny(run))), "progress": True, "epochs": 7}))
    res = fit(tiny(run))
    assert res.final["epoch"] == 1 and (run / "metrics.jsonl").is_file()


def test_unreadable_config_is_refused_and_restart_replaces_it(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("- just\n- a list\n")
    with pytest.raises(FileExistsError, match="a config.yaml that does not read as a run config"):
        fit(tiny(run), resume=True)
    res = fit(tiny(run), restart=True)
    assert res.final["epoch"] == 1
    assert load_config(run / "config.yaml").lr == tiny(run).lr


def test_restart_never_deletes_checkpoints(tmp_path: Path) -> None:
    run = tmp_path / "run"
    fit(tiny(run))
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    with pytest.raises(FileExistsError, match=r"already holds checkpoints .*restart does not delete checkpoints"):
        fit(tiny(run, seed=3), restart=True)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before
    assert yaml.safe_load((run / "config.yaml").read_text())["seed"] == 0


def test_run_cached_starts_over_in_its_own_unfinished_entry(tmp_path: Path) -> None:
    """The cache's folder (named by the config key) killed after a result but before a checkpoint: retrained."""
    import tcmlib.experiments as ex

    cfg = tiny(tmp_path / "ignored")
    entry = tmp_path / "cache" / f"{ex.run_name(cfg)}-{ex.config_key(cfg)}"
    entry.mkdir(parents=True)
    (entry / "config.yaml").write_text(yaml.safe_dump(dict(vars(cfg))))
    (entry / "metrics.jsonl").write_text('{"epoch": 1, "marker": "half-written run"}\n')
    res = ex.run_cached(cfg, cache_dir=tmp_path / "cache")
    assert res.trained and res.run_dir == entry and "marker" not in res.final and res.final["epoch"] == 1


# --------------------------------------------------------------------------- tcmlib-eval outputs

@pytest.fixture
def arrays(tmp_path: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(6), 10)
    x = (rng.normal(size=(60, 8)) + 2 * np.eye(8)[y]).astype(np.float32)
    np.save(tmp_path / "emb.npy", x)
    np.save(tmp_path / "lab.npy", y)
    return tmp_path / "emb.npy", tmp_path / "lab.npy"


def _eval(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tcmlib.evaluate", *args, "--n-boot", "50", "--no-progress"],
                          capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=300)


def test_eval_plot_into_a_missing_folder_is_refused_before_the_work(arrays: tuple[Path, Path],
                                                                     tmp_path: Path) -> None:
    emb, lab = arrays
    png = tmp_path / "missing_dir" / "curves.png"
    proc = _eval(str(emb), str(lab), "--json", "--plot", str(png))
    msg = _one_error_line(proc, "tcmlib-eval")
    assert f"the folder {png.parent} does not exist" in msg and "mkdir -p" in msg, msg
    assert proc.stdout == ""
    # before the work: refused even before the embeddings are read (this file does not exist)
    proc = _eval(str(tmp_path / "nope.npy"), str(lab), "--plot", str(png))
    assert "missing_dir" in _one_error_line(proc, "tcmlib-eval")


@pytest.mark.parametrize("case", ["folder", "suffix", "parent_is_file"])
def test_eval_other_unwritable_plot_paths(arrays: tuple[Path, Path], tmp_path: Path, case: str) -> None:
    emb, lab = arrays
    plot, want = {"folder": (tmp_path, "is a folder; give a file name in it"),
                  "suffix": (tmp_path / "curves.xyz", "must end in a figure format ("),
                  "parent_is_file": (emb / "curves.png", "is a file, not a folder")}[case]
    msg = _one_error_line(_eval(str(emb), str(lab), "--plot", str(plot)), "tcmlib-eval")
    assert want in msg, msg


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write into any folder")
def test_eval_plot_into_a_read_only_folder_is_refused(arrays: tuple[Path, Path], tmp_path: Path) -> None:
    emb, lab = arrays
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        msg = _one_error_line(_eval(str(emb), str(lab), "--plot", str(locked / "c.png")), "tcmlib-eval")
    finally:
        locked.chmod(0o700)
    assert f"{locked} is not writable" in msg, msg


def test_eval_unwritable_folder_message(arrays: tuple[Path, Path], tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The branch a non-root user meets (os.access says no), reached in-process whoever runs the tests."""
    emb, lab = arrays
    monkeypatch.setattr(ev.os, "access", lambda path, mode: Path(path) != tmp_path)
    assert ev.main([str(emb), str(lab), "--plot", str(tmp_path / "c.png"), "--no-progress"]) == 2
    assert capsys.readouterr().err.strip() == (f"tcmlib-eval: error: --plot {tmp_path / 'c.png'}: {tmp_path} is not "
                                               "writable; choose another path")


@pytest.mark.parametrize("as_json", [True, False], ids=["json", "text"])
def test_eval_a_failing_figure_never_costs_the_report(arrays: tuple[Path, Path], tmp_path: Path, as_json: bool,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    emb, lab = arrays
    png = tmp_path / "c.png"

    def broken_plot(self: ev.EvalReport) -> Any:
        raise RuntimeError("the figure backend broke")

    monkeypatch.setattr(ev.EvalReport, "plot", broken_plot)
    argv = [str(emb), str(lab), "--plot", str(png), "--n-boot", "50", "--no-progress"] + ["--json"] * as_json
    assert ev.main(argv) == 1
    out, err = capsys.readouterr()
    x, y = torch.from_numpy(np.load(emb)), torch.from_numpy(np.load(lab))
    want = ev.eval_report(x, y, n_boot=50)
    if as_json:
        got = json.loads(out)
        assert got["plot"] is None and got["OPIS"] == want.report.opis and got["retrieval"] == want.retrieval
    else:
        assert out.strip() == want.to_text() and "figure:" not in out
    assert err.strip() == (f"tcmlib-eval: error: the report is complete, but the figure was not saved to {png}: "
                           "RuntimeError: the figure backend broke")
    assert not png.exists()


def test_eval_plot_still_written_and_named(arrays: tuple[Path, Path], tmp_path: Path) -> None:
    emb, lab = arrays
    png = tmp_path / "c.png"
    proc = _eval(str(emb), str(lab), "--json", "--plot", str(png))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["plot"] == str(png) and png.read_bytes()[:4] == b"\x89PNG"


def test_eval_a_folder_as_the_embeddings_file(arrays: tuple[Path, Path], tmp_path: Path) -> None:
    _, lab = arrays
    msg = _one_error_line(_eval(str(tmp_path), str(lab)), "tcmlib-eval")
    assert f"embeddings file {tmp_path} is a folder, not a file (it holds emb.npy, lab.npy)" in msg, msg
    assert "pass the path of the .npy / .npz file itself" in msg and "does not exist" not in msg, msg


# --------------------------------------------------------------------------- clear messages

@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1", torch.device("cuda")])
def test_embed_on_cuda_without_a_gpu(device: Any) -> None:
    data = torch.utils.data.TensorDataset(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError) as err:
        embed(torch.nn.Linear(3, 2), data, device=device)
    msg = str(err.value)
    assert msg.startswith(f"embed(device={device!r}): torch sees no CUDA GPU on this machine; pass device='cpu'"), msg
    assert "NVIDIA" not in msg


def test_embed_bad_device_name() -> None:
    data = torch.utils.data.TensorDataset(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"embed\(device='gpu'\): not a device name; pass 'cpu', 'cuda'"):
        embed(torch.nn.Linear(3, 2), data, device="gpu")
    emb, labels = embed(torch.nn.Linear(3, 2), data, device="cpu")  # a good device still works
    assert emb.shape == (4, 2) and labels.tolist() == [0, 0, 0, 0]


def _record(key: str, stage: str = "tune") -> str:
    return json.dumps({"stage": stage, "key": key, "history": []})


@pytest.mark.parametrize("line,want", [
    (json.dumps({"stage": "tune", "history": []}), "the run record lacks its key field"),
    (json.dumps({"history": []}), "the run record lacks its stage and key field"),
    ("[1, 2]", "is a JSON list, not a run record"),
])
def test_load_runs_record_without_its_key(tmp_path: Path, line: str, want: str) -> None:
    path = tmp_path / "runs.jsonl"
    path.write_text(f"{_record('a')}\n{line}\n{_record('b')}\n")
    with pytest.raises(ValueError) as err:
        load_runs(path)
    assert str(err.value).startswith(f"{path}:2") and want in str(err.value), err.value
    assert "fix or delete that line" in str(err.value)
    path.write_text(f"{_record('a')}\n{_record('b')}\n{_record('a')}\n")  # whole records still load, once each
    assert [r["key"] for r in load_runs(path)] == ["a", "b"]


def test_reproduce_with_a_keyless_record_is_one_clear_line(tmp_path: Path) -> None:
    path = tmp_path / "ch07" / "runs.jsonl"
    path.parent.mkdir()
    path.write_text(json.dumps({"stage": "tune", "study": "ch07"}) + "\n")
    proc = subprocess.run([sys.executable, "-m", "tcmlib.experiments", "reproduce", "ch07", "--scale", "cpu",
                           "--results", str(tmp_path), "--max-runs", "0"], capture_output=True, text=True, cwd=ROOT,
                          env=_env(), timeout=300)
    msg = _one_error_line(proc, "python -m tcmlib.experiments")
    assert f"{path}:1: the run record lacks its key field" in msg, msg


@pytest.mark.parametrize("value", ["-1", "-5"])
def test_reproduce_negative_max_runs_is_refused(tmp_path: Path, value: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "tcmlib.experiments", "reproduce", "ch07", "--results",
                           str(tmp_path), "--max-runs", value], capture_output=True, text=True, cwd=ROOT, env=_env(),
                          timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "python -m tcmlib.experiments reproduce: error: --max-runs must be >= 0 (how many new runs to train before "
        f"stopping), got {value}")
    assert list(tmp_path.iterdir()) == []  # nothing started


def test_yaml_config_with_a_key_twice_is_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "dup.yaml"
    cfg.write_text("dataset: glyphs\nlr: 1e-3\nepochs: 2\n# the same key again, further down\nlr: 1e-2\n")
    proc = subprocess.run([sys.executable, "-m", "tcmlib.train", "--config", str(cfg), "--override",
                           f"run_dir={tmp_path / 'run'}"], capture_output=True, text=True, cwd=ROOT, env=_env(),
                          timeout=300)
    msg = _one_error_line(proc, "tcmlib-train")
    assert msg == f"tcmlib-train: error: {cfg}: key 'lr' is given twice (lines 2 and 5); keep one"
    assert not (tmp_path / "run").exists()


def test_yaml_duplicate_inside_a_mapping_and_merge_keys(tmp_path: Path) -> None:
    cfg = tmp_path / "dup.yaml"
    cfg.write_text("dataset: glyphs\ntcm:\n  margin_pos: 0.5\n  lambda_pos: 1.0\n  margin_pos: 0.6\n")
    with pytest.raises(ValueError, match=r"key 'margin_pos' is given twice \(lines 3 and 5\)"):
        load_config(cfg)
    # a YAML merge key may be overridden: that is what it is for, not a duplicate
    cfg.write_text("dataset: glyphs\ntcm:\n  <<: {margin_pos: 0.5, lambda_pos: 1.0}\n  margin_pos: 0.4\n")
    assert load_config(cfg).tcm == {"margin_pos": 0.4, "lambda_pos": 1.0}
