"""Batch a list of sparse cells into model inputs: encode values, choose genes, mask, pad — vectorised.

Randomness (which genes a long cell keeps, which values are masked) comes from a counter-based
hash of (seed, epoch, cell index, position), not from a stateful RNG. So a cell gets the same
tokens whichever batch, worker or rank it lands in — which makes resume and multi-process runs
reproducible — and the whole batch is processed with a handful of numpy calls, no per-cell loop.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from fm.binning import _linspace, compiled_kernels
from fm.preprocessing import TARGET_SUM
from fm.value_encoding import BinEncoding, BinValueEncoding, ValueEncoding, get_value_encoding

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


@functools.lru_cache(maxsize=256)
def _seed_word(seed: int, epoch: int, salt: int) -> np.uint64:
    """The first hash of hashed_uniform(seed, epoch, ·, ·, salt), shared by all its entries."""
    with np.errstate(over="ignore"):
        return _splitmix64(np.full(1, (seed * 1_000_003 + epoch) * 131 + salt, dtype=np.uint64))[0]


def _fast_hashed_order(row: np.ndarray, keys: tuple) -> np.ndarray | None:
    """lexsort((key, row)) for hashed keys (multiples of 2⁻⁵³ in [0, 1)) via one uint64 sort (~9x faster).

    row << 53 | key·2⁵³ is an exact composite key while row < 2¹¹; where two composites tie, the
    unstable sort could order them differently, so that case (and any other key) returns None.
    """
    (key,) = keys
    if key.dtype != np.float64 or row.size == 0 or row.min() < 0 or row.max() >= 1 << 11:
        return None
    k = key * float(1 << 53)
    if not (np.all(k >= 0) and np.all(k < float(1 << 53)) and np.array_equal(k, np.floor(k))):
        return None
    composite = (row.astype(np.uint64) << np.uint64(53)) | k.astype(np.uint64)
    order = np.argsort(composite)
    c = composite[order]
    return None if np.any(c[1:] == c[:-1]) else order


def _rank_within_rows(row: np.ndarray, *keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Order entries by row then keys (last key most significant after row); return order and rank in row."""
    order = _fast_hashed_order(row, keys) if len(keys) == 1 else None
    if order is None:
        order = np.lexsort(keys + (row,))
    per_row = np.bincount(row) if row.size else np.zeros(0, np.int64)
    starts = np.repeat(np.cumsum(per_row) - per_row, per_row)  # O(n): rows are contiguous once sorted
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size) - starts
    return order, rank


_BINNED = {BinEncoding: np.int64, BinValueEncoding: np.float32}
"""Encodings that are bin_csr's bins (their value dtype): the compiled path bins inside its kernel."""



def _conditions(rows: list[dict]) -> np.ndarray:
    """np.stack of the rows' condition ids (int64); np.array builds the same array from equal shapes ~3x faster."""
    try:
        return np.array([x["conditions"] for x in rows], dtype=np.int64)
    except ValueError:
        return np.stack([np.asarray(x["conditions"], dtype=np.int64) for x in rows])


INFERENCE_SEED = 0
"""Seed of every train=False choice (zero-gene priority): inference is the same whatever a run's seed."""


def collator_settings(config) -> dict:
    """The CellCollator fields a model fixes through its ScFMConfig (value encoding, gene budget, pad id,
    zero genes, Geneformer's gene medians): every collator built for a model — pretraining, fine-tuning,
    inference — starts here."""
    settings = dict(n_bins=config.n_bins, value_encoding=config.value_encoding, max_genes=config.max_genes,
                    pad_token_id=config.pad_token_id, zero_fraction=config.zero_fraction)
    medians = getattr(config, "gene_medians", None)
    if medians is not None:
        settings["gene_medians"] = vocab_medians(config.gene_table, medians, config.vocab_size)
    return settings


def pad_multiple(device) -> int:
    """Batch widths round up to this on `device`: 8 on CUDA (tensor-core shapes), else 1 — on CPU rounding
    to 8 only adds padding tokens (eval/perf/RESULTS.md "Padding (issue 13)")."""
    return 8 if torch.device(device).type == "cuda" else 1


def vocab_medians(gene_table, medians, vocab_size: int) -> np.ndarray:
    """(vocab_size,) float64 median of each vocabulary id (0 = no median: never a token) from per-row medians."""
    out = np.zeros(vocab_size, dtype=np.float64)
    out[np.asarray(gene_table, dtype=np.int64)] = np.asarray(medians, dtype=np.float64)
    return out


@dataclass
class CellCollator:
    """rows of {gene_ids, counts, conditions, index[, panel]} → padded tensors for ScFM models.

    train=True: long cells keep a random subset of their expressed genes and `mask_ratio` of each
    cell's tokens are masked (labels = true values). train=False: long cells keep their most
    expressed genes (ties by gene id) and nothing is masked — deterministic inference.
    zero_fraction > 0 (and a row `panel`: the sorted vocab ids its dataset measured) reserves that
    share of `max_genes` for measured-but-unexpressed genes (value 0), as scGPT does with
    include_zero_gene: predicting which genes are off is what ties the cell embedding to cell state.
    value_encoding (a name in fm.value_encoding.VALUE_ENCODINGS, built with n_bins, or an encoding
    object) turns counts into values; the default "bins" is scGPT's per-cell binning.

    gene_medians set (a Geneformer model): a cell's tokens are exactly Geneformer's rank-value encoding,
    train or not — only genes with a median (> 0) and a count, ordered by count / median descending (the
    per-cell normalisation by total counts changes no order), the first max_genes of them, left-aligned: the
    BERT backbone has absolute positions, so the order is the input. Ties (equal count / median, float64)
    go to the lower vocab id: deterministic, where Geneformer's unstable `np.argsort` leaves them to numpy's
    sort internals. No gene subsampling ever; with train=True values are still masked (a BERT backbone
    ignores them).
    """

    n_bins: int = 51
    value_encoding: str | ValueEncoding = "bins"
    max_genes: int = 1200
    mask_ratio: float = 0.4
    train: bool = True
    seed: int = 0
    pad_token_id: int = 0
    zero_fraction: float = 0.0
    # batch width rounded up to a multiple of this; None = by device (fm.train / fm.inference set
    # pad_multiple(device): 8 on CUDA for tensor-core shapes, 1 on CPU where rounding only adds padding)
    pad_to_multiple_of: int | None = None
    epoch: int = 0
    decode_genes: int = 0  # train only: whole-cell decoding targets for this many panel genes per batch
    views: int = 1  # train only: each cell this many times (own genes and masks; `view_of` pairs them)
    view_keep: float = 1.0  # train only: share of a cell's expressed genes each view keeps (gene-subset views)
    view_thinning: float = 0.0  # train only: views after the first see counts × p, p ~ U(1 - this, 1) per cell
    # Geneformer's rank-value order (ScFMConfig.gene_medians, by vocab id; 0 = not a model gene): see __call__
    gene_medians: np.ndarray | None = None

    def token_counts(self, cells) -> np.ndarray:
        """Gene tokens this collator gives each cell of `cells` (an EncodedCells: its indptr, panels; with
        gene_medians its gene_ids): expressed genes capped by the budget plus zero genes — the width a batch
        of them needs before rounding to pad_to_multiple_of. Cheap (no binning, no gene choice); what
        length-bucketed inference and the length-grouped sampler sort cells by."""
        n = np.diff(np.asarray(cells.indptr)).astype(np.int64)
        if self.gene_medians is not None:  # Geneformer: only genes with a median and a count are tokens
            ok = (self.gene_medians[np.asarray(cells.gene_ids)] > 0) & (np.asarray(cells.counts) > 0)
            n = np.bincount(np.repeat(np.arange(n.size), n)[ok], minlength=n.size).astype(np.int64)
        zero_slots = int(round(self.zero_fraction * self.max_genes))
        n_zero = np.zeros_like(n)
        if zero_slots and getattr(cells, "panel_of", None) is not None:
            panel = np.array([len(p) for p in cells.panels], dtype=np.int64)[cells.panel_of]
            n_zero = np.minimum(zero_slots, np.maximum(panel - n, 0))
        budget = self.max_genes - n_zero
        if self.train and self.view_keep < 1.0:
            budget = np.minimum(budget, np.ceil(n * self.view_keep).astype(np.int64))
        return np.minimum(n, budget) + n_zero

    @property
    def encoding(self) -> ValueEncoding:
        """The encoding object (built on use: subclasses need no __post_init__ chaining)."""
        return get_value_encoding(self.value_encoding, self.n_bins)

    @property
    def mask_value_id(self) -> int | float:
        return self.encoding.mask_value_id

    @property
    def pad_value_id(self) -> int | float:
        return self.encoding.pad_value_id

    def _zero_genes(self, rows: list[dict], n_zero: np.ndarray, genes: np.ndarray, indptr: np.ndarray) -> np.ndarray:
        """`n_zero[i]` measured genes cell i does not express, concatenated in row order.

        Training draws them at random per (seed, epoch, cell); inference walks a fixed gene
        priority, so a cell's tokens never depend on its batch. Vectorised over the batch: draw
        candidates, drop expressed or repeated ones, keep the first n_zero[i] of each cell.
        """
        cells = np.flatnonzero(n_zero)
        panel_list, panel_idx = [], []
        for i in cells:  # distinct panels (cells of one source share one array)
            p = rows[i]["panel"]
            for j, q in enumerate(panel_list):
                if q is p:
                    panel_idx.append(j)
                    break
            else:
                panel_idx.append(len(panel_list))
                panel_list.append(p)
        if not self.train:
            panel_list = [self._priority_order(p) for p in panel_list]
        offsets = np.cumsum([0] + [len(p) for p in panel_list])
        flat = np.concatenate(panel_list).astype(np.int64)
        sizes = np.diff(offsets)[panel_idx]
        n_expr = np.diff(indptr)[cells]
        want = n_zero[cells]
        # candidates: 2·n + 16 random draws (train) or the first n + n_expressed by priority (inference)
        m = 2 * want + 16 if self.train else np.minimum(want + n_expr, sizes)
        owner = np.repeat(np.arange(len(cells)), m)
        k = np.arange(m.sum()) - np.repeat(np.cumsum(m) - m, m)
        if self.train:
            index = np.array([rows[i]["index"] for i in cells], dtype=np.int64)
            u = hashed_uniform(self.seed, self.epoch, index[owner], k, salt=3)
            k = (u * sizes[owner]).astype(np.int64)
        candidate = flat[offsets[np.asarray(panel_idx)][owner] + k]
        # drop genes the cell expresses: one searchsorted on (row, gene) composite keys
        expressed_key = np.repeat(np.arange(len(rows)), np.diff(indptr)) * (1 << 32) + genes
        ckey = cells[owner] * (1 << 32) + candidate
        pos = np.minimum(np.searchsorted(expressed_key, ckey), max(len(expressed_key) - 1, 0))
        fresh = expressed_key[pos] != ckey if len(expressed_key) else np.ones(len(ckey), bool)
        ckey, owner = ckey[fresh], owner[fresh]
        _, first = np.unique(ckey, return_index=True)  # repeated draws: keep the earliest
        first = np.sort(first)
        owner, candidate = owner[first], ckey[first] - cells[owner[first]] * (1 << 32)
        _, rank = _rank_within_rows(owner, np.arange(len(owner)))
        take = rank < want[owner]
        got = np.bincount(owner[take], minlength=len(cells))
        if np.any(got < want):  # nearly fully expressed panels: the exhaustive path for those cells
            return self._zero_genes_exhaustive(rows, n_zero, got, cells, owner[take], candidate[take])
        return candidate[take]

    def _zero_genes_exhaustive(self, rows, n_zero, got, cells, owner, candidate) -> np.ndarray:
        out = []
        for j, i in enumerate(cells):
            if got[j] >= n_zero[i]:
                out.append(candidate[owner == j])
                continue
            panel, expressed = rows[i]["panel"], rows[i]["gene_ids"]
            off = panel[~np.isin(panel, expressed)]
            priority = hashed_uniform(self.seed if self.train else INFERENCE_SEED, self.epoch if self.train else 0,
                                      np.full(len(off), rows[i]["index"] if self.train else 0), off, salt=4)
            out.append(off[np.argsort(priority, kind="stable")[: n_zero[i]]].astype(np.int64))
        return np.concatenate(out)

    def _priority_order(self, panel: np.ndarray) -> np.ndarray:
        """A panel's genes in a fixed hashed order (cached: panels are shared arrays). The order never
        depends on `seed`: a fine-tune's validation pass (collator seeded with train.seed) and
        fm.annotate / fm.embed (seed 0) must show a cell the same zero genes."""
        cache = self.__dict__.setdefault("_priority_cache", {})
        key = (id(panel), len(panel))
        if key not in cache:
            priority = hashed_uniform(INFERENCE_SEED, 0, np.zeros(len(panel), np.int64), panel, salt=4)
            cache[key] = (panel, panel[np.argsort(priority, kind="stable")])
        return cache[key][1]

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        if self.train and self.views > 1:
            return self._stacked_views(rows)
        lengths = np.array([len(r["gene_ids"]) for r in rows], dtype=np.int64)  # may shrink: gene_medians
        indptr = np.concatenate([[0], np.cumsum(lengths)])
        genes = np.concatenate([r["gene_ids"] for r in rows], dtype=np.int64, casting="unsafe")
        counts = np.concatenate([r["counts"] for r in rows], dtype=np.float32, casting="unsafe")
        cell_index = np.array([r["index"] for r in rows], dtype=np.int64)
        encoding = self.encoding
        median = None
        if self.gene_medians is not None:  # Geneformer: only genes with a median are tokens
            if self.zero_fraction:
                raise ValueError("gene_medians (Geneformer's order) reads expressed genes only: zero_fraction must be 0")
            median = self.gene_medians[genes]
            ok = (median > 0) & (counts > 0)
            if not ok.all():
                row_of = np.repeat(np.arange(len(rows)), lengths)
                genes, counts, median = genes[ok], counts[ok], median[ok]
                lengths = np.bincount(row_of[ok], minlength=len(rows)).astype(np.int64)
                indptr = np.concatenate([[0], np.cumsum(lengths)])
        zero_slots = int(round(self.zero_fraction * self.max_genes))
        if zero_slots:
            n_zero = np.array([min(zero_slots, max(len(r.get("panel", ())) - n, 0)) for r, n in zip(rows, lengths)],
                              dtype=np.int64)
        else:
            n_zero = np.zeros(len(rows), np.int64)
        budget = self.max_genes - n_zero  # expressed genes a cell keeps
        if self.train and self.view_keep < 1.0:
            budget = np.minimum(budget, np.ceil(lengths * self.view_keep).astype(np.int64))

        kernels = compiled_kernels() if median is None else None
        if kernels is not None and type(encoding) in _BINNED:  # binning fused into the kernel (fill_batch_binned)
            batch = self._compiled_batch(kernels, rows, lengths, indptr, genes, counts, cell_index, None,
                                         n_zero, budget, encoding)
            if batch is not None:
                return batch
        encoded = encoding.encode(indptr, counts)  # over the whole cell, before sampling
        if median is not None:
            encoded = (encoded / median).astype(encoded.dtype)
        if kernels is not None:  # the compiled per-cell loops (fm._kernels): the same tensors as below
            batch = self._compiled_batch(kernels, rows, lengths, indptr, genes, counts, cell_index, encoded,
                                         n_zero, budget, encoding)
            if batch is not None:
                return batch

        row = np.repeat(np.arange(len(rows)), lengths)
        position = np.arange(genes.size) - indptr[row]
        if median is not None:  # Geneformer's order: count / median descending, ties by vocab id
            _, rank = _rank_within_rows(row, genes, -(counts.astype(np.float64) / median))
        elif self.train and np.all(lengths <= budget):
            rank = position  # every expressed gene fits: no sampling (token order is irrelevant)
        elif self.train:
            key = hashed_uniform(self.seed, self.epoch, cell_index[row], position, salt=1)
            _, rank = _rank_within_rows(row, key)
        else:
            _, rank = _rank_within_rows(row, genes, -counts)
        keep = rank < budget[row]
        kept_expressed = np.minimum(lengths, budget)
        zeros = [self._zero_genes(rows, n_zero, genes, indptr)] if n_zero.any() else []
        zero_rows = np.repeat(np.arange(len(rows)), n_zero)
        r = np.concatenate([row[keep], zero_rows])
        c = np.concatenate([rank[keep], np.arange(zero_rows.size) - np.repeat(np.cumsum(n_zero) - n_zero, n_zero)
                            + kept_expressed[zero_rows]])
        g = np.concatenate([genes[keep]] + zeros) if zeros else genes[keep]
        b = np.concatenate([encoded[keep], np.zeros(zero_rows.size, encoded.dtype)])

        kept = kept_expressed + n_zero
        width = max(int(kept.max(initial=1)), 1)
        multiple = self.pad_to_multiple_of or 1
        width = -(-width // multiple) * multiple
        gene_ids = np.full((len(rows), width), self.pad_token_id, dtype=np.int64)
        values = np.full((len(rows), width), encoding.pad_value_id, dtype=encoded.dtype)
        labels = np.zeros((len(rows), width), dtype=np.float32)
        attention_mask = np.zeros((len(rows), width), dtype=bool)
        gene_ids[r, c], values[r, c], labels[r, c], attention_mask[r, c] = g, b, b, True

        batch = {"gene_ids": gene_ids, "values": values, "attention_mask": attention_mask,
                 "condition_ids": _conditions(rows)}
        if self.train:
            n_mask = np.maximum(np.rint(kept * self.mask_ratio).astype(np.int64), (kept > 0).astype(np.int64))
            mkey = hashed_uniform(self.seed, self.epoch, cell_index[r], g, salt=2)
            _, mrank = _rank_within_rows(r, mkey)
            masked = np.zeros_like(attention_mask)
            masked[r, c] = mrank < n_mask[r]
            values[masked] = encoding.mask_value_id
            batch.update(masked_positions=masked, labels=labels)
            if self.decode_genes:
                batch.update(self._whole_cell_targets(rows, genes, counts, indptr))
        return {k: torch.from_numpy(v) for k, v in batch.items()}

    def _compiled_batch(self, kernels, rows, lengths, indptr, genes, counts, cell_index, encoded, n_zero,
                        budget, encoding) -> dict[str, torch.Tensor] | None:
        """__call__'s selection, zero genes, masking and padding by fm._kernels.fill_batch (None: a count the
        kernel does not order, e.g. NaN at inference; the numpy path then decides). encoded None: scGPT's bins
        (`encoding` a BinEncoding / BinValueEncoding), computed in the kernel (fill_batch_binned)."""
        kept_expressed = np.minimum(lengths, budget)
        kept = kept_expressed + n_zero
        zeros = self._zero_genes(rows, n_zero, genes, indptr) if n_zero.any() else np.zeros(0, np.int64)
        width = max(int(kept.max(initial=1)), 1)
        multiple = self.pad_to_multiple_of or 1
        width = -(-width // multiple) * multiple
        shape = (len(rows), width)
        gene_ids = np.full(shape, self.pad_token_id, dtype=np.int64)
        values = np.full(shape, encoding.pad_value_id, dtype=_BINNED[type(encoding)] if encoded is None else encoded.dtype)
        labels = np.zeros(shape, dtype=np.float32)
        attention_mask = np.zeros(shape, dtype=bool)
        masked = np.zeros(shape, dtype=bool)
        if self.train:
            n_mask = np.maximum(np.rint(kept * self.mask_ratio).astype(np.int64), (kept > 0).astype(np.int64))
        else:
            n_mask = np.zeros(len(rows), np.int64)
        if encoded is None:
            fill, data = kernels.fill_binned, _linspace(encoding.n_bins)
        else:
            fill, data = kernels.fill_batch, encoded
        status = fill(indptr, genes, counts, counts.view(np.uint32), data, cell_index, kept_expressed, n_zero,
                      np.ascontiguousarray(zeros, dtype=np.int64), n_mask, bool(self.train),
                      bool(np.all(lengths <= budget)), _seed_word(self.seed, self.epoch, 1),
                      _seed_word(self.seed, self.epoch, 2), encoding.mask_value_id,
                      gene_ids, values, labels, attention_mask, masked)
        if status:
            return None
        batch = {"gene_ids": gene_ids, "values": values, "attention_mask": attention_mask,
                 "condition_ids": _conditions(rows)}
        if self.train:
            batch.update(masked_positions=masked, labels=labels)
            if self.decode_genes:
                batch.update(self._whole_cell_targets(rows, genes, counts, indptr))
        return {k: torch.from_numpy(v) for k, v in batch.items()}

    def _stacked_views(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        """`views` batches of the same cells (each its own gene subset and masks: another seed), stacked along
        the batch axis and padded to one width; `view_of` (V·B,) names each row's cell for a contrastive loss.
        Whole-cell decoding targets are per cell, so the first view's are repeated."""
        parts = [replace(self, views=1, seed=self.seed + 7919 * v, decode_genes=self.decode_genes if v == 0 else 0)(
                 self._thinned(rows, v) if v and self.view_thinning else rows) for v in range(self.views)]
        width = max(p["gene_ids"].shape[1] for p in parts)
        fill = {"gene_ids": self.pad_token_id, "values": self.encoding.pad_value_id, "labels": 0,
                "attention_mask": False, "masked_positions": False}
        batch = {}
        for key, value in fill.items():
            batch[key] = torch.cat([torch.nn.functional.pad(p[key], (0, width - p[key].shape[1]), value=value)
                                    for p in parts])
        batch["condition_ids"] = torch.cat([p["condition_ids"] for p in parts])
        if "decode_targets" in parts[0]:
            batch["decode_gene_ids"] = parts[0]["decode_gene_ids"]
            for key in ("decode_targets", "decode_weights"):
                batch[key] = parts[0][key].repeat(self.views, 1)
        batch["view_of"] = torch.arange(len(rows)).repeat(self.views)
        return batch

    def _thinned(self, rows: list[dict], view: int) -> list[dict]:
        """The cells as a shallower sequencing run would have seen them: every count scaled by a per-cell depth
        factor p ~ U(1 - view_thinning, 1) and stochastically rounded (a count of 1 survives with probability p,
        as under binomial thinning); genes left at 0 drop out. A cell that would lose every gene keeps its own
        counts. Hashed per (seed, epoch, cell, view, gene): the same whichever batch the cell is in."""
        out = []
        for row in rows:
            index = np.full(len(row["gene_ids"]), int(row["index"]))
            p = 1.0 - self.view_thinning * hashed_uniform(self.seed, self.epoch, index[:1], np.array([view]), salt=6)[0]
            u = hashed_uniform(self.seed + view, self.epoch, index, np.asarray(row["gene_ids"]), salt=7)
            counts = np.floor(np.asarray(row["counts"], dtype=np.float64) * p + u).astype(np.float32)
            keep = counts > 0
            out.append({**row, "gene_ids": row["gene_ids"][keep], "counts": counts[keep]} if keep.any() else row)
        return out

    def _whole_cell_targets(self, rows: list[dict], genes: np.ndarray, counts: np.ndarray,
                            indptr: np.ndarray) -> dict[str, np.ndarray]:
        """WCED targets: log1p(CP10k) of `decode_genes` genes drawn from the union of the batch's panels, for
        every cell — in its tokens or not, expressed or not (0) — weight 0 where its dataset did not measure
        the gene. Normalised by the cell's total, so decoding them asks for cell state, not library size."""
        panels = {id(r["panel"]): r["panel"] for r in rows if "panel" in r}
        if not panels:
            return {}
        union = np.unique(np.concatenate(list(panels.values()))).astype(np.int64)
        k = min(self.decode_genes, union.size)
        key = hashed_uniform(self.seed, self.epoch, np.full(union.size, int(rows[0]["index"])), union, salt=5)
        chosen = np.sort(union[np.argsort(key, kind="stable")[:k]])
        measured = {pid: np.isin(chosen, p) for pid, p in panels.items()}
        weights = np.stack([measured[id(r["panel"])] if "panel" in r else np.zeros(k, bool) for r in rows])
        targets = np.zeros((len(rows), k), np.float32)
        row = np.repeat(np.arange(len(rows)), np.diff(indptr))
        total = np.maximum(np.bincount(row, weights=counts, minlength=len(rows)), 1.0)
        j = np.minimum(np.searchsorted(chosen, genes), k - 1)
        hit = chosen[j] == genes
        targets[row[hit], j[hit]] = np.log1p(counts[hit] / total[row[hit]] * TARGET_SUM)
        return {"decode_gene_ids": chosen, "decode_targets": targets, "decode_weights": weights}


def _default_targets() -> dict:
    return {"label": "labels"}


@dataclass
class LabeledCellCollator(CellCollator):
    """CellCollator for fine-tuning: per-cell targets in the rows → stacked tensors in the batch.

    `targets` maps a row key to a batch key: {"label": "labels"} (default) turns an int per cell into
    `labels` (B,) long; a float vector per cell (e.g. protein abundances) becomes (B, P) float32.
    Genes are chosen as at inference (train=False by default: most expressed genes, no value
    masking), so a fine-tuned head sees cells exactly as fm.annotate / fm.predict_protein show them.
    train=True keeps pretraining's masking (masked values in `labels`), so targets must then use other
    batch keys.
    """

    train: bool = False
    targets: dict = field(default_factory=_default_targets)

    def __post_init__(self):
        if self.train and "labels" in self.targets.values():
            raise ValueError("with train=True the batch key 'labels' holds the masked values; name the targets "
                             f"otherwise (targets={self.targets})")

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = super().__call__(rows)
        for key, name in self.targets.items():
            value = np.stack([np.asarray(r[key]) for r in rows])
            if np.issubdtype(value.dtype, np.floating):
                value = value.astype(np.float32)
            elif np.issubdtype(value.dtype, np.integer) or value.dtype == bool:
                value = value.astype(np.int64)
            batch[name] = torch.from_numpy(value)
        return batch
