"""Batch a list of sparse cells into model inputs: bin, choose genes, mask, pad — vectorised.

Randomness (which genes a long cell keeps, which values are masked) comes from a counter-based
hash of (seed, epoch, cell index, position), not from a stateful RNG. So a cell gets the same
tokens whichever batch, worker or rank it lands in — which makes resume and multi-process runs
reproducible — and the whole batch is processed with a handful of numpy calls, no per-cell loop.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fm.binning import bin_csr

_M1, _M2, _GOLDEN = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser: a fast, well-mixed 64-bit hash (Steele et al. 2014)."""
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def hashed_uniform(seed: int, epoch: int, cell: np.ndarray, position: np.ndarray, salt: int) -> np.ndarray:
    """Uniform [0, 1) numbers that depend only on their arguments (vectorised)."""
    with np.errstate(over="ignore"):
        h = _splitmix64(np.full(cell.shape, (seed * 1_000_003 + epoch) * 131 + salt, dtype=np.uint64))
        h = _splitmix64(h ^ cell.astype(np.uint64))
        h = _splitmix64(h ^ position.astype(np.uint64))
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def _rank_within_rows(row: np.ndarray, *keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Order entries by row then keys (last key most significant after row); return order and rank in row."""
    order = np.lexsort(keys + (row,))
    sorted_rows = row[order]
    starts = np.searchsorted(sorted_rows, sorted_rows, side="left")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size) - starts
    return order, rank


@dataclass
class CellCollator:
    """rows of {gene_ids, counts, conditions, index} → padded tensors for ScFM models.

    train=True: long cells keep a random `max_genes` subset and `mask_ratio` of each cell's values
    are masked (labels = true bins). train=False: long cells keep their most expressed genes
    (ties by gene id) and nothing is masked — deterministic inference.
    """

    n_bins: int = 51
    max_genes: int = 1200
    mask_ratio: float = 0.4
    train: bool = True
    seed: int = 0
    pad_token_id: int = 0
    pad_to_multiple_of: int = 8  # tensor-core friendly lengths on GPU; costs little on CPU
    epoch: int = 0

    @property
    def mask_value_id(self) -> int:
        return self.n_bins

    @property
    def pad_value_id(self) -> int:
        return self.n_bins + 1

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        lengths = np.array([len(r["gene_ids"]) for r in rows], dtype=np.int64)
        indptr = np.concatenate([[0], np.cumsum(lengths)])
        genes = np.concatenate([r["gene_ids"] for r in rows]).astype(np.int64)
        counts = np.concatenate([r["counts"] for r in rows]).astype(np.float32)
        cell_index = np.array([r["index"] for r in rows], dtype=np.int64)
        bins = bin_csr(indptr, counts, self.n_bins).astype(np.int64)  # over the whole cell, before sampling

        row = np.repeat(np.arange(len(rows)), lengths)
        position = np.arange(genes.size) - indptr[row]
        if self.train:
            key = hashed_uniform(self.seed, self.epoch, cell_index[row], position, salt=1)
            order, rank = _rank_within_rows(row, key)
        else:
            order, rank = _rank_within_rows(row, genes, -counts)
        keep = rank < self.max_genes
        kept = np.minimum(lengths, self.max_genes)
        width = max(int(kept.max(initial=1)), 1)
        width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of

        r, c = row[keep], rank[keep]
        gene_ids = np.full((len(rows), width), self.pad_token_id, dtype=np.int64)
        values = np.full((len(rows), width), self.pad_value_id, dtype=np.int64)
        labels = np.zeros((len(rows), width), dtype=np.float32)
        gene_ids[r, c] = genes[keep]
        values[r, c] = bins[keep]
        labels[r, c] = bins[keep]
        attention_mask = np.zeros((len(rows), width), dtype=bool)
        attention_mask[r, c] = True

        batch = {"gene_ids": gene_ids, "values": values, "attention_mask": attention_mask,
                 "condition_ids": np.stack([np.asarray(x["conditions"], dtype=np.int64) for x in rows])}
        if self.train:
            n_mask = np.maximum(np.rint(kept * self.mask_ratio).astype(np.int64), (kept > 0).astype(np.int64))
            mkey = hashed_uniform(self.seed, self.epoch, cell_index[r], genes[keep], salt=2)
            _, mrank = _rank_within_rows(r, mkey)
            masked = np.zeros_like(attention_mask)
            masked[r, c] = mrank < n_mask[r]
            values[masked] = self.mask_value_id
            batch.update(masked_positions=masked, labels=labels)
        return {k: torch.from_numpy(v) for k, v in batch.items()}
