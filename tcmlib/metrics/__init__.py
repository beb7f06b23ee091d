"""Evaluation: per-class utility curves, OPIS, eps-OPIS, Recall@k and MAP@R, exact and streamed."""
