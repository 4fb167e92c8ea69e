"""The normalisations every part of fm agrees on, in one place so that the benchmark, the task heads
and the public API cannot drift apart: counts per cell (`TARGET_SUM`), log-normalisation of an
AnnData and the per-cell CLR of protein counts.

Light at import (numpy only); scanpy is imported inside the function that needs it.
"""
from __future__ import annotations

import numpy as np

TARGET_SUM = 1e4
"""Counts per cell after normalisation (scanpy's normalize_total default; CellTypist expects exactly this)."""


def log_normalise(adata):
    """normalize_total to TARGET_SUM + log1p on a copy; raw counts kept in layers['counts']. The one
    normalisation every method of every benchmark task sees."""
    import scanpy as sc

    out = adata.copy()
    out.layers["counts"] = out.X.copy()
    sc.pp.normalize_total(out, target_sum=TARGET_SUM)
    sc.pp.log1p(out)
    return out


def clr(counts: np.ndarray) -> np.ndarray:
    """Seurat's CLR with margin = 2 (per cell, across that cell's proteins), = muon
    `prot.pp.clr(axis=1)`: log1p(x / exp(mean(log1p(x)))), the mean over all of the cell's ADTs,
    zeros included. Per cell because a cell's ADT depth is what it corrects for; note Seurat's
    default margin = 1 and muon's default axis = 0 are per *protein*, across cells."""
    x = np.asarray(counts, dtype=np.float64)
    geo = np.exp(np.log1p(x).mean(axis=1, keepdims=True))
    return np.log1p(x / geo)


__all__ = ["TARGET_SUM", "clr", "log_normalise"]
