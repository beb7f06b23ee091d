"""fit() on the tiny glyph set, the CLI, and the errors bad input must raise."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

from tcmlib.checkpoint import latest_checkpoint, load_checkpoint
from tcmlib.data import MPerClassBatchSampler, load_glyphs
from tcmlib.train import TrainConfig, available_configs, fit, load_config, main

ROOT = Path(__file__).resolve().parents[1]
TINY = "glyphs_tiny"  # a config that ships with tcmlib (tcmlib/configs/glyphs_tiny.yaml), loaded by name
TINY_FILE = ROOT / "tcmlib" / "configs" / "glyphs_tiny.yaml"
# a few steps of the baby config: 16 images = 4 classes x 4
FAST = dict(batch_size=16, m=4, dim=16, steps_per_epoch=3, progress=False, eval_batch_size=512)


def test_fit_one_epoch_logs_metrics(tmp_path: Path) -> None:
    cfg = load_config(TINY, run_dir=str(tmp_path / "run"), epochs=1, **{**FAST, "steps_per_epoch": None})
    result = fit(cfg)  # one full epoch
    assert len(result.history) == 1
    rec = result.final
    n_steps = len(MPerClassBatchSampler(load_glyphs("train", "tiny").labels, 4, 16).plan(0))
    for key in ("epoch", "step", "loss", "loss_base", "loss_tcm", "R@1", "R@8", "MAP@R", "OPIS", "eps_OPIS"):
        assert key in rec, key
    assert rec["step"] == n_steps > 10 and rec["epoch"] == 1
    assert 0.0 <= rec["R@1"] <= 1.0 and rec["OPIS"] >= 0.0 and rec["loss_tcm"] >= 0.0
    assert abs(rec["loss"] - rec["loss_base"] - rec["loss_tcm"]) < 1e-5  # L = L_base + L_TCM
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(s)["R@1"] for s in lines] == [rec["R@1"]]
    assert (tmp_path / "run" / "metrics.csv").read_text().startswith("epoch,step,lr,loss")
    assert result.checkpoint == latest_checkpoint(tmp_path / "run")
    ckpt = load_checkpoint(result.checkpoint, restore_rng=False)
    assert ckpt["epoch"] == 1 and ckpt["step"] == n_steps and ckpt["config"]["dim"] == 16
    # a second fit into the same run_dir without resume refuses to mix runs
    with pytest.raises(FileExistsError, match="resume"):
        fit(cfg)


def test_cli_with_config(tmp_path: Path) -> None:
    run = tmp_path / "cli"
    overrides = [f"run_dir={run}", "epochs=1", "steps_per_epoch=2", "batch_size=16", "dim=8", "progress=false"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "tcmlib.train", "--config", TINY, "--override", *overrides],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    final = json.loads(proc.stdout.strip().splitlines()[-1])
    assert final["step"] == 2 and "OPIS" in final
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1


def test_cli_reports_bad_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", str(TINY_FILE), "--override", "loss=smooth_ab", f"run_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "unknown loss 'smooth_ab'" in err and "recall_surrogate" in err


@pytest.mark.parametrize(
    "change, message",
    [
        ({"loss": "triplet_magic"}, r"unknown loss .*smooth_ap"),
        ({"backbone": "resnet51"}, r"unknown backbone .*resnet50.*small_cnn"),
        ({"dataset": "imagenet"}, r"unknown dataset .*cub.*glyphs"),
        ({"batch_size": 30, "m": 4}, r"not divisible by m = 4"),
        ({"optimizer": "sgd"}, r"adam or adamw"),
        ({"amp": "fp8"}, r"bf16"),
        ({"batch_size": 400, "m": 4}, r"only 40 classes"),  # tiny glyphs: 40 train classes < 100
    ],
)
def test_bad_input_raises(tmp_path: Path, change: dict, message: str) -> None:
    cfg = load_config(TINY, run_dir=str(tmp_path), **{**FAST, **change})
    with pytest.raises(ValueError, match=message):
        fit(cfg)


def test_config_by_name_or_path() -> None:
    names = available_configs()
    assert {"glyphs_tiny", "glyphs_small_cnn_smooth_ap", "cub_resnet50_smooth_ap_tcm", "digits_arcface"} <= set(names)
    assert names == sorted(p.stem for p in TINY_FILE.parent.glob("*.yaml"))  # every shipped file, nothing else
    by_name = load_config("glyphs_tiny")
    assert by_name == load_config(TINY_FILE) == load_config(str(TINY_FILE)) == load_config("glyphs_tiny.yaml")
    assert by_name.glyph_size == "tiny" and load_config("glyphs_tiny", epochs=7).epochs == 7
    assert load_config("glyphs_small_cnn_smooth_ap").loss == "smooth_ap"


def test_unknown_config_name_lists_the_packaged_ones(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"glyphs_tynu.*packaged configs: .*glyphs_tiny"):
        load_config("glyphs_tynu")
    with pytest.raises(FileNotFoundError):  # a path stays a path
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(FileNotFoundError):
        load_config("configs/glyphs_tiny.yaml")  # the old checkout folder is gone: the name is the way


def test_cli_reports_unknown_config_name(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", "glyphs_tynu"]) == 2
    err = capsys.readouterr().err
    assert "glyphs_tynu" in err and "glyphs_small_cnn_smooth_ap" in err


def test_unknown_config_key() -> None:
    with pytest.raises(ValueError, match="unknown config keys.*learning_rate"):
        load_config(TINY, ["learning_rate=0.1"])


class TurnsNaN(Dataset):
    """Random 16x16 grey images of 8 classes that become NaN after ``good`` items were read."""

    def __init__(self, good: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(64, 1, 16, 16, generator=g)  # (N, 1, H, W)
        self.labels = torch.arange(8).repeat_interleave(8)  # (N,)
        self.good, self.reads = good, 0

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        self.reads += 1
        x = self.x[i] if self.reads <= self.good else torch.full_like(self.x[i], float("nan"))
        return x, int(self.labels[i])


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path: Path) -> None:
    train = TurnsNaN(good=1 + 32)  # fit reads item 0 once (channels), then two good steps of 16; the third is NaN
    test = TurnsNaN(good=10**9)
    cfg = TrainConfig(dataset="glyphs", backbone="small_cnn", dim=8, loss="smooth_ap", tcm=True, batch_size=16,
                      m=4, epochs=1, lr=1e-3, checkpoint_every_steps=1, progress=False, run_dir=str(tmp_path))
    with pytest.raises(FloatingPointError, match=r"step 3 .*last good checkpoint is kept.*step-00000002\.pt"):
        fit(cfg, train_data=train, test_data=test)
    path = latest_checkpoint(tmp_path)
    assert path is not None and path.name == "step-00000002.pt"
    state = load_checkpoint(path, restore_rng=False)["model"]
    assert all(bool(torch.isfinite(t).all()) for t in state.values() if t.is_floating_point())


def test_fit_bf16_gradcache_channels_last_on_cpu(tmp_path: Path) -> None:
    """The GPU code path (autocast, chunked gradient cache, channels_last) also runs on a CPU."""
    cfg = load_config(TINY, run_dir=str(tmp_path), epochs=1, amp="bf16", chunk_size=8, channels_last=True,
                      frozen_bn=True, **{**FAST, "steps_per_epoch": 1})
    rec = fit(cfg).final
    assert rec["step"] == 1 and rec["loss"] == rec["loss"] and 0.0 <= rec["R@1"] <= 1.0


def test_evaluation_scores_the_embeddings_where_the_model_made_them(monkeypatch) -> None:
    """train.evaluate_model keeps the embeddings on the model's device (out_device=None); embed's default stays the CPU."""
    import tcmlib.train as train_mod
    from tcmlib.embedding import embed as real_embed

    seen = {}

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real_embed(*args, **kwargs)

    monkeypatch.setattr(train_mod, "embed", spy)
    data = train_mod.build_data(train_mod.load_config(None, dataset="glyphs", glyph_size="tiny"))[1]
    model = train_mod.build_embedder("small_cnn", 8, False, 1, image_size=32)
    out = train_mod.evaluate_model(model, data, ks=(1,), device="cpu")
    assert seen["out_device"] is None and 0.0 <= out["R@1"] <= 1.0
    emb, labels = real_embed(model, data, device="cpu", out_device=None)
    assert emb.device.type == "cpu" and emb.dtype == torch.float32 and labels.dtype == torch.int64
