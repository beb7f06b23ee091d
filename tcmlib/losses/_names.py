"""TCM's parameter names: tcmlib's and pytorch-metric-learning's (pml) for the same four numbers.

pml's ``ThresholdConsistentMarginLoss(margin_plus, margin_minus, lambda_plus, lambda_minus)`` is
tcmlib's ``TCMLoss(margin_pos, margin_neg, lambda_pos, lambda_neg)``.  :func:`tcm_parameters`
lets ``TCMLoss``, ``WithTCM``, ``add_tcm`` and ``make_loss(tcm={...})`` take either spelling, so
code written for pml runs unchanged.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PML_NAMES", "TCM_DEFAULTS", "tcm_parameters"]

TCM_DEFAULTS = {"margin_pos": 0.9, "margin_neg": 0.5, "lambda_pos": 1.0, "lambda_neg": 1.0}
PML_NAMES = {"margin_plus": "margin_pos", "margin_minus": "margin_neg",
             "lambda_plus": "lambda_pos", "lambda_minus": "lambda_neg"}


def tcm_parameters(given: dict[str, Any], where: str) -> dict[str, Any]:
    """The four TCM parameters from the keywords ``given`` (tcmlib's or pml's names; ``None``: not given).

    Returns ``{"margin_pos": ..., "margin_neg": ..., "lambda_pos": ..., "lambda_neg": ...}`` with
    :data:`TCM_DEFAULTS` for those not given.  Raises ``TypeError`` for an unknown keyword (naming the
    valid ones) and for one parameter given under both names; ``where`` names the caller in the message.
    """
    out: dict[str, Any] = {}
    for key, value in given.items():
        if value is None:
            continue
        ours = PML_NAMES.get(key, key)
        if ours not in TCM_DEFAULTS:
            valid = ", ".join(TCM_DEFAULTS) + " (or pml's " + ", ".join(PML_NAMES) + ")"
            raise TypeError(f"{where} got an unknown TCM parameter {key!r}; valid: {valid}")
        if ours in out:
            pml = next(p for p, o in PML_NAMES.items() if o == ours)
            raise TypeError(f"{where} got {ours!r} and pml's {pml!r}, two names for one parameter: pass one")
        out[ours] = value
    return {key: out.get(key, default) for key, default in TCM_DEFAULTS.items()}
