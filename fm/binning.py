"""Per-cell expression binning (scGPT) and rank-value encoding (Geneformer V1), over CSR rows.

scGPT's value tokens: for one cell, take its positive values, compute ``n_bins - 1`` quantile
edges ``np.quantile(nz, np.linspace(0, 1, n_bins - 1))`` (numpy's default 'linear' method), and
give each value a bin in ``left = np.digitize(x, edges)`` (number of edges <= x) or
``right = np.digitize(x, edges, right=True)`` (number of edges < x). The two differ only where a
value equals an edge (ties: the cell minimum, repeated counts such as the many 1s of a raw-count
cell); scGPT then draws uniformly from ``{right+1 .. left}``, which makes embeddings change from
run to run. Zeros stay 0; nonzero values land in ``1 .. n_bins-1``.

Our tie rule (deterministic): ``bin = (left + right + 1) // 2``, the midpoint of
``{right+1 .. left}`` rounded down (the lower median of scGPT's possible draws). Without a tie,
``left == right`` and this is ``left``, exactly scGPT's value; otherwise it lies in
``right+1 .. left``; either way in ``1 .. n_bins-1``. Ties are the common case on count data:
in the first 300 pbmc3k cells, 89% of nonzero entries have more than one possible scGPT bin
(n_bins=51), so the rule matters.

`bin_csr` computes this for all rows at once, with no Python loop over cells: one sort of the
positive entries within their rows, the quantile edges of every row by the same floating-point
operations as ``np.quantile`` (so edges are bit-identical), and the two digitize counts from
exact comparisons of each edge with its two neighbouring sorted values plus a per-row cumulative
histogram. Nothing is offset or rescaled, so the result equals numpy's quantile + digitize
exactly (tests check this on real cells, entry by entry).

Raw counts or log1p-normalised data? ``normalize_total`` + ``log1p`` is a strictly increasing
map f per cell with f(0) = 0. The digitize counts depend only on which sorted position each edge
falls at and on whether it coincides with a value; linear interpolation between two values
keeps both under any strictly increasing f *in exact arithmetic*. So binning raw counts gives
the same bins as scGPT's binning of the log1p-normalised cell unless floating point breaks a
step: f can map two distinct counts to the same float (changing the tie structure), or an
interpolated edge can round onto a neighbouring value. Measured in
``tests/test_binning.py::test_monotone_transform_invariance`` (every cell of pbmc3k-hvg2000 and
kang2018; also checked once on pbmc3k with 13,714 genes): 0 of 1.1M (resp. 2.2M) nonzero entries differ, with float32 (scanpy's formula)
or float64 normalisation. It *can* differ: counts in the millions within one cell collide after
float32 log1p (``test_monotone_transform_can_differ_in_floating_point``); we have not seen this
in real data.

`rank_value_encode` is Geneformer V1's tokenisation (normalise by the cell's total count and
by each gene's corpus median, order genes by that value, highest first), vectorised the same way.
"""
from __future__ import annotations

import numpy as np

__all__ = [
    "bin_csr",
    "bin_rows",
    "scgpt_binning_reference",
    "scgpt_digitize_bounds",
    "rank_value_encode",
]

# Rows are processed in blocks of about this many stored entries (a row longer than this is a
# block of its own): the working set stays in cache (measured ~1.7x faster than one block for
# 2000 cells), temporary memory stays bounded, and row ids fit the 32 high bits of the sort key.
_BLOCK_NNZ = 1 << 17


# ----------------------------------------------------------------------------- validation
def _check_indptr(indptr: np.ndarray, n_values: int) -> np.ndarray:
    indptr = np.asarray(indptr)
    if indptr.ndim != 1 or indptr.size < 1 or not np.issubdtype(indptr.dtype, np.integer):
        raise ValueError("indptr must be a 1-D integer array of length n_rows + 1")
    indptr = indptr.astype(np.int64, copy=False)
    if indptr[0] != 0 or indptr[-1] != n_values or np.any(np.diff(indptr) < 0):
        raise ValueError(
            f"indptr must start at 0, be non-decreasing and end at len(values)={n_values}; "
            f"got start {indptr[0]}, end {indptr[-1]}"
        )
    return indptr


def _check_values(values: np.ndarray, what: str = "values") -> np.ndarray:
    """Floats are kept as they are (numpy's quantile depends on the dtype); ints/bools -> float64."""
    values = np.asarray(values)
    if values.ndim != 1:
        raise ValueError(f"{what} must be 1-D, got shape {values.shape}")
    if not np.issubdtype(values.dtype, np.floating):
        if not (np.issubdtype(values.dtype, np.integer) or values.dtype == np.bool_):
            raise ValueError(f"{what} must be a real numeric array, got dtype {values.dtype}")
        values = values.astype(np.float64)
    if values.size:
        if np.isnan(values).any():
            raise ValueError(f"{what} contain NaN: expression values must be finite and >= 0")
        if np.isinf(values).any():
            raise ValueError(f"{what} contain inf: expression values must be finite and >= 0")
        if values.min() < 0:
            raise ValueError(
                f"{what} contain negative numbers (min {values.min()}): expected counts or "
                "normalised expression >= 0"
            )
    return values


# ----------------------------------------------------------------------------- binning
def _sorted_run_keys(rows: np.ndarray, vals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(order, run_key): `order` sorts entries by (row, value); `run_key[i]`, for sorted position
    i, is a non-decreasing integer that is equal exactly for equal (row, value) pairs.

    Fast path: a positive float32 compares like its bit pattern read as uint32, so
    ``row << 32 | bits`` is an exact integer key (no value is merged with another). Values that
    are not float32-exact fall back to a two-key lexsort and run ids counted from it.
    """
    if vals.dtype == np.float32 or vals.dtype == np.float16:
        v32 = vals.astype(np.float32, copy=False)
    else:
        v32 = vals.astype(np.float32)
        if not np.array_equal(v32, vals):
            order = np.lexsort((vals, rows))
            s, r = vals[order], rows[order]
            new_run = np.empty(s.size, dtype=np.int64)
            new_run[0] = 0
            np.logical_or(s[1:] != s[:-1], r[1:] != r[:-1], out=new_run[1:], casting="unsafe")
            return order, np.cumsum(new_run)
    key = rows.astype(np.uint64) << np.uint64(32)
    key |= v32.view(np.uint32)
    order = np.argsort(key)
    return order, key[order]


def _bin_block(indptr: np.ndarray, values: np.ndarray, n_bins: int) -> np.ndarray:
    """Bins for one block of rows (indptr starts at 0 and indexes `values`)."""
    n_rows = indptr.size - 1
    row_len = np.diff(indptr)
    positive = values > 0
    if not positive.any():
        return np.zeros(values.size, dtype=np.int64)
    row_of = np.repeat(np.arange(n_rows, dtype=np.int64), row_len)
    if positive.all():  # the usual CSR of counts: no stored zeros
        pos, vals, m = None, values, row_len
    else:
        pos = np.flatnonzero(positive)
        row_of, vals = row_of[pos], values[pos]
        m = np.bincount(row_of, minlength=n_rows)  # positive values per row
    order, run_key = _sorted_run_keys(row_of, vals)
    s = vals[order]  # positive values sorted within each row, rows in order
    n_pos = s.size
    start = np.zeros(n_rows, dtype=np.int64)
    np.cumsum(m[:-1], out=start[1:])
    rows = np.flatnonzero(m > 0)

    # --- quantile edges, exactly numpy's 'linear' method (numpy/lib/_function_base_impl.py:
    # _quantile, _get_indexes, _get_gamma, _lerp), one row of n_bins-1 edges per nonempty cell.
    q = np.linspace(0, 1, n_bins - 1)
    mr = m[rows][:, None]
    virtual = (mr - 1).astype(np.float64) * q  # (n - 1) * quantiles
    prev_f = np.floor(virtual)
    above = virtual >= (mr - 1)  # numpy takes the last value there (index -1)
    last = np.broadcast_to(mr - 1, virtual.shape)
    prev = np.where(above, last, prev_f.astype(np.int64))
    nxt = np.where(above, last, prev + 1)
    # numpy computes gamma from the *clipped* previous index; where clipped, a == b and
    # diff == 0, so either lerp branch returns a exactly and gamma does not matter.
    gamma = virtual - prev_f
    gp = start[rows][:, None] + prev  # global positions in `s`
    gn = start[rows][:, None] + nxt
    a = s[gp]
    b = s[gn]
    diff = b - a  # in the input dtype, as numpy does
    edges = a + diff * gamma
    hi = gamma >= 0.5
    edges[hi] = (b - diff * (1 - gamma))[hi]

    # --- digitize counts. Every edge lies in [a, b] = [s[prev], s[next]] (checked; it follows
    # from the lerp formulas), so, run = the positions holding the same value in the same row:
    #   first position with value >= edge : start of a's run if edge == a, else gn
    #   first position with value >  edge : one past b's run if edge == b, else gn
    #                                       (past the row's end: no value is > edge)
    # left[j] = #edges <= s[j] = #{edges whose first '>=' position is <= j}; right[j] the same
    # with '>'. Only left + right is needed: one histogram over positions, one cumulative sum.
    if not (np.all(edges >= a) and np.all(edges <= b)):
        raise RuntimeError("internal error: a quantile edge fell outside its interpolation interval")
    j_le = np.where(edges == a, np.searchsorted(run_key, run_key[gp], side="left"), gn)
    j_lt = np.where(edges == b, np.searchsorted(run_key, run_key[gn], side="right"), gn)
    j_lt = j_lt[j_lt < (start[rows] + m[rows])[:, None]]
    hist = np.bincount(j_le.ravel(), minlength=n_pos)
    hist += np.bincount(j_lt, minlength=n_pos)
    cum = np.cumsum(hist)
    first = np.minimum(start, n_pos - 1)  # (empty rows: any index; they repeat 0 times)
    before_row = cum[first] - hist[first]  # counts contributed by earlier rows
    left_plus_right = cum - np.repeat(before_row, m)
    digits = (left_plus_right + 1) // 2  # the tie rule: (left + right + 1) // 2

    out = np.zeros(values.size, dtype=np.int64)
    out[order if pos is None else pos[order]] = digits
    return out


def compiled_kernels():
    """fm._kernels when numba is importable and the kernels are enabled (FM_COLLATOR != numpy), else None."""
    global _KERNELS
    if _KERNELS is None:
        try:
            from fm import _kernels
        except ImportError:  # numba absent: the numpy paths
            _KERNELS = False
        else:
            _KERNELS = _kernels
    return _KERNELS if _KERNELS and _KERNELS.enabled() else None


_KERNELS = None


def bin_csr(indptr: np.ndarray, values: np.ndarray, n_bins: int = 51) -> np.ndarray:
    """scGPT bins for every stored entry of a CSR matrix (``indptr``, ``values``), int64.

    Zeros (stored or not) are bin 0; a row without positive values is all 0; positive values get
    scGPT's bin in ``1 .. n_bins-1`` with the deterministic tie rule ``(left + right + 1) // 2``
    (module docstring). Rows are independent, so any row slicing/batching gives the same bins.
    float32 values go through a compiled per-cell kernel when numba is installed (fm._kernels:
    the same arithmetic, identical output); everything else through the vectorised numpy code.
    """
    kernels = compiled_kernels()
    if (kernels is not None and isinstance(values, np.ndarray) and values.dtype == np.float32 and values.ndim == 1
            and isinstance(n_bins, (int, np.integer)) and not isinstance(n_bins, bool) and n_bins >= 2):
        ip = _check_indptr(indptr, values.size)
        out = np.empty(values.size, dtype=np.int64)
        if kernels.bin_csr_f32(ip, values, _linspace(int(n_bins)), out) == 0:
            return out
    return _bin_csr_numpy(indptr, values, n_bins)


_Q: dict = {}


def _linspace(n_bins: int) -> np.ndarray:
    q = _Q.get(n_bins)
    if q is None:
        q = _Q[n_bins] = np.linspace(0, 1, n_bins - 1)
    return q


def _bin_csr_numpy(indptr: np.ndarray, values: np.ndarray, n_bins: int = 51) -> np.ndarray:
    """bin_csr's vectorised numpy path (no Python loop over cells)."""
    values = _check_values(values)
    indptr = _check_indptr(indptr, values.size)
    if not isinstance(n_bins, (int, np.integer)) or isinstance(n_bins, bool) or n_bins < 2:
        raise ValueError(f"n_bins must be an integer >= 2, got {n_bins!r}")
    n_bins = int(n_bins)
    out = np.zeros(values.size, dtype=np.int64)
    n_rows = indptr.size - 1
    r0 = 0
    while r0 < n_rows:
        # largest r1 with indptr[r1] - indptr[r0] <= _BLOCK_NNZ (at least one row)
        r1 = int(np.searchsorted(indptr, indptr[r0] + _BLOCK_NNZ, side="right")) - 1
        r1 = min(max(r1, r0 + 1), n_rows)
        lo, hi = indptr[r0], indptr[r1]
        out[lo:hi] = _bin_block(indptr[r0 : r1 + 1] - lo, values[lo:hi], n_bins)
        r0 = r1
    return out


def bin_rows(matrix, n_bins: int = 51):
    """`bin_csr` on a scipy sparse matrix (or dense 2-D array): a CSR of the same structure, data = bins.

    Non-CSR input is converted with ``tocsr()``. A CSR that is not in scipy's canonical form
    (sorted, no duplicate entries) is canonicalised on a copy first, summing duplicates as
    densifying the row would; the result then has the canonical structure. Stored zeros stay
    stored, with bin 0.
    """
    import scipy.sparse as sp

    if sp.issparse(matrix):
        csr = matrix.tocsr()
    else:
        csr = sp.csr_matrix(np.asarray(matrix))
    if not csr.has_canonical_format:
        csr = csr.copy()
        csr.sum_duplicates()
    bins = bin_csr(csr.indptr, csr.data, n_bins)
    return type(csr)((bins, csr.indices.copy(), csr.indptr.copy()), shape=csr.shape)


# ----------------------------------------------------------------------------- scGPT reference
def scgpt_digitize_bounds(row: np.ndarray, n_bins: int = 51) -> tuple[np.ndarray, np.ndarray]:
    """scGPT's (left, right) digitize results for the positive entries of a dense row, in order.

    ``left > right`` marks a tie (value equal to an edge): scGPT draws from ``{right+1..left}``.
    """
    row = np.asarray(row)
    non_zero = row[row > 0]
    if non_zero.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    bins = np.quantile(non_zero, np.linspace(0, 1, n_bins - 1))
    left = np.digitize(non_zero, bins)
    right = np.digitize(non_zero, bins, right=True)
    return left.astype(np.int64), right.astype(np.int64)


def scgpt_binning_reference(row: np.ndarray, n_bins: int = 51, rng=None) -> np.ndarray:
    """scGPT's per-cell binning (scgpt/preprocess.py ``binning`` + ``_digitize``), random ties.

    A plain transcription for tests and benchmarks. ``rng``: a ``np.random.Generator`` (or
    None for numpy's global state, as scGPT uses ``np.random.rand``).
    """
    row = np.asarray(row)
    if row.max() == 0:
        return np.zeros_like(row, dtype=np.int64)
    non_zero_ids = row > 0
    non_zero_row = row[non_zero_ids]
    bins = np.quantile(non_zero_row, np.linspace(0, 1, n_bins - 1))
    left_digits = np.digitize(non_zero_row, bins)
    right_digits = np.digitize(non_zero_row, bins, right=True)
    rands = rng.random(len(non_zero_row)) if rng is not None else np.random.rand(len(non_zero_row))
    digits = np.ceil(rands * (right_digits - left_digits) + left_digits).astype(np.int64)
    binned_row = np.zeros_like(row, dtype=np.int64)
    binned_row[non_zero_ids] = digits
    return binned_row


# ----------------------------------------------------------------------------- Geneformer
def rank_value_encode(
    indptr: np.ndarray,
    gene_cols: np.ndarray,
    counts: np.ndarray,
    n_counts: np.ndarray,
    gene_medians: np.ndarray,
    max_len: int = 2048,
) -> tuple[np.ndarray, np.ndarray]:
    """Geneformer V1 rank-value encoding of CSR rows: (indptr_out, cols_out), cols ordered per cell.

    Per cell: keep entries whose ``gene_medians[col]`` is finite and > 0 (gene in Geneformer's
    median dictionary), value = count / n_counts[cell] * 10_000 / median (float64), drop zero
    values, order by value descending, ties by column index ascending, keep the first
    ``max_len``. The tie rule equals ``np.argsort(-v, kind="stable")`` over a cell's genes in
    column order; Geneformer calls ``np.argsort(-v)`` (not stable), whose tie order is a numpy
    implementation detail, so ours is the deterministic version of it. ``n_counts`` is the
    cell's total count over *all* genes (the caller's choice; Geneformer uses obs["n_counts"]).
    Callers map the returned column indices to token ids. No <cls>/<eos> (V1).
    """
    counts = _check_values(counts, "counts")
    indptr = _check_indptr(indptr, counts.size)
    gene_cols = np.asarray(gene_cols)
    if gene_cols.shape != counts.shape or not np.issubdtype(gene_cols.dtype, np.integer):
        raise ValueError("gene_cols must be an integer array aligned with counts")
    n_rows = indptr.size - 1
    n_counts = np.asarray(n_counts, dtype=np.float64).reshape(-1)
    if n_counts.size != n_rows:
        raise ValueError(f"n_counts has {n_counts.size} entries for {n_rows} cells")
    medians = np.asarray(gene_medians, dtype=np.float64).reshape(-1)
    if gene_cols.size and (gene_cols.min() < 0 or gene_cols.max() >= medians.size):
        raise ValueError("gene_cols index outside gene_medians")
    if max_len < 0:
        raise ValueError("max_len must be >= 0")

    row_of = np.repeat(np.arange(n_rows, dtype=np.int64), np.diff(indptr))
    med = medians[gene_cols]
    keep = np.isfinite(med) & (med > 0) & (counts > 0)
    rows, cols, med = row_of[keep], gene_cols[keep].astype(np.int64), med[keep]
    nc = n_counts[rows]
    if np.any(~np.isfinite(nc) | (nc <= 0)):
        raise ValueError("n_counts must be finite and > 0 for every cell with expressed genes")
    value = counts[keep].astype(np.float64) / nc * 10_000 / med
    nz = value != 0  # underflow guard; Geneformer keeps nonzero values
    rows, cols, value = rows[nz], cols[nz], value[nz]

    order = np.lexsort((cols, -value, rows))
    rows, cols = rows[order], cols[order]
    per_row = np.bincount(rows, minlength=n_rows)
    first = np.zeros(n_rows, dtype=np.int64)
    np.cumsum(per_row[:-1], out=first[1:])
    rank = np.arange(rows.size, dtype=np.int64) - first[rows]
    cols = cols[rank < max_len]
    indptr_out = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(np.minimum(per_row, max_len), out=indptr_out[1:])
    return indptr_out, cols
