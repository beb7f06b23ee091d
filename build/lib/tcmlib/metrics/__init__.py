"""Evaluation: per-class utility curves, OPIS, eps-OPIS, Recall@k and MAP@R, exact and streamed."""
from tcmlib.metrics.retrieval import map_at_r, per_query_retrieval, recall_and_map_at_r, recall_at_k  # noqa: F401
from tcmlib.metrics.opis import UtilityCurves, eps_opis, opis, utility_curves  # noqa: F401
