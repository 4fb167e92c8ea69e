"""Compiled (numba) kernels for the collator's hot path: per-cell binning, gene selection, masking, padding.

Optional: with numba installed (`pip install scfm[fast]`) `fm.binning.bin_csr` (float32 values) and
`fm.data.collator.CellCollator` run these per-cell loops; without it (or with ``FM_COLLATOR=numpy`` in
the environment, or ``fm._kernels.ENABLED = False``) they use their vectorised numpy code. Both paths
give bit-identical output (tests/test_kernels.py): the kernels redo the numpy path's arithmetic, not an
approximation of it.

- Binning: scGPT's quantile edges computed as `bin_csr` computes them (numpy's 'linear' quantile, the
  same float32 differences and float64 interpolation), then each value's (left + right + 1) // 2 by a
  binary search over the edges. The sorted values are built from a histogram of the small integer
  counts (most entries of a count cell) merged with the sorted rest: no full sort per cell.
- Selection and masking: the hashed uniforms of `fm.data.collator.hashed_uniform`, kept as their 53-bit
  integers (the float is that integer / 2⁵³, so the order is the same), and the k smallest in (key,
  index) order taken by a bucket pass over the key's top bits — expected O(n), as the keys are uniform.

- `fill_batch_binned` (the `bins` / `bin_values` encodings): the binning above done per cell inside the batch
  kernel (edges read from the histogram, only kept genes binned, written into the padded rows), and masking as
  a threshold selection (`_mask_row`) instead of a sort.

- `fill_batch_binned_parallel`: the same per cell (`_binned_cell`), cells over numba threads (prange), each chunk
  its own scratch: bit-identical output. `fill_binned` picks it by `collator_threads()` (FM_COLLATOR_THREADS,
  default 2 in the main process, always 1 in DataLoader workers / other child processes).

The per-cell binning lives in fm/_bin_kernels.py, the hashing / k-smallest / mask-threshold primitives in
fm/_select_kernels.py; this file holds the batch kernels built on them and the thread control.

The first call of a process compiles (cached on disk with cache=True: later processes load the cache).
"""
from __future__ import annotations

import os
import threading

import numpy as np
from numba import njit, prange

from fm._bin_kernels import _SMALL, _bin_of, _cell_edges, bin_csr_f32  # noqa: F401 (bin_csr_f32: fm.binning)
from fm._select_kernels import (_hash53, _hash_genes, _hash_positions, _mask_row, _most_expressed,  # noqa: F401
                                _smallest, _splitmix)

ENABLED: bool | None = None
"""None: use the kernels unless FM_COLLATOR=numpy is set; True / False force the choice (tests, benchmarks)."""


def enabled() -> bool:
    if ENABLED is not None:
        return bool(ENABLED)
    return os.environ.get("FM_COLLATOR", "").lower() != "numpy"


THREADS: int | None = None
"""None: FM_COLLATOR_THREADS from the environment (default 2); an int forces it (tests, benchmarks)."""

_PARALLEL_LOCK = threading.Lock()


def collator_threads() -> int:
    """Threads for fill_batch_binned's cells (fill_batch_binned_parallel where > 1), capped at numba's thread count.

    Default 2 (FM_COLLATOR_THREADS overrides; 1 = the serial kernel): the output is the serial kernel's bit for bit,
    and CITE-seq-sized cells collate ~1.5x faster on 2 threads (eval/perf/RESULTS.md, "Collator (issue 13)").
    Always 1 in a child process (a DataLoader worker, forked or spawned): numba's thread pools are not fork-safe
    (GNU OpenMP aborts after fork; a pool the parent started does not exist in the child), and the workers already
    occupy the cores, so threads there only oversubscribe them."""
    if THREADS is not None:
        n = int(THREADS)
    else:
        try:
            n = int(os.environ.get("FM_COLLATOR_THREADS", "2") or 2)
        except ValueError:
            n = 1
    if n <= 1:
        return 1
    import multiprocessing

    if multiprocessing.parent_process() is not None:
        return 1
    import numba

    return max(1, min(n, numba.config.NUMBA_NUM_THREADS))


def fill_binned(*args):
    """fill_batch_binned, or fill_batch_binned_parallel over collator_threads() threads (same output, bit for bit)."""
    threads = collator_threads()
    n_rows = args[0].size - 1
    # one parallel launch at a time (numba's default workqueue layer aborts on concurrent launches from two threads):
    # a thread that finds it taken runs the serial kernel
    if threads <= 1 or n_rows < 2 or not _PARALLEL_LOCK.acquire(blocking=False):
        return fill_batch_binned(*args)
    try:
        import numba

        chunks = min(threads, n_rows)
        before = numba.get_num_threads()
        numba.set_num_threads(min(chunks, numba.config.NUMBA_NUM_THREADS))
        try:
            return fill_batch_binned_parallel(*args, chunks)
        finally:
            numba.set_num_threads(before)
    finally:
        _PARALLEL_LOCK.release()


@njit(cache=True, nogil=True)
def fill_batch(indptr, genes, counts, count_bits, encoded, cell_index, kept_expressed, n_zero, zero_genes, n_mask,
               train, all_fit, sample_base, mask_base, mask_value,
               gene_ids, values, labels, attention, masked):
    """The collator's batch after value encoding: choose each cell's expressed genes, append its zero genes,
    mask, write the padded rows (pre-filled with pad values). Returns 0, or 1 where inference meets a count
    that is NaN or negative (the caller then runs the numpy path)."""
    n_rows = indptr.size - 1
    maxlen = 1
    maxkept = 1
    for i in range(n_rows):
        maxlen = max(maxlen, indptr[i + 1] - indptr[i])
        maxkept = max(maxkept, kept_expressed[i] + n_zero[i])
    keys = np.empty(max(maxlen, maxkept), np.uint64)
    count = np.empty(2 * max(maxlen, maxkept) + 2, np.int64)
    perm = np.empty(max(maxlen, maxkept), np.int64)
    sk = np.empty(max(maxlen, maxkept), np.uint64)
    sel = np.empty(max(maxlen, maxkept), np.int64)
    msel = np.empty(max(maxlen, maxkept), np.int64)
    colof = np.full(maxlen, -1, np.int64)
    tokcol = np.empty(maxkept, np.int64)
    zoff = 0
    for i in range(n_rows):
        lo, hi = indptr[i], indptr[i + 1]
        n = hi - lo
        ke = kept_expressed[i]
        nz = n_zero[i]
        cell = cell_index[i]
        # --- which expressed genes, in which column
        if train and all_fit:
            for c in range(n):
                sel[c] = c
        elif train:
            for p in range(n):
                keys[p] = _hash53(sample_base, cell, p)
            _smallest(keys, n, ke, sel, count, perm, sk)
        elif _most_expressed(counts, genes, count_bits, lo, n, keys, sel, ke):
            return 1
        for c in range(ke):
            j = lo + sel[c]
            gene_ids[i, c] = genes[j]
            values[i, c] = encoded[j]
            labels[i, c] = encoded[j]
            attention[i, c] = True
        for z in range(nz):
            c = ke + z
            gene_ids[i, c] = zero_genes[zoff + z]
            values[i, c] = 0
            labels[i, c] = 0
            attention[i, c] = True
        # --- masking: the n_mask smallest hashed (cell, gene) keys, ties by token order (kept expressed genes
        # in their row order, then zero genes)
        if train and n_mask[i] > 0:
            # keys in column order (tie-break = column); the numpy path breaks ties by token order (kept
            # expressed genes in row order, then zero genes), so a tie (two equal 53-bit hashes) where the two
            # orders differ reruns in token order
            t = ke + nz
            nm = min(n_mask[i], t)  # mask_ratio > 1: every token
            for c in range(ke):
                keys[c] = _hash53(mask_base, cell, genes[lo + sel[c]])
                tokcol[c] = c
            for z in range(nz):
                keys[ke + z] = _hash53(mask_base, cell, zero_genes[zoff + z])
                tokcol[ke + z] = ke + z
            if not (ke == n and _identity(sel, ke)):
                tie = _smallest(keys, t, nm, msel, count, perm, sk)
                if tie:
                    for c in range(ke):
                        colof[sel[c]] = c
                    t = 0
                    for p in range(n):
                        c = colof[p]
                        if c >= 0:
                            keys[t] = _hash53(mask_base, cell, genes[lo + p])
                            tokcol[t] = c
                            t += 1
                            colof[p] = -1
                    for z in range(nz):
                        keys[t] = _hash53(mask_base, cell, zero_genes[zoff + z])
                        tokcol[t] = ke + z
                        t += 1
                    _smallest(keys, t, nm, msel, count, perm, sk)
            else:
                _smallest(keys, t, nm, msel, count, perm, sk)
            for x in range(nm):
                c = tokcol[msel[x]]
                masked[i, c] = True
                values[i, c] = mask_value
        zoff += nz
    return 0


@njit(cache=True, nogil=True, inline="always")
def _identity(sel, k):
    for c in range(k):
        if sel[c] != c:
            return False
    return True


# ----------------------------------------------------------------------------- fused: bin + select + mask + pad
_NSUB = 4  # sub-histograms: consecutive entries count into different ones (no store-to-load chain on repeated 1s)


@njit(cache=True, nogil=True)
def _binned_cell(i, lo, hi, ke, nz, zoff, cell, genes, counts, count_bits, q, zero_genes, n_mask_i, train, sampling,
                 sample_base, mask_base, mask_value, gene_ids, values, labels, attention, masked,
                 keys, mkeys, count, perm, sk, sel, hist, table, rest, s, edges):
    """fill_batch_binned's work for row i (cell `cell`, counts lo:hi, zero genes zero_genes[zoff:zoff + nz]) with
    the given scratch buffers; writes only row i of the outputs. Returns fill_batch_binned's status."""
    nq = q.size
    n = hi - lo
    hs = _splitmix(sample_base ^ np.uint64(cell))
    hm = _splitmix(mask_base ^ np.uint64(cell))
    # --- one pass over the cell: validity, histogram of the small integer counts
    m = 0
    nrest = 0
    vmax = 0
    bad = False
    for p in range(n):
        v = counts[lo + p]
        bad |= not (v >= 0) or v == np.inf
        if v > 0:
            m += 1
            if v < _SMALL and np.int64(v) == v:
                k = np.int64(v)
                hist[(p & (_NSUB - 1)) * _SMALL + k] += 1
                vmax = max(vmax, k)
            else:
                rest[nrest] = v
                nrest += 1
    if bad:
        return 2
    # --- the cell's bins: edges, and a bin per integer count up to vmax (edges are sorted: one merge)
    if m:
        for k in range(1, vmax + 1):
            h = hist[k]
            for u in range(1, _NSUB):
                h += hist[u * _SMALL + k]
                hist[u * _SMALL + k] = 0
            hist[k] = h
        hist[vmax + 1] = 1  # sentinel for _cell_edges' scan (cleared below)
        _cell_edges(hist, vmax, rest, nrest, m, s, q, edges)
        hist[vmax + 1] = 0
        pl = 0
        pr = 0
        for k in range(1, vmax + 1):
            x = np.float64(k)
            while pl < nq and edges[pl] <= x:
                pl += 1
            while pr < nq and edges[pr] < x:
                pr += 1
            table[k] = (pl + pr + 1) >> 1
            hist[k] = 0
    # --- which expressed genes, in which column
    if sampling:
        _hash_positions(hs, n, keys)
        _smallest(keys, n, ke, sel, count, perm, sk)
    elif not train:
        if _most_expressed(counts, genes, count_bits, lo, n, keys, sel, ke):
            return 1
    else:
        for c in range(ke):
            sel[c] = c
    masking = train and n_mask_i > 0
    for c in range(ke):
        j = lo + sel[c]
        v = counts[j]
        if not (v > 0) or m == 0:
            x = 0
        elif v < _SMALL and np.int64(v) == v:
            x = table[np.int64(v)]
        else:
            x = _bin_of(np.float64(v), edges)
        g = genes[j]
        gene_ids[i, c] = g
        labels[i, c] = x
        attention[i, c] = True
        values[i, c] = x
    for z in range(nz):
        c = ke + z
        gene_ids[i, c] = zero_genes[zoff + z]
        values[i, c] = 0
        labels[i, c] = 0
        attention[i, c] = True
    if masking:
        _hash_genes(hm, gene_ids[i], ke + nz, mkeys)
    # --- masking: the n_mask smallest keys (ties by token order: kept expressed genes in row order, then zeros)
    if masking:
        _mask_row(mkeys, ke + nz, n_mask_i, sel, ke, n, count, sk, masked[i], values[i], mask_value)
    return 0


@njit(cache=True, nogil=True)
def _scratch(maxlen, maxkept, nq):
    big = max(maxlen, maxkept)
    return (np.empty(big, np.uint64), np.empty(maxkept, np.uint64), np.empty(2 * big + 2, np.int64),
            np.empty(big, np.int64), np.empty(big, np.uint64), np.empty(big, np.int64),
            np.zeros(_NSUB * _SMALL + 1, np.int64), np.zeros(_SMALL, np.int64), np.empty(maxlen, np.float32),
            np.empty(maxlen, np.float32), np.empty(nq, np.float64))


@njit(cache=True, nogil=True)
def _sizes(indptr, kept_expressed, n_zero):
    n_rows = indptr.size - 1
    maxlen = 1
    maxkept = 1
    for i in range(n_rows):
        maxlen = max(maxlen, indptr[i + 1] - indptr[i])
        maxkept = max(maxkept, kept_expressed[i] + n_zero[i])
    return maxlen, maxkept


@njit(cache=True, nogil=True)
def fill_batch_binned(indptr, genes, counts, count_bits, q, cell_index, kept_expressed, n_zero, zero_genes, n_mask,
                      train, all_fit, sample_base, mask_base, mask_value,
                      gene_ids, values, labels, attention, masked):
    """fill_batch with scGPT's binning (bin_csr's values) done inside, per cell: one pass over the cell's counts
    builds its histogram (and the sampling hashes), the quantile edges come from the histogram, and only the kept
    genes are binned, written straight into the padded rows. Masking takes the n_mask smallest hashed keys as a
    set: everything below the n_mask-th smallest key (a bucket count finds it; ties there go by token order).
    Returns 0; 1 where inference meets a count that is NaN or negative, 2 where a count is NaN, inf or negative
    (the caller then runs the unfused path, whose checks raise)."""
    n_rows = indptr.size - 1
    maxlen, maxkept = _sizes(indptr, kept_expressed, n_zero)
    keys, mkeys, count, perm, sk, sel, hist, table, rest, s, edges = _scratch(maxlen, maxkept, q.size)
    sampling = train and not all_fit
    zoff = 0
    for i in range(n_rows):
        st = _binned_cell(i, indptr[i], indptr[i + 1], kept_expressed[i], n_zero[i], zoff, cell_index[i], genes,
                          counts, count_bits, q, zero_genes, n_mask[i], train, sampling, sample_base, mask_base,
                          mask_value, gene_ids, values, labels, attention, masked,
                          keys, mkeys, count, perm, sk, sel, hist, table, rest, s, edges)
        if st:
            return st
        zoff += n_zero[i]
    return 0


@njit(cache=True, nogil=True, parallel=True)
def fill_batch_binned_parallel(indptr, genes, counts, count_bits, q, cell_index, kept_expressed, n_zero, zero_genes,
                               n_mask, train, all_fit, sample_base, mask_base, mask_value,
                               gene_ids, values, labels, attention, masked, n_chunks):
    """fill_batch_binned with the cells dealt round-robin to n_chunks chunks run by numba's thread pool (prange):
    each chunk its own scratch buffers, each cell its precomputed zero-gene offset and its own output row, so the
    output (and the status: the first failing cell's, in row order) is the serial kernel's, bit for bit."""
    n_rows = indptr.size - 1
    maxlen, maxkept = _sizes(indptr, kept_expressed, n_zero)
    zoffs = np.empty(n_rows + 1, np.int64)
    zoffs[0] = 0
    for i in range(n_rows):
        zoffs[i + 1] = zoffs[i] + n_zero[i]
    sampling = train and not all_fit
    status = np.zeros(n_rows, np.int64)
    for t in prange(n_chunks):
        keys, mkeys, count, perm, sk, sel, hist, table, rest, s, edges = _scratch(maxlen, maxkept, q.size)
        for i in range(t, n_rows, n_chunks):
            st = _binned_cell(i, indptr[i], indptr[i + 1], kept_expressed[i], n_zero[i], zoffs[i], cell_index[i],
                              genes, counts, count_bits, q, zero_genes, n_mask[i], train, sampling, sample_base,
                              mask_base, mask_value, gene_ids, values, labels, attention, masked,
                              keys, mkeys, count, perm, sk, sel, hist, table, rest, s, edges)
            status[i] = st
            if st:  # the serial kernel stops at its first failing cell: every cell before it ran here too
                break
    for i in range(n_rows):
        if status[i]:
            return status[i]
    return 0
