"""Ligand–receptor scoring shared by both fm.interactions variants: the resource, complexes, cell
groups, group statistics, the permutation null over cell labels and the LIANA-shaped result.

Conventions (LIANA / CellPhoneDB): a resource is a frame with `ligand` and `receptor` columns; a
complex is written A_B and its expression in a cell is the minimum over its subunits; results have
one row per (source, target, ligand_complex, receptor_complex). A p-value is
(1 + #{null ≥ observed}) / (1 + n_perms) with cell labels permuted over cells (seeded).
"""
from __future__ import annotations

import logging
from typing import Callable

import numpy as np
import pandas as pd
import scipy.sparse as sp

from fm.paths import data_dir

log = logging.getLogger("fm")

RESOURCE_FILE = "lr/liana_omni_resource.csv"
"""Resources by name: LIANA's OmniPath table under the data directory (FM_DATA_DIR); nothing is downloaded."""
_OMNIPATH_NAMES = {"source_genesymbol": "ligand", "target_genesymbol": "receptor"}


# ---------------------------------------------------------------- resource
def load_resource(resource) -> pd.DataFrame:
    """Unique (ligand, receptor) pairs from a frame (LIANA's column names, e.g. the output of
    liana.resource.select_resource, or OmniPath's source/target_genesymbol) or a resource name
    looked up in <data dir>/lr/liana_omni_resource.csv ('consensus' human, 'mouseconsensus', …)."""
    if isinstance(resource, pd.DataFrame):
        table = resource.rename(columns={k: v for k, v in _OMNIPATH_NAMES.items() if v not in resource.columns})
        missing = {"ligand", "receptor"} - set(table.columns)
        if missing:
            raise ValueError(f"resource frame needs columns 'ligand' and 'receptor' (LIANA's names); it has "
                             f"{list(resource.columns)}")
    elif isinstance(resource, str):
        path = data_dir() / RESOURCE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"resource {resource!r}: {path} not found (set FM_DATA_DIR to the shared data "
                                    "directory), or pass a frame with ligand/receptor columns, e.g. "
                                    f"liana.resource.select_resource({resource!r})")
        table = pd.read_csv(path)
        if resource not in set(table["resource"]):
            raise ValueError(f"resource {resource!r} is not in {path}; available: {sorted(set(table['resource']))}")
        table = table[table["resource"] == resource].rename(columns=_OMNIPATH_NAMES)
    else:
        raise TypeError(f"resource must be a resource name or a DataFrame, got {type(resource).__name__}")
    pairs = table[["ligand", "receptor"]].dropna().astype(str).drop_duplicates().reset_index(drop=True)
    if pairs.empty:
        raise ValueError("the ligand–receptor resource has no pairs")
    return pairs


def subunits(name: str) -> list[str]:
    return name.split("_")


def usable_pairs(pairs: pd.DataFrame, available, where: str) -> pd.DataFrame:
    """The pairs whose every subunit gene is in `available`; warns how many survive, errors if none."""
    available = set(available)
    ok = np.array([all(g in available for g in subunits(lig) + subunits(rec))
                   for lig, rec in zip(pairs["ligand"], pairs["receptor"])], dtype=bool)
    absent = sorted({g for lig, rec in zip(pairs["ligand"][~ok], pairs["receptor"][~ok])
                     for g in subunits(lig) + subunits(rec) if g not in available})
    hint = ("Use a resource of the data's species ('consensus' for human, 'mouseconsensus' for mouse gene "
            "symbols) and gene symbols as var_names, as in the resource.")
    if not ok.any():
        raise ValueError(f"none of the {len(pairs)} ligand–receptor pairs has all its genes in {where} (absent "
                         f"e.g. {absent[:8]}). {hint}")
    if not ok.all():
        log.warning("%d of %d ligand–receptor pairs kept: %d need genes absent from %s (e.g. %s). %s",
                    ok.sum(), len(pairs), (~ok).sum(), where, absent[:5], hint)
    return pairs[ok].reset_index(drop=True)


def pair_genes(pairs: pd.DataFrame) -> list[str]:
    """Every subunit gene of the pairs, sorted."""
    return sorted({g for n in pd.concat([pairs["ligand"], pairs["receptor"]]) for g in subunits(n)})


def complex_values(values: np.ndarray, genes: list[str], names) -> np.ndarray:
    """cells × len(names): per cell, the minimum over each name's subunits of `values` (cells × genes)."""
    pos = {g: i for i, g in enumerate(genes)}
    return np.stack([values[:, [pos[g] for g in subunits(n)]].min(axis=1) for n in names], axis=1)


# ---------------------------------------------------------------- groups
def group_codes(obs: pd.DataFrame, groupby: str, min_cells: int = 2) -> tuple[np.ndarray, list[str]]:
    """Integer code per cell of obs[groupby] and the group names; every group needs ≥ min_cells cells
    (a group mean of one cell has no null distribution worth the name)."""
    if groupby not in obs.columns:
        raise KeyError(f"no obs column {groupby!r} to group cells by (obs has {list(obs.columns)}); pass "
                       "groupby= the column holding the cell types")
    column = obs[groupby]
    if column.isna().any():
        raise ValueError(f"obs[{groupby!r}] has {int(column.isna().sum())} missing values; label or drop those "
                         "cells first")
    names, codes = np.unique(column.astype(str).to_numpy(), return_inverse=True)
    counts = np.bincount(codes, minlength=len(names))
    small = {str(n): int(c) for n, c in zip(names, counts) if c < min_cells}
    if small:
        raise ValueError(f"obs[{groupby!r}] groups with fewer than {min_cells} cells: {small}. Drop those cells "
                         f"(adata[~adata.obs[{groupby!r}].isin({list(small)})]) or merge the groups")
    return codes.astype(np.int64), [str(n) for n in names]


def group_means(values: np.ndarray, keys: np.ndarray, n_keys: int, cells: np.ndarray | None = None) -> np.ndarray:
    """(n_keys, P) mean of the rows `cells` of `values` (cells × P; default all, in order) per key;
    NaN for a key without cells."""
    cells = np.arange(len(keys)) if cells is None else cells
    onehot = sp.csr_matrix((np.ones(len(keys)), (keys, cells)), shape=(n_keys, len(values)))
    counts = np.asarray(onehot.sum(axis=1)).ravel()
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.asarray(onehot @ values) / counts[:, None]


def conditional_means(values: np.ndarray, codes: np.ndarray, present: np.ndarray) -> np.ndarray:
    """(T, T, P): [a, b] = mean of `values` over cells of group a whose niche holds group b
    (`present`: cells × T bool); NaN where no such cell."""
    n_types = present.shape[1]
    cell, other = np.nonzero(present)
    return group_means(values, codes[cell] * n_types + other, n_types * n_types, cell).reshape(n_types, n_types, -1)


def permutation_pvalues(statistic: Callable[[np.ndarray], np.ndarray], codes: np.ndarray, n_perms: int,
                        seed: int) -> tuple[np.ndarray, np.ndarray]:
    """statistic(codes) and its p-value against `n_perms` permutations of the labels over cells."""
    if n_perms < 1:
        raise ValueError(f"n_perms must be >= 1, got {n_perms}")
    observed = statistic(codes)
    rng = np.random.default_rng(seed)
    at_least = np.zeros(observed.shape)
    with np.errstate(invalid="ignore"):
        for _ in range(n_perms):
            at_least += np.nan_to_num(statistic(rng.permutation(codes)), nan=-np.inf) >= observed
    return observed, np.where(np.isfinite(observed), (1 + at_least) / (1 + n_perms), np.nan)


# ---------------------------------------------------------------- result
def result_frame(groups: list[str], pairs: pd.DataFrame, ligand_means: np.ndarray, receptor_means: np.ndarray,
                 score: np.ndarray, pvalue: np.ndarray, extra: dict[str, np.ndarray] | None = None,
                 tiebreak: str = "score") -> pd.DataFrame:
    """One row per (source s, target t, pair p) from (T, T, P) arrays indexed [s, t, p]; rows without a
    finite score are left out. rank 1 = strongest: lowest p-value, ties by `tiebreak` (higher first)."""
    n, p = len(groups), len(pairs)
    s, t, q = (a.ravel() for a in np.meshgrid(np.arange(n), np.arange(n), np.arange(p), indexing="ij"))
    names = np.asarray(groups, dtype=object)
    frame = pd.DataFrame({"source": names[s], "target": names[t], "ligand_complex": pairs["ligand"].to_numpy()[q],
                          "receptor_complex": pairs["receptor"].to_numpy()[q],
                          "ligand_means": ligand_means.ravel(), "receptor_means": receptor_means.ravel(),
                          "score": score.ravel(), "pvalue": pvalue.ravel(),
                          **{k: v.ravel() for k, v in (extra or {}).items()}})
    frame = frame[np.isfinite(frame["score"].to_numpy())]
    order = np.lexsort((-frame[tiebreak].to_numpy(), frame["pvalue"].to_numpy()))
    frame = frame.iloc[order].reset_index(drop=True)
    frame["rank"] = np.arange(1, len(frame) + 1)
    return frame


__all__ = ["RESOURCE_FILE", "complex_values", "conditional_means", "group_codes", "group_means", "load_resource",
           "pair_genes", "permutation_pvalues", "result_frame", "usable_pairs"]
