"""Train from a built corpus without holding it: memory-mapped shards, per-rank disjoint streams.

`CorpusDataset` is map-style over *global* cell indices (shard order of the manifest); rows are
zero-copy numpy views into memory-mapped Arrow buffers, and `__getitems__` (used by torch's
DataLoader for a whole batch) resolves a batch's shards and rows with vectorised lookups.

`CorpusBatchSampler` (returned by `CorpusDataset.batch_sampler`, the hook fm/train.py calls):
  1. shard order = permutation(n_shards) seeded by (seed, epoch);
  2. the cells of the shards in that order form one stream; rank r reads the contiguous part
     [r·m, (r+1)·m), m = n_train // world — so ranks read disjoint shards (a boundary shard is
     split by rows), and every rank yields m // batch_size batches in every epoch;
  3. within a rank's part, windows of `shuffle_buffer` cells are permuted (seed, epoch, rank,
     window): memory is one index per buffered cell, never a permutation of the corpus;
  4. `start_batch` skips to the window holding that batch: mid-epoch resume costs one window.
  5. length_grouping (data.length_grouping): the rank's shuffled stream is cut into megabatches of
     MEGABATCH batches; each is sorted by expressed genes per cell (the row's offsets: no gene data
     read; the collator's token count is that capped at max_genes, corpus rows carry no panel so
     no zero genes) and cut into batches, whose order within the megabatch is shuffled by
     (seed, epoch, megabatch) — not by rank, so every rank's j-th batch is the same length
     quantile of its own megabatch and ranks pad to similar widths. Bucketing is within a window of
     the stream (megabatch), never over the corpus.
A fixed fraction of cells, chosen by a hash of (seed, global index), is held out for evaluation
(`holdout`), identically for every world size and epoch.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import numpy as np
from torch.utils.data import Sampler

from fm.data.collator import hashed_uniform
from fm.data.corpus import load_manifest, read_shard

_OPEN_SHARDS = 64  # memory maps kept open per process (LRU): bounded file descriptors


class CorpusDataset:
    """Cells of a corpus by global index → {gene_ids, counts, conditions, index} (numpy views)."""

    def __init__(self, path: str | Path, condition_keys: Sequence[str] | None = None,
                 condition_categories: dict[str, list[str]] | None = None, val_fraction: float = 0.0,
                 split_seed: int = 0, shuffle_buffer: int = 100_000):
        self.path = Path(path)
        self.manifest = load_manifest(self.path)
        self.sizes = np.array([s["n_cells"] for s in self.manifest["shards"]], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)])
        self.files = [self.path / s["file"] for s in self.manifest["shards"]]
        self.val_fraction, self.split_seed, self.shuffle_buffer = val_fraction, split_seed, max(int(shuffle_buffer), 1)
        keys = self.manifest["condition_keys"]
        self.condition_keys = list(keys if condition_keys is None else condition_keys)
        missing = sorted(set(self.condition_keys) - set(keys))
        if missing:
            raise KeyError(f"{self.path}: conditions {missing} are not in this corpus (it has {keys}); "
                           "rebuild it with --conditions, or drop them from data.conditions")
        self._cols = np.array([keys.index(k) for k in self.condition_keys], dtype=np.int64)
        # corpus id → target id, per selected key (identity unless a checkpoint's categories differ)
        self._luts = []
        for k in self.condition_keys:
            src = self.manifest["conditions"][k]
            dst = {c: i for i, c in enumerate((condition_categories or {}).get(k, src))}
            self._luts.append(np.array([dst.get(c, 0) for c in src], dtype=np.int64))
        self._cache: OrderedDict = OrderedDict()
        self._train_counts = None

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getstate__(self):  # DataLoader workers reopen their own memory maps
        return {**self.__dict__, "_cache": OrderedDict()}

    # ------------------------------------------------------------------ reading
    def _shard(self, s: int):
        """(chunk row starts, [(offsets, gene_ids, counts, conditions)] per record batch) of shard s."""
        if s in self._cache:
            self._cache.move_to_end(s)
            return self._cache[s]
        table = read_shard(self.files[s])
        chunks = []
        for i in range(table.column("gene_ids").num_chunks):
            cols = [table.column(name).chunk(i) for name in ("gene_ids", "counts", "conditions")]
            chunks.append((cols[0].offsets.to_numpy(), *[c.values.to_numpy(zero_copy_only=True) for c in cols],
                           cols[2].offsets.to_numpy()))
        starts = np.cumsum([0] + [len(c[0]) - 1 for c in chunks])
        self._cache[s] = (starts, chunks)
        if len(self._cache) > _OPEN_SHARDS:
            self._cache.popitem(last=False)
        return self._cache[s]

    def _row(self, s: int, r: int, index: int) -> dict:
        starts, chunks = self._shard(s)
        c = int(np.searchsorted(starts, r, side="right")) - 1
        off, genes, counts, conds, coff = chunks[c]
        j = r - starts[c]
        lo, hi = off[j], off[j + 1]
        cond = conds[coff[j]:coff[j + 1]].astype(np.int64)[self._cols]
        for n, lut in enumerate(self._luts):
            cond[n] = lut[cond[n]]
        return {"gene_ids": genes[lo:hi], "counts": counts[lo:hi], "conditions": cond, "index": index}

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"cell {index} outside a corpus of {len(self)} cells")
        s = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return self._row(s, index - int(self.offsets[s]), index)

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        """A whole batch: shard of every index in one vectorised lookup, then zero-copy row views."""
        idx = np.asarray(indices, dtype=np.int64)
        shard = np.searchsorted(self.offsets, idx, side="right") - 1
        local = idx - self.offsets[shard]
        return [self._row(int(s), int(r), int(i)) for s, r, i in zip(shard, local, idx)]

    # ------------------------------------------------------------------ splits and sampling
    def is_heldout(self, index: np.ndarray) -> np.ndarray:
        """Held-out cells: a hash of (split_seed, global index) below val_fraction."""
        if self.val_fraction <= 0:
            return np.zeros(np.shape(index), dtype=bool)
        index = np.asarray(index, dtype=np.int64)
        return hashed_uniform(self.split_seed, 0, index, np.zeros_like(index), salt=7) < self.val_fraction

    def train_rows(self, s: int) -> np.ndarray:
        """Global indices of shard s's training cells (all cells when nothing is held out)."""
        idx = np.arange(self.offsets[s], self.offsets[s + 1], dtype=np.int64)
        return idx[~self.is_heldout(idx)] if self.val_fraction > 0 else idx

    @property
    def train_counts(self) -> np.ndarray:
        if self._train_counts is None:
            self._train_counts = np.array([self.train_rows(s).size for s in range(len(self.sizes))], dtype=np.int64)
        return self._train_counts

    def heldout(self) -> "CellSubset | None":
        """The held-out cells as a positional dataset (for train(..., eval_dataset=))."""
        if self.val_fraction <= 0:
            return None
        parts = [np.arange(self.offsets[s], self.offsets[s + 1], dtype=np.int64) for s in range(len(self.sizes))]
        idx = np.concatenate([p[self.is_heldout(p)] for p in parts] + [np.zeros(0, np.int64)])
        return CellSubset(self, idx) if idx.size else None

    def n_genes(self, indices: Sequence[int]) -> np.ndarray:
        """Expressed genes of each cell (global indices), from the shards' offsets alone."""
        idx = np.asarray(indices, dtype=np.int64)
        shard = np.searchsorted(self.offsets, idx, side="right") - 1
        local = idx - self.offsets[shard]
        out = np.zeros(idx.size, dtype=np.int64)
        for s in np.unique(shard):
            starts, chunks = self._shard(int(s))
            sel = np.flatnonzero(shard == s)
            chunk = np.searchsorted(starts, local[sel], side="right") - 1
            for c in np.unique(chunk):
                rows = sel[chunk == c]
                off = chunks[c][0]
                j = local[rows] - starts[c]
                out[rows] = off[j + 1] - off[j]
        return out

    def batch_sampler(self, batch_size: int, world: int, rank: int, seed: int, epoch: int,
                      start_batch: int = 0, length_grouping: bool = False) -> "CorpusBatchSampler":
        return CorpusBatchSampler(self, batch_size, world, rank, seed, epoch, start_batch, length_grouping)


class CellSubset:
    """Positional view of some corpus cells (global indices kept as `index` for the collator)."""

    def __init__(self, corpus: CorpusDataset, indices: np.ndarray):
        self.corpus, self.indices = corpus, np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return int(self.indices.size)

    def __getitem__(self, i: int) -> dict:
        return self.corpus[int(self.indices[i])]

    def __getitems__(self, positions: Sequence[int]) -> list[dict]:
        return self.corpus.__getitems__(self.indices[np.asarray(positions, dtype=np.int64)])


class CorpusBatchSampler(Sampler[list[int]]):
    """Batches of global indices for one rank (see the module docstring for the scheme)."""

    def __init__(self, corpus: CorpusDataset, batch_size: int, world: int = 1, rank: int = 0, seed: int = 0,
                 epoch: int = 0, start_batch: int = 0, length_grouping: bool = False, megabatch: int = 50):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside world size {world}")
        self.corpus, self.batch_size, self.world, self.rank = corpus, batch_size, world, rank
        self.seed, self.epoch, self.start_batch = seed, epoch, start_batch
        self.length_grouping, self.megabatch = length_grouping, max(int(megabatch), 1)
        counts = corpus.train_counts
        self.per_rank = int(counts.sum()) // world
        self.n_batches = self.per_rank // batch_size

    def __len__(self) -> int:
        return max(self.n_batches - self.start_batch, 0)

    def shard_order(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch, 0x5A4D]).permutation(len(self.corpus.sizes))

    def parts(self) -> list[tuple[int, int, int]]:
        """This rank's (shard, first, last) training-cell ranges, in stream order."""
        order = self.shard_order()
        counts = self.corpus.train_counts[order]
        ends = np.cumsum(counts)
        lo, hi = self.rank * self.per_rank, self.rank * self.per_rank + self.n_batches * self.batch_size
        out = []
        for s, end, n in zip(order, ends, counts):
            a, b = max(lo, end - n), min(hi, end)
            if a < b:
                out.append((int(s), int(a - (end - n)), int(b - (end - n))))
        return out

    def _stream(self, first: int, last: int) -> np.ndarray:
        """Global indices at positions [first, last) of this rank's (unshuffled) stream."""
        pieces, pos = [], 0
        for s, a, b in self.parts():
            lo, hi = max(first, pos), min(last, pos + b - a)
            if lo < hi:
                pieces.append(self.corpus.train_rows(s)[a + lo - pos:a + hi - pos])
            pos += b - a
        return np.concatenate(pieces) if pieces else np.zeros(0, np.int64)

    def _window(self, i: int) -> np.ndarray:
        """Window i of this rank's stream, shuffled (seed, epoch, rank, i): the cells __iter__ buffers."""
        total, w = self.n_batches * self.batch_size, self.corpus.shuffle_buffer
        cells = self._stream(i * w, min((i + 1) * w, total))
        return cells[np.random.default_rng([self.seed, self.epoch, self.rank, i]).permutation(cells.size)]

    def _grouped(self):
        """Batches sorted by length within megabatches of the shuffled stream (module docstring, 5)."""
        total, w, bs = self.n_batches * self.batch_size, self.corpus.shuffle_buffer, self.batch_size
        size = self.megabatch * bs
        cached: dict[int, np.ndarray] = {}
        for k in range(self.start_batch * bs // size, -(-total // size)):
            lo, hi = k * size, min((k + 1) * size, total)
            pieces = []
            for i in range(lo // w, (hi - 1) // w + 1):
                if i not in cached:
                    cached = {i: self._window(i)} | ({i - 1: cached[i - 1]} if i - 1 in cached else {})
                a, b = max(lo, i * w), min(hi, (i + 1) * w)
                pieces.append(cached[i][a - i * w:b - i * w])
            cells = np.concatenate(pieces)
            cells = cells[np.argsort(-self.corpus.n_genes(cells), kind="stable")].reshape(-1, bs)
            order = np.random.default_rng([self.seed, self.epoch, 0x4C47, k]).permutation(len(cells))
            for j in range(max(self.start_batch - lo // bs, 0), len(cells)):
                yield cells[order[j]].tolist()

    def __iter__(self):
        if self.length_grouping:
            yield from self._grouped()
            return
        total, w, bs = self.n_batches * self.batch_size, self.corpus.shuffle_buffer, self.batch_size
        start = self.start_batch * bs
        buf_lo = next_lo = (start // w) * w  # windows are aligned to multiples of w: resume-invariant
        buf = np.zeros(0, np.int64)  # stream positions [buf_lo, buf_lo + buf.size), shuffled per window
        while start < total:
            while buf_lo + buf.size < start + bs:
                hi = min(next_lo + w, total)
                cells = self._stream(next_lo, hi)
                rng = np.random.default_rng([self.seed, self.epoch, self.rank, next_lo // w])
                buf, next_lo = np.concatenate([buf, cells[rng.permutation(cells.size)]]), hi
            yield buf[start - buf_lo:start - buf_lo + bs].tolist()
            start += bs
            if start - buf_lo >= w:
                buf, buf_lo = buf[start - buf_lo:], start
