"""Evaluation: Recall@k, MAP@R, per-class utility curves, OPIS and eps-OPIS, exact and streamed.

:func:`evaluate_embeddings` computes them all from one set of passes over the pairs (see
:mod:`tcmlib.metrics.evaluation` for keys and units).
"""
from tcmlib.metrics.retrieval import map_at_r, per_query_retrieval, recall_and_map_at_r, recall_at_k  # noqa: F401
from tcmlib.metrics.opis import UtilityCurves, eps_opis, opis, utility_curves  # noqa: F401
from tcmlib.metrics.evaluation import Evaluation, evaluate, evaluate_embeddings  # noqa: F401
