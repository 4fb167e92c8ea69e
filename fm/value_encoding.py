"""Value encodings: how a cell's nonzero counts become the `values` the model embeds.

The collator hands an encoding the counts of a batch as CSR rows (``indptr``, ``counts``: every
stored entry of each cell, before gene sampling, so per-cell statistics see the whole cell) and
gets one value per entry back. The same object says which values mark masked and padded
positions and how the pretraining target is derived from the true values, so the collator, the
model config and the loss read all of that from one place. A new encoding is one class here plus
one entry in `VALUE_ENCODINGS`; its name is what `data.value_encoding` / `ScFMConfig.value_encoding`
store. Numpy only: importing this module loads no torch.

- ``bins`` (default): scGPT's per-cell quantile bins via `fm.binning.bin_csr` (0 = not expressed,
  1..n_bins-1), deterministic ties. Batches are bit-identical to the collator before this seam.
- ``rank``: Geneformer's within-cell rank, quantised into the same levels (see `RankEncoding`).
- ``continuous``: log1p of library-size-normalised counts as floats (see `ContinuousEncoding`).

Discrete encodings (bins, rank) use value ids 0..n_bins-1 and mask = n_bins, pad = n_bins + 1:
the model's `nn.Embedding(n_bins + 2, d)` table. The continuous encoding uses negative sentinels
(counts are >= 0, so they cannot collide) that the model maps to learned mask/pad vectors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol, runtime_checkable

import numpy as np

try:  # the encoders' helpers (collator side); the model code an export carries (fm/remote_code.py) has neither
    from fm.binning import bin_csr
    from fm.preprocessing import TARGET_SUM
except ImportError:  # only in that copy, whose model never encodes counts (both modules import numpy alone)
    bin_csr, TARGET_SUM = None, None

MIN_N_BINS = 2
"""n_bins - 1 >= 1 levels for expressed genes, and targets are divided by n_bins - 1 (n_bins = 2
is the binary expressed/not encoding; bin_csr accepts it too)."""


def check_n_bins(n_bins, what: str = "n_bins") -> int:
    if not isinstance(n_bins, (int, np.integer)) or isinstance(n_bins, bool) or n_bins < MIN_N_BINS:
        raise ValueError(f"{what} must be an integer >= {MIN_N_BINS} (targets are scaled by n_bins - 1), "
                         f"got {n_bins!r}")
    return int(n_bins)


@runtime_checkable
class ValueEncoding(Protocol):
    """What the collator, the model config and the pretraining loss need from an encoding.

    Discrete encodings also give `n_tokens`, the rows of the model's value embedding table.
    """

    name: str  # the config / serialisation name, a key of VALUE_ENCODINGS
    n_bins: int
    discrete: bool  # True: int64 ids for an nn.Embedding of n_tokens rows; False: float32 values
    mask_value_id: int | float  # value of a masked gene (the model predicts it)
    pad_value_id: int | float  # value at padding positions

    def encode(self, indptr: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """One value per stored entry of CSR rows (zeros → 0), int64 if discrete else float32."""

    def target(self, labels):
        """Regression target of the GEP/MVC losses from true values (numpy array or torch tensor)."""


@dataclass(frozen=True)
class _Discrete:
    """Shared part of the discrete encodings: ids 0..n_bins-1, then <mask>, then <pad>."""

    n_bins: int = 51
    name: ClassVar[str] = ""
    discrete: ClassVar[bool] = True

    def __post_init__(self):
        check_n_bins(self.n_bins)

    @property
    def mask_value_id(self) -> int:
        return self.n_bins

    @property
    def pad_value_id(self) -> int:
        return self.n_bins + 1

    @property
    def n_tokens(self) -> int:
        """Rows of the value embedding table."""
        return self.n_bins + 2

    def target(self, labels):
        """Levels scaled to [0, 1] (labels / (n_bins - 1)): the MSE starts at O(0.1) whatever n_bins is."""
        return labels / (self.n_bins - 1)


@dataclass(frozen=True)
class BinEncoding(_Discrete):
    """scGPT's per-cell quantile bins (fm.binning.bin_csr, deterministic tie rule)."""

    name: ClassVar[str] = "bins"

    def encode(self, indptr: np.ndarray, counts: np.ndarray) -> np.ndarray:
        return bin_csr(indptr, counts, self.n_bins)


@dataclass(frozen=True)
class RankEncoding(_Discrete):
    """Geneformer's rank-value encoding, quantised into the bins' levels 1..K (K = n_bins - 1).

    Per cell, its m positive entries are ordered as Geneformer orders genes (count descending,
    ties by position in the row: rows are stored gene-sorted, so by gene id, the tie rule of
    `fm.binning.rank_value_encode`); the gene at rank r (0 = most expressed) gets level
    ``K - (r * K) // m``. So the top gene is always K, levels fall with rank, each level holds
    m/K genes (one level per gene spread evenly over 1..K when m < K), and zeros stay 0. No corpus
    gene medians are used (Geneformer divides by them), so the order is `rank_value_encode`'s with
    unit medians (tested); unlike bins, equal counts get distinct levels, as in Geneformer.
    """

    name: ClassVar[str] = "rank"

    def encode(self, indptr: np.ndarray, counts: np.ndarray) -> np.ndarray:
        counts = np.asarray(counts)
        row = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
        pos = np.flatnonzero(counts > 0)
        row, c = row[pos], counts[pos]
        order = np.lexsort((-c, row))  # stable: equal counts keep row (gene) order
        m = np.bincount(row, minlength=len(indptr) - 1)
        rank = np.empty(pos.size, np.int64)
        rank[order] = np.arange(pos.size) - np.repeat(np.cumsum(m) - m, m)
        k = self.n_bins - 1
        out = np.zeros(counts.size, np.int64)
        out[pos] = k - (rank * k) // m[row]
        return out


@dataclass(frozen=True)
class _Float:
    """Shared part of the float encodings: values >= 0 as float32, the negative sentinels -1.0 (mask) and -2.0
    (pad) that the continuous value encoder maps to learned vectors, the true value as the pretraining target."""

    n_bins: int = 51  # unused by most float values; kept so a config's n_bins round-trips unchanged
    name: ClassVar[str] = ""
    discrete: ClassVar[bool] = False
    mask_value_id: ClassVar[float] = -1.0
    pad_value_id: ClassVar[float] = -2.0

    def __post_init__(self):
        check_n_bins(self.n_bins)

    def target(self, labels):
        return labels


def _per_cell_scale(indptr: np.ndarray, counts: np.ndarray, target_sum: float) -> tuple[np.ndarray, np.ndarray]:
    """(counts as float64, target_sum / the cell's total for each entry): library-size normalisation of CSR rows
    over the entries each row holds."""
    counts = np.asarray(counts, np.float64)
    row = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
    total = np.bincount(row, weights=counts, minlength=len(indptr) - 1)
    return counts, (target_sum / np.where(total > 0, total, 1.0))[row]


@dataclass(frozen=True)
class ContinuousEncoding(_Float):
    """log1p(count / cell total * 1e4) as float32 (scanpy's normalize_total(1e4) + log1p).

    Normalising by the cell's total (over the vocabulary genes its row holds) keeps library size
    out of the value, as the bins' per-cell quantiles do; 1e4 and log1p are scGPT's continuous
    preprocessing. The pretraining target is this value itself (no rescaling). Mask / pad are the
    sentinels -1.0 / -2.0, which the model's continuous value encoder replaces by learned vectors.
    """

    name: ClassVar[str] = "continuous"
    target_sum: ClassVar[float] = TARGET_SUM

    def encode(self, indptr: np.ndarray, counts: np.ndarray) -> np.ndarray:
        counts, scale = _per_cell_scale(indptr, counts, self.target_sum)
        return np.log1p(counts * scale).astype(np.float32)


@dataclass(frozen=True)
class BinValueEncoding(_Float):
    """scGPT's per-cell bins (as `bins`), handed to the model as float numbers: the input of scGPT's
    `input_emb_style: continuous` (its released checkpoints), whose value encoder is an MLP of the bin
    number. Mask / pad are scGPT's -1.0 / -2.0; the pretraining target is the bin itself (scGPT's MSE)."""

    name: ClassVar[str] = "bin_values"

    def encode(self, indptr: np.ndarray, counts: np.ndarray) -> np.ndarray:
        return bin_csr(indptr, counts, self.n_bins).astype(np.float32)


@dataclass(frozen=True)
class GeneformerEncoding(_Float):
    """Geneformer's normalised expression, count / cell total × 1e4, as float32 (the collator then divides by
    each gene's median, `CellCollator.gene_medians`, and orders the genes by it: Geneformer's rank-value
    encoding). A BERT backbone reads only the gene order, never these values; they are kept so a batch shows
    what the order was made from. The cell total is over the genes the row holds (Geneformer's n_counts counts
    every gene): a per-cell factor, which changes no order. Mask / pad are the sentinels -1.0 / -2.0."""

    name: ClassVar[str] = "geneformer"

    def encode(self, indptr: np.ndarray, counts: np.ndarray) -> np.ndarray:
        counts, scale = _per_cell_scale(indptr, counts, 1e4)
        return (counts * scale).astype(np.float32)

    def target(self, labels):
        raise NotImplementedError("the geneformer encoding has no expression target: a Geneformer model is "
                                  "pretrained by masked gene-token prediction (ScFMBertForMaskedLM), not expression")


VALUE_ENCODINGS = {cls.name: cls for cls in (BinEncoding, RankEncoding, ContinuousEncoding, BinValueEncoding,
                                             GeneformerEncoding)}


def get_value_encoding(spec: "str | ValueEncoding", n_bins: int = 51) -> ValueEncoding:
    """An encoding from its name (built with n_bins), or `spec` itself when it is one already."""
    if isinstance(spec, str):
        if spec not in VALUE_ENCODINGS:
            raise ValueError(f"value_encoding must be one of {sorted(VALUE_ENCODINGS)}, got {spec!r}")
        return VALUE_ENCODINGS[spec](n_bins)
    if not isinstance(spec, ValueEncoding):
        raise TypeError(f"value_encoding must be a name or a ValueEncoding, got {type(spec).__name__}")
    if spec.n_bins != n_bins:
        raise ValueError(f"{spec!r} has n_bins={spec.n_bins} but n_bins={n_bins} was asked for")
    return spec


__all__ = ["BinEncoding", "BinValueEncoding", "ContinuousEncoding", "GeneformerEncoding", "MIN_N_BINS", "RankEncoding", "VALUE_ENCODINGS", "ValueEncoding",
           "check_n_bins", "get_value_encoding"]
