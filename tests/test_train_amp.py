"""``amp: auto`` picks what the card computes natively; ``bf16`` on a card without it is refused.

No GPU is needed: the capability queries are patched to answer as a T4 (7.5), a V100 (7.0), an
A100 (8.0) and an H100 (9.0) would.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tcmlib.train import available_configs, fit, load_config, resolve_amp

CUDA = torch.device("cuda")


def _card(monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int]) -> None:
    """Make torch answer the capability queries as a card of this compute capability would."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True:
                        including_emulation or capability >= (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: f"a card of capability {capability}")


@pytest.mark.parametrize("capability, want", [((7, 5), (torch.float16, True)), ((7, 0), (torch.float16, True)),
                                              ((8, 0), (torch.bfloat16, False)), ((9, 0), (torch.bfloat16, False))])
def test_auto_is_bf16_where_native_else_fp16_with_a_scaler(monkeypatch: pytest.MonkeyPatch, capability: tuple,
                                                           want: tuple) -> None:
    _card(monkeypatch, capability)
    assert resolve_amp("auto", CUDA) == want
    assert resolve_amp("auto", "cuda:0") == want


def test_auto_is_off_on_the_cpu_and_explicit_choices_stand() -> None:
    assert resolve_amp("auto", "cpu") == (None, False)
    assert resolve_amp(None, "cpu") == (None, False)
    assert resolve_amp("bf16", "cpu") == (torch.bfloat16, False)  # the CPU kernels have bf16
    assert resolve_amp("fp16", "cpu") == (torch.float16, True)


def test_bf16_on_a_t4_is_refused_with_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    _card(monkeypatch, (7, 5))
    with pytest.raises(ValueError, match=r"'bf16'.*capability 7\.5.*no native bf16.*amp: auto"):
        resolve_amp("bf16", CUDA)
    assert resolve_amp("fp16", CUDA) == (torch.float16, True)
    _card(monkeypatch, (8, 0))
    assert resolve_amp("bf16", CUDA) == (torch.bfloat16, False)


def test_the_gpu_configs_default_to_auto() -> None:
    photo = [n for n in available_configs() if n.split("_")[0] in ("cub", "cars", "sop", "inat")]
    assert len(photo) == 32
    assert {load_config(n).amp for n in photo} == {"auto"}


def test_fit_with_auto_on_the_cpu_trains_without_autocast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list = []
    real = torch.autocast

    def spy(*args: object, **kwargs: object) -> torch.autocast:
        seen.append((args, kwargs))
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch, "autocast", spy)
    cfg = load_config("glyphs_tiny", run_dir=str(tmp_path), epochs=1, amp="auto", batch_size=16, m=4, dim=8,
                      steps_per_epoch=1, progress=False)
    rec = fit(cfg).final
    assert rec["step"] == 1 and rec["loss"] == rec["loss"]
    assert not [s for s in seen if s[1].get("enabled", True) is not False], seen  # auto on a CPU: no autocast
