"""Bad input and faults: every case gets a clear error (naming what is wrong) or a safe recovery.

Config checking, the CLI, resume, the run and glyph caches, base-loss input checks, small numeric
checks and the divergence guard.  Each case of the reliability audit has a test here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import tcmlib.experiments as ex
import tcmlib.train as tr
from tcmlib._checks import check_embeddings, check_labels
from tcmlib.checkpoint import CorruptCheckpointError, latest_checkpoint, load_checkpoint
from tcmlib.losses.registry import make_loss
from tcmlib.metrics import recall_at_k, utility_curves
from tcmlib.train import TrainConfig, fit, load_config, main

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tcmlib" / "configs" / "glyphs_tiny.yaml"
FAST = dict(batch_size=16, m=4, dim=16, steps_per_epoch=2, progress=False, eval_batch_size=512,
            checkpoint_every_steps=0)


def tiny(tmp_path: Path, **kw: Any) -> TrainConfig:
    return load_config(TINY, **{**FAST, "run_dir": str(tmp_path / "run"), "epochs": 1, **kw})


# --------------------------------------------------------------------------- config checking

BAD_FIELDS = [
    ("gamma", -1), ("gamma", 0), ("steps_per_epoch", 0), ("eval_every", 0), ("epochs", "two"), ("epochs", 0),
    ("epochs", 2.5), ("epochs", True), ("dim", -3), ("dim", 0), ("tcm", "yes"), ("tcm", {"margin": 0.5}),
    ("tcm", {"margin_pos": 2.0}), ("tcm", {"lambda_pos": -1}), ("loss_kwargs", {"foo": 1}), ("loss_kwargs", [1]),
    ("lr", -1e-3), ("lr", 0), ("lr", "abc"), ("lr", float("nan")), ("lr", None), ("weight_decay", -1),
    ("head_lr_mult", -1), ("loss_lr_mult", -2), ("val_fraction", 1.0), ("milestones", 3), ("milestones", [0]),
    ("milestones", ["x"]), ("eval_ks", []), ("eval_ks", [0, 1]), ("eval_ks", "1"), ("batch_size", 2.5),
    ("batch_size", 0), ("m", 1), ("pretrained", "no"), ("device", "gpu"), ("device", 3), ("seed", -1),
    ("data_seed", -1), ("num_workers", -1), ("eval_batch_size", 0), ("checkpoint_every_steps", -1),
    ("image_size", 0), ("chunk_size", 0), ("glyph_size", "huge"), ("dataset", "imagenet"), ("dataset", None),
    ("loss", 123), ("loss", "smooth_ab"), ("backbone", None), ("amp", "fp8"), ("optimizer", "sgd"),
    ("progress", "yes"), ("run_dir", ""), ("frozen_bn", 1),
]


@pytest.mark.parametrize("key,value", BAD_FIELDS)
def test_every_bad_field_names_key_and_value(key: str, value: Any) -> None:
    with pytest.raises(ValueError) as err:
        load_config(None, **{key: value}).validate()
    msg = str(err.value)
    assert key in msg, msg
    assert "allowed" in msg or "must" in msg or "choose" in msg or "valid" in msg, msg
    if not isinstance(value, (dict, list)) and value != "":
        assert repr(value) in msg or str(value) in msg, msg


def test_default_and_shipped_configs_stay_valid() -> None:
    TrainConfig().validate()
    for path in sorted((ROOT / "tcmlib" / "configs").glob("*.yaml")):
        load_config(path).validate()


def test_valid_values_are_not_rejected() -> None:
    cfg = load_config(None, lr="1e-4", gamma=1, loss_lr_mult=0, tcm={"margin_pos": 0.8, "lambda_neg": 0},
                      device="cuda:1", data_root=Path("/tmp"), steps_per_epoch=None, milestones=[2, 4])
    cfg.validate()
    assert cfg.lr == 1e-4 and cfg.gamma == 1.0


def test_yaml_errors_are_value_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset: glyphs\nepochs: [1, 2\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- dataset\n- glyphs\n")
    with pytest.raises(ValueError, match="mapping"):
        load_config(bad)
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(TINY, ["epochs=[1"])
    with pytest.raises(ValueError, match="key=value"):
        load_config(TINY, ["=3"])


def test_dataset_is_required_in_a_file(tmp_path: Path) -> None:
    no_ds = tmp_path / "no_dataset.yaml"
    no_ds.write_text("backbone: small_cnn\nloss: smooth_ap\n")
    with pytest.raises(ValueError, match="dataset"):
        load_config(no_ds)
    assert load_config(no_ds, ["dataset=glyphs"]).dataset == "glyphs"  # an override names it
    assert TrainConfig().dataset == "glyphs"  # the dataclass default is unchanged


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_gpu_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no CUDA GPU"):
        fit(tiny(tmp_path, device="cuda"))
    assert not (tmp_path / "run").exists()  # refused before any work


def test_eval_ks_larger_than_the_split(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="eval_ks"):
        fit(tiny(tmp_path, eval_ks=[1, 100_000]))


CLI_CASES = {
    "yaml_syntax": ("dataset: glyphs\nepochs: [1\n", []),
    "wrong_type": (None, ["epochs=two"]),
    "negative_gamma": (None, ["gamma=-1"]),
    "zero_steps": (None, ["steps_per_epoch=0"]),
    "zero_eval_every": (None, ["eval_every=0"]),
    "tcm_yes": (None, ["tcm='yes'"]),  # quoted: bare yes is YAML 1.1 for true
    "unknown_loss_kwargs": (None, ["loss_kwargs={foo: 1}"]),
    "no_dataset": ("backbone: small_cnn\n", []),
    "not_a_mapping": ("[1, 2]\n", []),
    "missing_file": ("<missing>", []),
    "unknown_key": (None, ["epoch=3"]),
}


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_cli_user_errors_print_one_line(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text, overrides = CLI_CASES[case]
    path = TINY
    if text == "<missing>":
        path = tmp_path / "nope.yaml"
    elif text is not None:
        path = tmp_path / "cfg.yaml"
        path.write_text(text)
    assert main(["--config", str(path), "--override", f"run_dir={tmp_path / 'run'}", *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tcmlib-train: error: "), err
    assert "Traceback" not in err[0]


def test_cli_subprocess_yaml_error_has_no_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset: glyphs\n  epochs: 2\n")
    proc = subprocess.run([sys.executable, "-m", "tcmlib.train", "--config", str(bad)], capture_output=True,
                          text=True, cwd=ROOT, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "error:" in proc.stderr and "YAML" in proc.stderr


# --------------------------------------------------------------------------- resume

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-epoch run with a mid-epoch checkpoint (step 1) and the epoch-end one (step 2)."""
    tmp = tmp_path_factory.mktemp("resume")
    fit(tiny(tmp, checkpoint_every_steps=1))
    return tmp


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src / "run", dst / "run")
    return dst


@pytest.mark.parametrize("change", [{"lr": 0.01}, {"loss": "contrastive"}, {"batch_size": 32},
                                    {"tcm": False}, {"seed": 1}, {"steps_per_epoch": 3}])
def test_resume_with_another_config_is_refused(finished_run: Path, tmp_path: Path, change: dict) -> None:
    _copy(finished_run, tmp_path)
    before = (tmp_path / "run" / "config.yaml").read_text()
    with pytest.raises(ValueError, match="cannot resume") as err:
        fit(tiny(tmp_path, epochs=2, **change), resume=True)
    assert list(change)[0] in str(err.value)
    assert (tmp_path / "run" / "config.yaml").read_text() == before  # not overwritten


def test_resume_with_safe_changes_continues(finished_run: Path, tmp_path: Path) -> None:
    _copy(finished_run, tmp_path)
    res = fit(tiny(tmp_path, epochs=2, eval_batch_size=64, num_workers=0, checkpoint_every_steps=5, device="cpu"),
              resume=True)
    assert [r["epoch"] for r in res.history] == [1, 2]


def test_resume_finished_run_says_finished(finished_run: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    _copy(finished_run, tmp_path)
    res = fit(tiny(tmp_path), resume=True)
    out = capsys.readouterr()
    assert "finished run" in out.out + out.err and "epoch 2" not in out.out + out.err
    assert len(res.history) == 1 and res.final["epoch"] == 1


def test_resume_with_fewer_epochs_than_done(finished_run: Path, tmp_path: Path) -> None:
    _copy(finished_run, tmp_path)
    fit(tiny(tmp_path, epochs=2), resume=True)
    with pytest.raises(ValueError, match="already trained 2 epochs"):
        fit(tiny(tmp_path, epochs=1), resume=True)


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "foreign"])
def test_corrupt_newest_checkpoint_falls_back(finished_run: Path, tmp_path: Path, damage: str) -> None:
    _copy(finished_run, tmp_path)
    newest = latest_checkpoint(tmp_path / "run")
    assert newest is not None and newest.name == "step-00000002.pt"
    data = newest.read_bytes()
    newest.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "garbage": os.urandom(4096),
                        "foreign": b""}[damage])
    if damage == "foreign":
        torch.save({"weights": torch.zeros(3)}, newest)
    with pytest.warns(UserWarning, match="falling back"):
        res = fit(tiny(tmp_path), resume=True)  # resumes from step 1, finishes the epoch again
    assert res.final["step"] == 2 and res.final["epoch"] == 1
    assert (tmp_path / "run" / "checkpoints" / "step-00000002.pt.corrupt").exists()
    load_checkpoint(latest_checkpoint(tmp_path / "run"), restore_rng=False)  # the rewritten one is whole


def test_all_checkpoints_corrupt_is_a_clear_error(finished_run: Path, tmp_path: Path) -> None:
    _copy(finished_run, tmp_path)
    for p in (tmp_path / "run" / "checkpoints").glob("step-*.pt"):
        p.write_bytes(b"\x00" * 10)
    with pytest.warns(UserWarning), pytest.raises(CorruptCheckpointError, match="no checkpoint"):
        fit(tiny(tmp_path), resume=True)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_checkpoint(tmp_path / "run" / "checkpoints" / "step-00000001.pt.corrupt")


def test_stale_temporary_files_are_removed(finished_run: Path, tmp_path: Path) -> None:
    _copy(finished_run, tmp_path)
    stale = tmp_path / "run" / "checkpoints" / ".step-abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    fit(tiny(tmp_path), resume=True)
    assert not stale.exists()


# --------------------------------------------------------------------------- divergence guard

def test_exploding_finite_loss_stops_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = tr.make_loss

    def exploding(*args: Any, **kw: Any) -> torch.nn.Module:
        base = real(*args, **kw)

        class Boom(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.base, self.calls = base, 0

            def forward(self, e: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
                self.calls += 1
                out = self.base(e, y)
                return out if self.calls < 4 else out * 1e9

        return Boom()

    monkeypatch.setattr(tr, "make_loss", exploding)
    cfg = tiny(tmp_path, steps_per_epoch=3, epochs=2, tcm=False)
    with pytest.raises(FloatingPointError, match="times the first step") as err:
        fit(cfg)
    assert "last good checkpoint" in str(err.value)
    ckpt = latest_checkpoint(tmp_path / "run")
    assert ckpt is not None and load_checkpoint(ckpt, restore_rng=False)["step"] == 3  # epoch 1's, kept


def test_exploding_weights_stop_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = tr._param_norm

    def norm(*modules: torch.nn.Module) -> float:
        calls.append(1)
        return real(*modules) * (1.0 if len(calls) == 1 else 1e7)  # the initial norm, then a runaway

    monkeypatch.setattr(tr, "_param_norm", norm)
    with pytest.raises(FloatingPointError, match="weight norm"):
        fit(tiny(tmp_path))
    assert latest_checkpoint(tmp_path / "run") is None  # nothing exploded was saved


# --------------------------------------------------------------------------- caches

def _cache_cfg(**kw: Any) -> TrainConfig:
    return load_config(TINY, **{**FAST, "epochs": 1, **kw})


@pytest.fixture
def cached(tmp_path: Path) -> tuple[Path, ex.RunResult]:
    res = ex.run_cached(_cache_cfg(), cache_dir=tmp_path)
    return tmp_path, res


def test_cache_records_checksums(cached: tuple[Path, ex.RunResult]) -> None:
    _, res = cached
    summary = json.loads((res.run_dir / "summary.json").read_text())
    rec = summary["files"]["model.pt"]
    assert rec["size"] == res.checkpoint.stat().st_size and len(rec["sha256"]) == 64
    assert not list(res.run_dir.glob("*.tmp")) and not list(res.run_dir.glob(".*.tmp"))


@pytest.mark.parametrize("damage", ["truncated_model", "deleted_model", "foreign_model", "truncated_summary",
                                    "other_key"])
def test_corrupt_cache_entry_is_retrained(cached: tuple[Path, ex.RunResult], damage: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    cache, res = cached
    model, summary = res.run_dir / "model.pt", res.run_dir / "summary.json"
    if damage == "truncated_model":
        model.write_bytes(model.read_bytes()[:100])
    elif damage == "deleted_model":
        model.unlink()
    elif damage == "foreign_model":
        other = ex.run_cached(_cache_cfg(seed=1), cache_dir=cache)
        model.write_bytes(other.checkpoint.read_bytes())
    elif damage == "truncated_summary":
        summary.write_text(summary.read_text()[:50])
    else:
        data = json.loads(summary.read_text())
        data["key"] = "0" * 12
        summary.write_text(json.dumps(data))
    if damage != "truncated_summary":  # the result object notices too, before loading
        with pytest.raises(ValueError):
            res.load_model()
    with pytest.warns(UserWarning, match="corrupt"):
        again = ex.run_cached(_cache_cfg(), cache_dir=cache)
    assert again.trained
    assert "corrupt" in capsys.readouterr().err
    timing = ("train_time_s", "eval_time_s")
    assert {k: v for k, v in again.final.items() if k not in timing} == \
        {k: v for k, v in res.final.items() if k not in timing}  # same run, trained again: same numbers
    again.load_model()
    assert not ex.run_cached(_cache_cfg(), cache_dir=cache).trained


def test_legacy_entry_without_checksums(cached: tuple[Path, ex.RunResult]) -> None:
    cache, res = cached
    summary = res.run_dir / "summary.json"
    data = json.loads(summary.read_text())
    del data["files"]
    summary.write_text(json.dumps(data))
    state = torch.get_rng_state()
    assert not ex.run_cached(_cache_cfg(), cache_dir=cache).trained  # verified by loading, then checksummed
    assert torch.equal(state, torch.get_rng_state())  # the check drew no random numbers
    assert "files" in json.loads(summary.read_text())
    summary.write_text(json.dumps(data))  # legacy again
    torch.save({"w": torch.zeros(2)}, res.checkpoint)  # a legacy entry with a foreign model.pt
    with pytest.warns(UserWarning, match="corrupt"):
        assert ex.run_cached(_cache_cfg(), cache_dir=cache).trained


def test_stale_cache_temporaries_are_removed(cached: tuple[Path, ex.RunResult]) -> None:
    cache, res = cached
    for name in (".model.pt.123.tmp", "summary.json.tmp"):
        (res.run_dir / name).write_bytes(b"partial")
    assert not ex.run_cached(_cache_cfg(), cache_dir=cache).trained
    assert not (res.run_dir / ".model.pt.123.tmp").exists() and not (res.run_dir / "summary.json.tmp").exists()


def test_truncated_test_embeddings_are_recomputed(cached: tuple[Path, ex.RunResult]) -> None:
    _, res = cached
    emb, labels = res.test_embeddings()
    path = res.run_dir / "test_embeddings.pt"
    path.write_bytes(path.read_bytes()[:64])
    with pytest.warns(UserWarning, match="cannot be read"):
        emb2, labels2 = res.test_embeddings()
    assert torch.equal(emb, emb2) and torch.equal(labels, labels2)


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "missing_array"])
def test_corrupt_glyph_cache_is_regenerated(tmp_path: Path, damage: str) -> None:
    from tcmlib.data.glyphs import cache_file, load_glyphs

    good = load_glyphs("train", "tiny", cache_dir=tmp_path)
    path = cache_file("tiny", 0, 32, tmp_path)
    data = path.read_bytes()
    if damage == "missing_array":
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files if k != "train_labels"}
        with open(path, "wb") as fh:
            np.savez_compressed(fh, **arrays)
    else:
        path.write_bytes({"truncated": data[: len(data) // 3], "empty": b"", "garbage": os.urandom(1000)}[damage])
    with pytest.warns(UserWarning, match="corrupt"):
        again = load_glyphs("train", "tiny", cache_dir=tmp_path)
    assert torch.equal(good.labels, again.labels) and torch.equal(good.images, again.images)
    assert path.read_bytes() == data or len(path.read_bytes()) > 0


# --------------------------------------------------------------------------- base losses

def _batch(n: int = 8, d: int = 4, classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, d, generator=g), torch.arange(n) % classes


ALL_LOSSES = ["contrastive", "multi_similarity", "ntxent", "proxy_anchor", "arcface", "smooth_ap",
              "recall_surrogate"]


def _loss(name: str, tcm: bool = False) -> torch.nn.Module:
    return make_loss(name, tcm=tcm, num_classes=4, embedding_size=4)


@pytest.mark.parametrize("tcm", [False, True])
@pytest.mark.parametrize("name", ALL_LOSSES)
def test_losses_reject_nan_rows(name: str, tcm: bool) -> None:
    e, y = _batch()
    e[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        _loss(name, tcm)(e, y)


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_losses_reject_mismatched_shapes(name: str) -> None:
    e, y = _batch()
    with pytest.raises(ValueError, match="label"):
        _loss(name)(e, y[:5])
    with pytest.raises(ValueError, match="2-D"):
        _loss(name)(e[0], y[:1])


@pytest.mark.parametrize("tcm", [False, True])
@pytest.mark.parametrize("name", ["proxy_anchor", "arcface"])
@pytest.mark.parametrize("bad", [4, -1])
def test_class_losses_reject_out_of_range_labels(name: str, tcm: bool, bad: int) -> None:
    e, y = _batch()
    y[0] = bad
    with pytest.raises(ValueError, match=r"must lie in \[0, 3\]"):
        _loss(name, tcm)(e, y)


def test_pml_calling_convention_kept() -> None:
    e, y = _batch()
    for name in ("contrastive", "ntxent"):
        loss = _loss(name)
        assert torch.isfinite(loss(e, y, None, e.flip(0), y.flip(0)))
        assert torch.isfinite(loss(e, y, indices_tuple=None, ref_emb=e, ref_labels=y))
        with pytest.raises(ValueError, match="ref_labels"):
            loss(e, y, ref_emb=e, ref_labels=y[:3])
        with pytest.raises(ValueError, match="NaN"):
            loss(e, y, ref_emb=torch.full_like(e, float("nan")), ref_labels=y)


def test_check_does_not_change_the_loss() -> None:
    from pytorch_metric_learning import distances, losses

    e, y = _batch()
    plain = losses.ContrastiveLoss(pos_margin=1.0, neg_margin=0.5, distance=distances.CosineSimilarity())
    assert torch.equal(plain(e, y), _loss("contrastive")(e, y))


@pytest.mark.parametrize("bad,exc,match", [
    (123, TypeError, "must be a string"), (None, TypeError, "must be a string"), ("triplet", ValueError, "unknown"),
])
def test_make_loss_bad_names(bad: Any, exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        make_loss(bad)


def test_make_loss_bad_options() -> None:
    with pytest.raises(ValueError, match="no option"):
        make_loss("contrastive", margin=0.3)
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        make_loss("arcface", num_classes=0, embedding_size=4)
    with pytest.raises(ValueError, match="embedding_size must be a positive int"):
        make_loss("proxy_anchor", num_classes=3, embedding_size=2.5)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- numerics, small

@pytest.mark.parametrize("rng", [(3.0, 4.0), (-1.0, 0.5), (0.5, 2.5)])
def test_opis_distance_range_outside_0_2(rng: tuple[float, float]) -> None:
    e, y = _batch(16)
    with pytest.raises(ValueError, match=r"outside \[0, 2\]"):
        utility_curves(e, y, distance_range=rng)


def test_complex_embeddings_rejected() -> None:
    e, y = _batch()
    with pytest.raises(ValueError, match="complex"):
        check_embeddings(e.to(torch.complex64))
    with pytest.raises(ValueError, match="complex"):
        recall_at_k(e.to(torch.complex64), y, [1])


@pytest.mark.parametrize("labels", [np.array(["a", "b"] * 4), ["a", "b"] * 4, np.array([object()] * 8)])
def test_string_labels_rejected(labels: Any) -> None:
    e, _ = _batch()
    with pytest.raises(ValueError, match="labels"):
        check_labels(labels, 8)
    with pytest.raises(ValueError, match="labels"):
        recall_at_k(e, labels, [1])


def test_numpy_integer_ks_accepted() -> None:
    e, y = _batch()
    want = recall_at_k(e, y, [1, 2])
    assert recall_at_k(e, y, np.array([1, 2])) == want
    assert recall_at_k(e, y, [np.int64(1), np.int32(2)]) == want
    assert recall_at_k(e, y, np.int64(1))[1] == want[1]
    with pytest.raises(ValueError, match="positive int"):
        recall_at_k(e, y, [1.5])
    with pytest.raises(ValueError, match="ks must be"):
        recall_at_k(e, y, "1")


@pytest.mark.parametrize("line", ["1 abc", "1 0", "1 201", "1 2 3"])
def test_malformed_cub_class_line(tmp_path: Path, line: str) -> None:
    from tcmlib.data.benchmarks import cub_index

    base = tmp_path / "CUB_200_2011"
    base.mkdir()
    (base / "images.txt").write_text("1 001.a/x.jpg\n2 001.a/y.jpg\n")
    (base / "image_class_labels.txt").write_text(f"{line}\n2 1\n")
    with pytest.raises(ValueError, match="line 1 is malformed"):
        cub_index(tmp_path, "train")
