"""Generated single-cell counts: small AnnData for tests/demos, and corpora of any size chunk by chunk.

Counts are negative binomial around per-cell-type expression programs with log-normal library
sizes and a multiplicative batch effect, over real human gene symbols so the vocabulary matches.
`SyntheticModel` holds the parameters (drawn from a seed, or per-gene means fitted to a real
h5ad); `sample` draws any number of cells from a given RNG, so a 10⁶-cell corpus is written one
seeded chunk at a time (deterministic, resumable, memory bounded by the chunk).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from fm.vocab import GeneVocab


@dataclass
class SyntheticModel:
    """Parameters of the generator: genes, per-type programs (relative means), batch effects, NB shape."""

    genes: np.ndarray  # gene symbols (n_genes,)
    programs: np.ndarray  # (n_types, n_genes) relative expression
    batch_effect: np.ndarray  # (n_batches, n_genes) multiplicative
    dispersion: float = 0.4
    library_mean: float = 2000.0  # median total count per cell
    library_sigma: float = 0.4

    @classmethod
    def draw(cls, n_genes: int = 2000, n_types: int = 5, n_batches: int = 2, seed: int = 0,
             dispersion: float = 0.4, rng: np.random.Generator | None = None,
             include: Sequence[str] = (), de_sigma: float = 1.0) -> "SyntheticModel":
        """Random parameters; `rng` (if given) is advanced exactly as synthetic_anndata always did.

        `include`: human gene symbols that must be among the genes (e.g. ligands and receptors a
        test asks for); the rest are drawn at random. Without it the draw is unchanged. `de_sigma`: the
        log-scale spread of a type's fold changes on its ~10% program genes (larger = more distinct types,
        as marker-driven PBMC types; the random stream does not depend on it).
        """
        rng = rng if rng is not None else np.random.default_rng(seed)
        vocab = GeneVocab.default()
        coding = np.flatnonzero((vocab.species == "human") & (vocab.biotypes == "protein_coding"))
        _, first = np.unique(vocab.symbols[coding], return_index=True)  # one id per symbol
        pool = coding[first]
        forced = pool[np.isin(vocab.symbols[pool], list(include))]
        missing = sorted(set(include) - set(vocab.symbols[forced]))
        if missing:
            raise ValueError(f"include: not human protein-coding symbols of the vocabulary: {missing}")
        if len(forced) > n_genes:
            raise ValueError(f"include names {len(forced)} genes, more than n_genes={n_genes}")
        if len(forced):
            pool = pool[~np.isin(pool, forced)]
        chosen = np.concatenate([forced, rng.choice(pool, n_genes - len(forced), replace=False)])
        genes = vocab.symbols[np.sort(chosen)]
        base = rng.lognormal(mean=-2.0, sigma=1.5, size=n_genes)  # a few high, many low genes
        programs = base * rng.lognormal(0.0, de_sigma, size=(n_types, n_genes)) ** (rng.random((n_types, n_genes)) < 0.1)
        batch_effect = rng.lognormal(0.0, 0.3, size=(n_batches, n_genes))
        return cls(np.asarray(genes, dtype=object), programs, batch_effect, dispersion)

    @classmethod
    def fit(cls, adata, n_types: int = 5, n_batches: int = 2, seed: int = 0, max_cells: int = 5000) -> "SyntheticModel":
        """Per-gene mean profile, library size and NB dispersion (moments, given library size) from a real count file.

        Programs perturb the fitted mean profile per type; genes are the file's own var_names. Reads at
        most `max_cells` rows (backed files stay on disk).
        """
        rng = np.random.default_rng(seed)
        x = adata.X[: min(adata.n_obs, max_cells)]
        x = sp.csr_matrix(x, dtype=np.float64) if not sp.issparse(x) else x.tocsr().astype(np.float64)
        total = np.asarray(x.sum(1)).ravel()
        lib = total[total > 0]
        frac = np.asarray(x.sum(0)).ravel() / max(total.sum(), 1.0)  # pooled gene fractions
        # NB with mean mu_ij = frac_j · lib_i: var = mu + phi·mu²  →  phi_j = Σ((x - mu)² - mu) / Σ mu²
        x2 = np.asarray(x.multiply(x).sum(0)).ravel()
        xl = np.asarray(x.T @ total).ravel()
        s1, s2 = total.sum(), (total ** 2).sum()
        num = x2 - 2 * frac * xl + frac ** 2 * s2 - frac * s1
        ok = frac * s1 / max(x.shape[0], 1) > 0.05  # genes with a mean above 0.05 counts
        # low percentile: the spread of phi_j comes mostly from cell types, which the programs model
        phi = float(np.clip(np.percentile(num[ok] / (frac[ok] ** 2 * s2), 10), 0.01, 10.0)) if ok.any() else 0.4
        base = np.maximum(frac, 1e-9)
        programs = base * rng.lognormal(0.0, 1.0, size=(n_types, base.size)) ** (rng.random((n_types, base.size)) < 0.1)
        batch_effect = rng.lognormal(0.0, 0.3, size=(n_batches, base.size))
        return cls(np.asarray(adata.var_names, dtype=object), programs, batch_effect, phi,
                   float(np.median(lib)) if lib.size else 2000.0,
                   float(np.std(np.log(lib))) if lib.size > 1 else 0.4)

    @property
    def n_types(self) -> int:
        return self.programs.shape[0]

    @property
    def n_batches(self) -> int:
        return self.batch_effect.shape[0]

    def sample(self, n_cells: int, rng: np.random.Generator) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
        """(counts CSR float32, cell_type ids, batch ids) for `n_cells` cells drawn from `rng`."""
        cell_type = rng.integers(self.n_types, size=n_cells)
        batch = rng.integers(self.n_batches, size=n_cells)
        library = rng.lognormal(np.log(self.library_mean), self.library_sigma, size=n_cells)
        mu = self.programs[cell_type] * self.batch_effect[batch]
        mu = mu / mu.sum(1, keepdims=True) * library[:, None]
        r = 1.0 / self.dispersion
        counts = rng.poisson(rng.gamma(r, mu / r)).astype(np.float32)  # NB as a gamma-Poisson mixture
        return sp.csr_matrix(counts), cell_type, batch


def synthetic_anndata(n_cells: int = 800, n_genes: int = 2000, n_types: int = 5, n_batches: int = 2,
                      seed: int = 0, dispersion: float = 0.4, include: Sequence[str] = (),
                      proteins: Sequence[str] = (), spatial: bool = False, de_sigma: float = 1.0) -> ad.AnnData:
    """Raw-count AnnData with obs['cell_type'] and obs['batch'] (ground truth for checks).

    `include`: gene symbols that must be among the genes; `de_sigma`: see SyntheticModel.draw.
    Drawn after the counts (the counts do not depend on them):
    `proteins` names → obsm['protein_counts'], a DataFrame of CITE-seq-like antibody counts (negative
    binomial around a per-type level, scaled by the cell's library size; names matching
    igg/isotype/control get one low level for every type, as isotype controls);
    `spatial` → obsm['spatial'], 2-D coordinates in [0, 100]² with cells of a type near that type's
    centre (so spatial neighbours share types, as in tissue).
    """
    rng = np.random.default_rng(seed)
    model = SyntheticModel.draw(n_genes, n_types, n_batches, dispersion=dispersion, rng=rng, include=include,
                                de_sigma=de_sigma)
    counts, cell_type, batch = model.sample(n_cells, rng)
    obs = pd.DataFrame({"cell_type": pd.Categorical([f"type_{t}" for t in cell_type]),
                        "batch": pd.Categorical([f"batch_{b}" for b in batch])},
                       index=[f"cell_{i}" for i in range(n_cells)])
    adata = ad.AnnData(counts, obs=obs, var=pd.DataFrame(index=pd.Index(model.genes.astype(str), dtype=str)))
    if len(proteins):
        names = list(proteins)
        level = rng.lognormal(np.log(30.0), 1.0, size=(n_types, len(names)))  # per-type antibody level
        control = np.array([any(k in n.lower() for k in ("igg", "isotype", "control")) for n in names])
        level[:, control] = 3.0
        mu = level[cell_type] * (counts.sum(1).A1 / model.library_mean)[:, None]  # scales with capture
        adt = rng.poisson(rng.gamma(5.0, mu / 5.0)).astype(np.float64)
        adata.obsm["protein_counts"] = pd.DataFrame(adt, index=adata.obs_names, columns=names)
    if spatial:
        centres = rng.uniform(15, 85, size=(n_types, 2))
        adata.obsm["spatial"] = np.clip(centres[cell_type] + rng.normal(0, 12, size=(n_cells, 2)), 0, 100)
    return adata
