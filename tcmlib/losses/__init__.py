"""Loss functions: TCM, Smooth-AP, the Recall@k surrogate, and a registry that adds TCM to any base loss.

Every loss module is called as pytorch-metric-learning's (pml) losses are::

    loss(embeddings (B, D), labels (B,), indices_tuple=None, ref_emb (M, D)=None, ref_labels (M,)=None)

so it works in pml's ``MultipleLosses``, with pml's miners, in its trainers, and in
``DistributedLossWrapper`` through :func:`as_pml_loss`.  The reference set is ``ref_emb`` /
``ref_labels`` everywhere (``tcm_loss(ref_embeddings=)`` is its deprecated old name).

==================================  ======================================================================
tcmlib                              pytorch-metric-learning (v2.9)
==================================  ======================================================================
``TCMLoss``, ``tcm_loss``           ``ThresholdConsistentMarginLoss``: equal value and gradient, with or
                                    without a miner's ``indices_tuple`` (with ``ref_emb`` pml pairs
                                    ``embeddings`` with ``embeddings``; we pair them with ``ref_emb``)
``margin_pos`` / ``margin_neg``     ``margin_plus`` / ``margin_minus`` (defaults 0.9 / 0.5; ``TCMLoss``,
                                    ``WithTCM``, ``add_tcm`` and ``make_loss(tcm=)`` take either name)
``lambda_pos`` / ``lambda_neg``     ``lambda_plus`` / ``lambda_minus`` (defaults 1 / 1; either name)
``SmoothAPLoss(temperature=0.01)``  ``SmoothAPLoss(temperature=0.01)`` (not in pml 2.7); pml needs equal
                                    class sizes and groups positives by batch position (equal to ours
                                    only when #classes = samples per class); ours takes any batch
``RecallAtKSurrogateLoss``          no pml equivalent
``WithTCM(base)``, ``add_tcm``      ``MultipleLosses([base, ThresholdConsistentMarginLoss()],
                                    miners=[miner, None])`` (TCM on every pair, as in the paper)
``indices_tuple``, ``ref_emb``,     the same names; Smooth-AP and RS@k rank the whole batch: they
``ref_labels``                      raise ``ValueError`` given a miner's tuple or a reference set
``labels=None`` with a tuple        the same for TCM (pml's ``pass_labels_to_loss_fn=False``); Smooth-AP
                                    and RS@k need labels and say so
``reducer=``                        Smooth-AP, RS@k: a pml reducer of the per-query losses (``"element"``);
                                    TCM: refused (already reduced; pml's reducers leave its value as is)
``as_pml_loss(loss)``               a ``BaseMetricLossFunction`` for ``DistributedLossWrapper``; pickles
==================================  ======================================================================
"""
from tcmlib.losses.tcm import TCMLoss, tcm_loss  # noqa: E402,F401
from tcmlib.losses.combine import WithTCM, add_tcm  # noqa: E402,F401
from tcmlib.losses.smooth_ap import SmoothAPLoss, smooth_ap_loss  # noqa: E402,F401
from tcmlib.losses.recall_surrogate import RecallAtKSurrogateLoss, recall_surrogate_loss, simix_samples  # noqa: E402,F401
from tcmlib.losses.registry import available_losses, loss_param_groups, make_loss  # noqa: E402,F401
from tcmlib.losses.pml_compat import as_pml_loss  # noqa: E402,F401
