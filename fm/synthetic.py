"""Small generated AnnData for machines without the real data (and for tests of scale).

Counts are negative binomial around per-cell-type expression programs with log-normal library
sizes and a multiplicative batch effect, over real human gene symbols so the vocabulary matches.
"""
from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from fm.vocab import GeneVocab


def synthetic_anndata(n_cells: int = 800, n_genes: int = 2000, n_types: int = 5, n_batches: int = 2,
                      seed: int = 0, dispersion: float = 0.4) -> ad.AnnData:
    """Raw-count AnnData with obs['cell_type'] and obs['batch'] (ground truth for checks)."""
    rng = np.random.default_rng(seed)
    vocab = GeneVocab.default()
    coding = np.flatnonzero((vocab.species == "human") & (vocab.biotypes == "protein_coding"))
    _, first = np.unique(vocab.symbols[coding], return_index=True)  # one id per symbol
    genes = vocab.symbols[np.sort(rng.choice(coding[first], n_genes, replace=False))]
    base = rng.lognormal(mean=-2.0, sigma=1.5, size=n_genes)  # a few high, many low genes
    programs = base * rng.lognormal(0.0, 1.0, size=(n_types, n_genes)) ** (rng.random((n_types, n_genes)) < 0.1)
    batch_effect = rng.lognormal(0.0, 0.3, size=(n_batches, n_genes))
    cell_type = rng.integers(n_types, size=n_cells)
    batch = rng.integers(n_batches, size=n_cells)
    library = rng.lognormal(np.log(2000), 0.4, size=n_cells)
    mu = programs[cell_type] * batch_effect[batch]
    mu = mu / mu.sum(1, keepdims=True) * library[:, None]
    r = 1.0 / dispersion
    counts = rng.poisson(rng.gamma(r, mu / r)).astype(np.float32)  # NB as a gamma-Poisson mixture
    obs = pd.DataFrame({"cell_type": pd.Categorical([f"type_{t}" for t in cell_type]),
                        "batch": pd.Categorical([f"batch_{b}" for b in batch])},
                       index=[f"cell_{i}" for i in range(n_cells)])
    return ad.AnnData(sp.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=pd.Index(genes, dtype=str)))
