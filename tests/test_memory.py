"""Every shipped config fits the machine it declares (Colab T4: 12 GB host, 15 GB GPU; H100: 80 GB GPU),
by :func:`tcmlib.memory.estimate_memory`; the loader's workers and prefetching fit the host."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from tcmlib import memory
from tcmlib.memory import (GB, HOST_BASE, TARGETS, WORKER_BASE, declared_target, estimate_memory, fit_to_target,
                           loader_settings)
from tcmlib.models import build_embedder
from tcmlib.train import available_configs, fit, load_config

T4, H100 = TARGETS["colab_t4"], TARGETS["h100"]


@pytest.mark.parametrize("name", available_configs())
def test_every_shipped_config_fits_its_declared_target(name: str) -> None:
    cfg = load_config(name)
    target = declared_target(cfg)
    est = estimate_memory(cfg)
    assert est.device_bytes <= target.device_bytes, (
        f"{name} needs {est.device_bytes / GB:.1f} GB on the GPU, more than {target.name}'s "
        f"{target.device_bytes / GB:.0f} GB: lower chunk_size in tcmlib/configs/generate.py")
    if target.host_bytes is not None:
        assert est.host_bytes <= target.host_bytes, (
            f"{name} needs {est.host_bytes / GB:.1f} GB of host memory, more than {target.name}'s "
            f"{target.host_bytes / GB:.0f} GB")
    assert est.num_workers <= (target.cpus or cfg.num_workers)


def test_declared_targets() -> None:
    assert declared_target(load_config("sop_resnet50_smooth_ap")) is H100
    assert declared_target(load_config("inat_vit_b_16_recall_surrogate_tcm")) is H100
    assert declared_target(load_config("cub_vit_b_16_smooth_ap")) is T4
    assert declared_target(load_config("glyphs_tiny")) is T4


def test_host_arithmetic_by_hand() -> None:
    """SOP at B = 4,000, 224 x 224 RGB, sent as uint8: 4000 x 3 x 224 x 224 = 602,112,000 bytes a batch on the host
    (a float32 batch would be 2,408,448,000); on the card the uint8 batch and its float32 normalisation."""
    cfg = load_config("sop_resnet50_smooth_ap")
    batch = 4000 * 3 * 224 * 224
    assert batch == 602_112_000
    # an H100 machine with the config's 8 workers x prefetch 2: 16 ready + 8 collating + step + pinned = 26 batches
    est = estimate_memory(cfg, H100)
    assert (est.num_workers, est.prefetch_factor, est.batches_on_host) == (8, 2, 26)
    assert est.host_bytes == 3 * GB + 8 * GB // 4 + 26 * batch  # ~20.7 GB (float32 batches: ~67.6 GB)
    assert est.image_bytes == 3 * 224 * 224
    # a Colab T4: 2 CPUs, 0.75 x 12 GB = 9 GB for the loader: 2 workers x prefetch 2 hold 2 x 2 + 2 + 2 = 8 batches,
    # 3 + 2 x 0.25 + 8 x 0.602 = 8.32 GB: it fits (float32 batches forced the main process to read alone)
    est = estimate_memory(cfg, T4)
    assert (est.num_workers, est.prefetch_factor, est.batches_on_host) == (2, 2, 8)
    assert est.host_bytes == HOST_BASE + 2 * GB // 4 + 8 * batch
    assert fit_to_target(cfg, T4) == {"num_workers": 2, "prefetch_factor": 2}


def test_loader_settings_cap_workers_by_cpus_and_prefetch_by_memory() -> None:
    cub = load_config("cub_resnet50_smooth_ap")  # 400 uint8 images = 60,211,200 bytes a batch, 8 workers
    batch = 400 * 3 * 224 * 224
    assert loader_settings(cub, cpus=2, host_bytes=12 * GB) == (2, 2)
    assert loader_settings(cub, cpus=64, host_bytes=None) == (8, 2)  # no memory bound: the config's 8
    # 8 workers x 2 + 8 + 2 = 26 batches: 3 GB + 2 GB + 1.57 GB = 6.57 GB; x 1: 18 batches, 6.08 GB
    assert loader_settings(cub, cpus=64, host_bytes=9 * GB) == (8, 2)  # 0.75 x 9 = 6.75 GB
    assert loader_settings(cub, cpus=64, host_bytes=8.5 * GB) == (8, 1)  # 0.75 x 8.5 = 6.375 GB
    assert HOST_BASE + 8 * WORKER_BASE + 18 * batch <= 0.75 * 8.5 * GB < HOST_BASE + 8 * WORKER_BASE + 26 * batch
    assert loader_settings(cub, cpus=64, host_bytes=4 * GB) == (0, 0)  # not even the base fits: no workers
    assert loader_settings(dataclasses.replace(cub, num_workers=0), cpus=64, host_bytes=None) == (0, 0)
    assert loader_settings(cub, cpus=64, host_bytes=None, world_size=4)[0] == 8


def test_device_estimate_parts() -> None:
    """Adam state 16 bytes a parameter (+2 under AMP), the batch, one chunk's activations, the loss."""
    cfg = load_config("cub_resnet50_smooth_ap")
    est = estimate_memory(cfg, T4)
    assert est.amp_dtype == torch.float16 and estimate_memory(cfg, H100).amp_dtype == torch.bfloat16
    n_params = sum(p.numel() for p in build_embedder("resnet50", 512, False, 3).parameters())
    assert est.parameters == n_params and est.state_bytes == 18 * n_params
    per_chunk = estimate_memory(dataclasses.replace(cfg, chunk_size=64), T4).activation_bytes
    assert est.activation_bytes == pytest.approx(2 * per_chunk, rel=1e-6)  # linear in the chunk
    fp32 = estimate_memory(dataclasses.replace(cfg, amp=None), T4)
    assert 1.6 < fp32.activation_bytes / est.activation_bytes < 2.4  # half precision halves most saved tensors
    # the batch on the card: as it arrives (uint8) and normalised (float32, 4 bytes a value)
    assert est.device_bytes == est.state_bytes + 400 * 5 * est.image_bytes + est.activation_bytes + est.loss_bytes


@pytest.mark.parametrize("backbone, side", [("resnet50", 224), ("vit_b_16", 224), ("small_cnn", 32)])
def test_saved_activations_against_module_outputs(backbone: str, side: int) -> None:
    """An independent count: the outputs of every leaf module in a forward pass (what most layers save for
    backward, once each).  The saved-tensor measurement must agree within a factor of 2."""
    with torch.device("meta"):
        model = build_embedder(backbone, 512, False, 3, image_size=side).train()
    outputs: list[int] = []
    for mod in model.modules():
        if not list(mod.children()):
            mod.register_forward_hook(lambda m, i, o: outputs.append(o.numel() * o.element_size())
                                      if isinstance(o, torch.Tensor) else None)
    model(torch.empty(4, 3, side, side, device="meta"))
    per_image_outputs = sum(outputs) / 4
    _, per_image = memory._model_profile(backbone, 512, 3, side, False, None, torch.float32)
    assert 0.5 < per_image / per_image_outputs < 2.0, (per_image, per_image_outputs)


def test_fit_caps_workers_by_host_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(memory, "host_memory_bytes", lambda: 2 * GB)  # less than the process itself: no workers
    cfg = load_config("glyphs_tiny", run_dir=str(tmp_path), epochs=1, batch_size=16, m=4, dim=8, steps_per_epoch=1,
                      progress=False, num_workers=2)
    assert fit(cfg).final["step"] == 1
    assert "num_workers 2 -> 0" in capsys.readouterr().out
