"""Run-time switches shared by the library and the notebooks: smoke mode, scale, seeding, device.

The one place that reads ``TCMLIB_SMOKE`` and ``TCMLIB_SCALE``.  Notebooks call :func:`is_smoke` and shrink their
work when it is true (fewer epochs, fewer classes) without taking another code path.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch

__all__ = ["is_smoke", "smoke_note", "smoke_tag", "scale", "SCALES", "glue", "seed_everything", "default_device"]

SCALES = ("cpu", "gpu")


def is_smoke() -> bool:
    """True when the env var ``TCMLIB_SMOKE`` is set to a true value (``1``, ``true``, ``yes``)."""
    return os.environ.get("TCMLIB_SMOKE", "").strip().lower() in {"1", "true", "yes", "on"}


def scale() -> str:
    """The experiment scale of Part II: ``TCMLIB_SCALE`` (``cpu``, the default, or ``gpu``).

    The one switch between the committed CPU study and its GPU version (more classes, seeds and
    epochs, a third backbone); chapters 7-10 and 12 read it here.  Raises ``ValueError`` for
    another value.
    """
    value = os.environ.get("TCMLIB_SCALE", "cpu").strip().lower() or "cpu"
    if value not in SCALES:
        raise ValueError(f"TCMLIB_SCALE={value!r}: use one of {', '.join(SCALES)}")
    return value


def smoke_note() -> str:
    """A line to print under any output made in smoke mode (empty string otherwise)."""
    if not is_smoke():
        return ""
    return (
        "SMOKE MODE (TCMLIB_SMOKE=1): tiny data and few steps, so these numbers only show that "
        "the code runs; unset TCMLIB_SMOKE for real results."
    )


def smoke_tag() -> str:
    """A short suffix for figure titles and table captions: ``" [SMOKE MODE]"`` in smoke mode, else ``""``."""
    return " [SMOKE MODE]" if is_smoke() else ""


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and PyTorch (CPU and CUDA); return a ``torch.Generator`` seeded alike."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    return torch.Generator().manual_seed(seed)


def default_device() -> torch.device:
    """``cuda`` when a GPU is visible, else ``mps`` on Apple silicon, else ``cpu``."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def glue(name: str, value: object) -> None:
    """Store ``value`` for the book's prose (myst-nb ``glue``); returns nothing, so a cell that ends
    with it displays nothing.

    A ``str`` is glued as Markdown, so the page writes ``{glue:md}`name``` inline; numbers should be
    formatted by the caller first.  Without myst-nb (Colab, plain Jupyter) nothing is stored, so a
    chapter runs anywhere.
    """
    try:
        from IPython.display import Markdown
        from myst_nb import glue as _glue
    except ImportError:
        return
    _glue(name, Markdown(value) if isinstance(value, str) else value, display=False)
