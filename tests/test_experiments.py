"""run_cached / run_grid / summarize: train once, load afterwards, resume partial runs, stable keys."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

import tcmlib.experiments as ex
from tcmlib.checkpoint import latest_checkpoint
from tcmlib.train import fit, load_config

ROOT = Path(__file__).resolve().parents[1]
# a few steps of the baby config: 16 images = 4 classes x 4
FAST = dict(batch_size=16, m=4, dim=16, steps_per_epoch=2, epochs=1, progress=False, eval_batch_size=512)


def tiny(**kw):
    return load_config("glyphs_tiny", **{**FAST, **kw})


@pytest.fixture
def fit_counter(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the calls of fit() made through run_cached."""
    calls: list[int] = []

    def counted(*args, **kwargs):
        calls.append(1)
        return fit(*args, **kwargs)

    monkeypatch.setattr(ex, "fit", counted)
    return calls


def test_second_call_loads_without_training(tmp_path: Path, fit_counter: list[int]) -> None:
    cfg = tiny()
    first = ex.run_cached(cfg, cache_dir=tmp_path)
    assert first.trained and len(fit_counter) == 1
    assert (first.run_dir / "summary.json").exists() and first.checkpoint.exists()
    assert not (first.run_dir / "checkpoints").exists()  # only the final weights are kept
    # run_dir, progress and device do not change the key: still a cache hit
    second = ex.run_cached(dataclasses.replace(cfg, run_dir="elsewhere", progress=True, device="cpu"),
                           cache_dir=tmp_path)
    assert not second.trained and len(fit_counter) == 1
    assert second.run_dir == first.run_dir and second.final == first.final and second.history == first.history
    # a dict config is the same run
    assert not ex.run_cached(dataclasses.asdict(cfg), cache_dir=tmp_path).trained
    # the loaded model reproduces the run's own evaluation
    emb, labels = second.test_embeddings()
    assert emb.shape == (len(labels), 16) and (second.run_dir / "test_embeddings.pt").exists()
    again, _ = second.test_embeddings()  # read back from disk
    assert torch.equal(emb, again)
    from tcmlib.metrics import opis

    assert opis(emb, labels) == pytest.approx(second.final["OPIS"], rel=1e-6)
    assert not second.load_model().training
    # force retrains
    assert ex.run_cached(cfg, cache_dir=tmp_path, force=True).trained and len(fit_counter) == 2


def test_key_stable_and_sensitive() -> None:
    cfg = tiny()
    key = ex.config_key(cfg)
    assert len(key) == 12 and key == ex.config_key(tiny())  # same fields, same key
    assert key == ex.config_key(dataclasses.replace(cfg, run_dir="x", progress=True, device="cuda"))
    changed = [dataclasses.replace(cfg, seed=1), dataclasses.replace(cfg, epochs=2), dataclasses.replace(cfg, lr=2e-3),
               dataclasses.replace(cfg, tcm=False), dataclasses.replace(cfg, tcm={"margin_pos": 0.8}),
               dataclasses.replace(cfg, glyph_size="small")]
    keys = {ex.config_key(c) for c in changed}
    assert key not in keys and len(keys) == len(changed)


def test_partial_run_is_resumed(tmp_path: Path, fit_counter: list[int]) -> None:
    cfg = tiny(epochs=2, checkpoint_every_steps=1)
    # an interrupted run: epoch 1 of 2 is done and checkpointed, no summary.json
    run_dir = tmp_path / f"{ex.run_name(cfg)}-{ex.config_key(cfg)}"
    fit(dataclasses.replace(cfg, epochs=1), run_dir=str(run_dir))
    assert latest_checkpoint(run_dir) is not None and not (run_dir / "summary.json").exists()
    res = ex.run_cached(cfg, cache_dir=tmp_path)
    assert res.trained and len(fit_counter) == 1 and res.run_dir == run_dir
    assert [h["epoch"] for h in res.history] == [1, 2] and res.final["step"] == 4
    # identical to a run that was never interrupted
    full = ex.run_cached(cfg, cache_dir=tmp_path / "fresh")
    for k in ("loss", "R@1", "OPIS"):
        assert res.final[k] == pytest.approx(full.final[k], rel=1e-5, abs=1e-7), k


def test_bad_configs_fail_before_training(tmp_path: Path, fit_counter: list[int]) -> None:
    with pytest.raises(ValueError, match="unknown loss"):
        ex.run_cached(tiny(loss="smooth_ab"), cache_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown config keys"):
        ex.run_cached({"dataset": "glyphs", "epoch": 3}, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="not divisible"):
        ex.run_grid([tiny(), tiny(batch_size=18)], seeds=[0], cache_dir=tmp_path, progress=False)
    assert fit_counter == [] and not any(tmp_path.iterdir())


def test_grid_summarize_deltas_csv(tmp_path: Path) -> None:
    configs = {"base": tiny(tcm=False), "tcm": tiny(tcm=True)}
    rows = ex.run_grid(configs, seeds=[0, 1], cache_dir=tmp_path, progress=False)
    assert [(r["name"], r["seed"], r["tcm"]) for r in rows] == [("base", 0, False), ("base", 1, False),
                                                               ("tcm", 0, True), ("tcm", 1, True)]
    assert all(r["trained"] for r in rows)
    assert not any(r["trained"] for r in ex.run_grid(configs, seeds=[0, 1], cache_dir=tmp_path, progress=False))
    table = ex.summarize(rows, by=["backbone", "loss", "tcm"])
    assert [t["n"] for t in table] == [2, 2]
    xs = [r["OPIS"] for r in rows[:2]]
    assert table[0]["OPIS_mean"] == pytest.approx(sum(xs) / 2)
    assert table[0]["OPIS_std"] == pytest.approx(abs(xs[0] - xs[1]) / math.sqrt(2))
    assert math.isnan(ex.summarize(rows[:1])[0]["R@1_std"])
    (d,) = ex.tcm_deltas(table)
    assert d["OPIS_delta"] == pytest.approx(table[1]["OPIS_mean"] - table[0]["OPIS_mean"])
    assert d["OPIS_rel"] == pytest.approx(d["OPIS_delta"] / table[0]["OPIS_mean"])
    path = ex.write_csv(table, tmp_path / "summary.csv")
    back = ex.read_csv(path)
    assert back[0]["tcm"] is False and back[0]["n"] == 2 and back[0]["OPIS_mean"] == pytest.approx(xs[0] / 2 + xs[1] / 2)
    assert "| backbone |" in ex.format_table(table, ["backbone", "tcm", "OPIS_mean"])


def test_default_runs_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TCMLIB_RUNS", str(tmp_path))
    assert ex.default_runs_dir() == tmp_path
    monkeypatch.delenv("TCMLIB_RUNS")
    assert ex.default_runs_dir() == ROOT / ".cache" / "tcm-book" / "runs"
