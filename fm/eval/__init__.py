"""`fm eval`: benchmark suites (annotation, batch correction, imputation, modality prediction,
cell–cell communication) comparing classical baselines, controls and FM checkpoints.

Layout: registry (task name → module), context (what every task shares: data loading, splits,
gene selection, FM embeddings; the normalisation is fm.preprocessing's), harness (suite YAML →
results DataFrame; the one loop over methods and checkpoints), controls (random-init twins of a
checkpoint and the row names of their runs), deltas (Δ of FM rows vs the best baseline and vs the
twin, 95 % interval over seeds), report (CSV, markdown, plots, meta.json), tasks/ (one module per task: prepare, METHODS, score). Heavy libraries are imported
inside functions.
"""
from __future__ import annotations

__all__ = ["run_suite"]


def run_suite(*args, **kwargs):
    from fm.eval.harness import run_suite as _run

    return _run(*args, **kwargs)
