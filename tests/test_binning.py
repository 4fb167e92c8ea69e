"""fm.binning against scGPT's own algorithm (numpy quantile + digitize) on real cells, and
Geneformer V1 rank-value encoding against the geneformer_tiny fixture."""
from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp

import fm.binning as binning
from fm.binning import (
    bin_csr,
    bin_rows,
    rank_value_encode,
    scgpt_binning_reference,
    scgpt_digitize_bounds,
)
from fm.paths import DATA_DIR_ENV, data_dir

PBMC = "pbmc3k_seurat_hvg2000_labeled.h5ad"
KANG = "kang2018_muscat_1556c_labeled.h5ad"
CITESEQ = "citeseq_pbmc1k_10x_scarf.h5ad"
N_CELLS = 300

_cache: dict[str, sp.csr_matrix] = {}


def _real_counts(name: str, n: int | None = N_CELLS) -> sp.csr_matrix:
    """Raw counts (float32 CSR) of the first n cells of a shared h5ad; skip if the data is absent."""
    path = data_dir() / "h5ad" / name
    if not path.is_file():
        pytest.skip(f"real data file {path} not found (set {DATA_DIR_ENV} to the shared data directory)")
    if name not in _cache:
        import anndata as ad

        _cache[name] = sp.csr_matrix(ad.read_h5ad(path).X)
    X = _cache[name]
    return X if n is None else X[:n]


def _check_against_reference(X: sp.csr_matrix, n_bins: int) -> dict[str, int]:
    """Assert bin_csr == scGPT wherever scGPT is deterministic, inside its range at ties."""
    bins = bin_csr(X.indptr, X.data, n_bins)
    rng = np.random.default_rng(0)
    n_ties = n_exact = 0
    for i in range(X.shape[0]):
        lo, hi = X.indptr[i], X.indptr[i + 1]
        data, got = X.data[lo:hi], bins[lo:hi]
        row = X[i].toarray().ravel()
        left, right = scgpt_digitize_bounds(row, n_bins)
        # bounds are reported in column order of the positive entries; CSR rows here are sorted
        assert np.array_equal(got[data == 0], np.zeros((data == 0).sum()))
        g = got[data > 0]
        single = left <= right + 1  # scGPT has exactly one possible value: left
        np.testing.assert_array_equal(g[single], left[single])
        tie = ~single
        assert np.all((g[tie] >= right[tie] + 1) & (g[tie] <= left[tie]))
        np.testing.assert_array_equal(g, (left + right + 1) // 2)  # the documented tie rule
        assert g.size == 0 or (g.min() >= 1 and g.max() <= n_bins - 1)
        ref = scgpt_binning_reference(row, n_bins, rng=rng)[row > 0]
        np.testing.assert_array_equal(ref[single], g[single])
        assert np.all((ref >= np.minimum(right + 1, left)) & (ref <= left))
        n_ties += int(tie.sum())
        n_exact += int(single.sum())
    return {"exact": n_exact, "ties": n_ties}


# ------------------------------------------------------------------------ real cells vs scGPT
@pytest.mark.parametrize("name", [PBMC, KANG])
@pytest.mark.parametrize("n_bins", [51, 11])
def test_matches_scgpt_on_real_cells(name, n_bins):
    X = _real_counts(name)
    X.sort_indices()
    assert X.dtype == np.float32
    counts = _check_against_reference(X, n_bins)
    assert counts["exact"] > 0 and counts["ties"] > 0  # both cases really exercised
    print(f"{name} n_bins={n_bins}: {counts}")


def test_bin_rows_keeps_structure_and_zeros():
    X = _real_counts(PBMC, 50).copy()
    X.data[::7] = 0  # stored zeros stay stored, with bin 0
    B = bin_rows(X)
    assert sp.issparse(B) and B.shape == X.shape
    np.testing.assert_array_equal(B.indptr, X.indptr)
    np.testing.assert_array_equal(B.indices, X.indices)
    assert np.all(B.data[X.data == 0] == 0) and np.all(B.data[X.data > 0] >= 1)
    Y = X.copy()
    Y.eliminate_zeros()
    np.testing.assert_array_equal(B.data[X.data > 0], bin_csr(Y.indptr, Y.data))
    # dense input gives the same bins
    np.testing.assert_array_equal(bin_rows(X.toarray()).toarray(), B.toarray())


def test_deterministic_and_row_independent(monkeypatch):
    X = _real_counts(KANG)
    a = bin_csr(X.indptr, X.data)
    np.testing.assert_array_equal(a, bin_csr(X.indptr, X.data))
    # a row's bins do not depend on the other rows in the batch
    sub = X[100:140]
    np.testing.assert_array_equal(bin_csr(sub.indptr, sub.data), a[X.indptr[100] : X.indptr[140]])
    # nor on the internal block size
    monkeypatch.setattr(binning, "_BLOCK_NNZ", 1000)
    np.testing.assert_array_equal(bin_csr(X.indptr, X.data), a)


# ------------------------------------------------------------------------ edge cases
def test_empty_rows_single_nonzero_and_empty_input():
    # rows: empty, all stored zeros, single nonzero, ordinary, empty at the end
    indptr = np.array([0, 0, 3, 4, 9, 9])
    values = np.array([0, 0, 0, 7.5, 1, 3, 0, 3, 10], dtype=np.float32)
    b = bin_csr(indptr, values)
    assert b.dtype == np.int64 and b.shape == values.shape
    np.testing.assert_array_equal(b[:3], 0)
    # single nonzero: every edge equals it, scGPT draws from 1..n_bins-1; we take the midpoint
    left, right = scgpt_digitize_bounds(np.array([7.5]), 51)
    assert (left[0], right[0]) == (50, 0)
    assert b[3] == 25
    assert b[6] == 0
    for n_bins in (51, 11, 3, 2):
        bb = bin_csr(indptr, values, n_bins)
        row = values[4:9]
        left, right = scgpt_digitize_bounds(row, n_bins)
        np.testing.assert_array_equal(bb[4:9][row > 0], (left + right + 1) // 2)
        assert bb[4:9][row > 0].min() >= 1 and bb[4:9].max() <= n_bins - 1
    assert bin_csr(np.array([0]), np.zeros(0, np.float32)).shape == (0,)
    assert bin_csr(np.array([0, 0, 0]), np.zeros(0)).shape == (0,)
    assert np.all(scgpt_binning_reference(np.zeros(5)) == 0)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, np.int32])
def test_synthetic_many_ties_and_wide_range(dtype):
    """Random cells with heavy ties (Poisson counts) and with a huge dynamic range."""
    rng = np.random.default_rng(1)
    D = rng.poisson(rng.gamma(0.3, 3, (150, 120))) * (rng.random((150, 120)) < 0.5)
    if np.issubdtype(dtype, np.floating):
        sigma = 2 if dtype == np.float16 else 6  # float16 overflows at 65504
        wide = np.exp(rng.normal(0, sigma, (50, 120))) * (rng.random((50, 120)) < 0.4)
        D = np.vstack([D, wide, np.log1p(wide)])  # log1p(float64): not float32-exact -> lexsort path
    D = D.astype(dtype)
    for n_bins in (51, 11):
        indptr = np.arange(D.shape[0] + 1) * D.shape[1]
        b = bin_csr(indptr, D.ravel(), n_bins).reshape(D.shape)
        for i, row in enumerate(D):
            left, right = scgpt_digitize_bounds(row, n_bins)
            np.testing.assert_array_equal(b[i][row > 0], (left + right + 1) // 2)
            assert np.all(b[i][row == 0] == 0)


def test_invalid_inputs():
    ip = np.array([0, 3])
    with pytest.raises(ValueError, match="NaN"):
        bin_csr(ip, np.array([1.0, np.nan, 2.0]))
    with pytest.raises(ValueError, match="negative"):
        bin_csr(ip, np.array([1.0, -1.0, 2.0], dtype=np.float32))
    with pytest.raises(ValueError, match="inf"):
        bin_csr(ip, np.array([1.0, np.inf, 2.0]))
    with pytest.raises(ValueError, match="indptr"):
        bin_csr(np.array([0, 2]), np.ones(3))
    with pytest.raises(ValueError, match="n_bins"):
        bin_csr(ip, np.ones(3), n_bins=1)


# ------------------------------------------------------------------------ monotone transforms
def _transforms(X: sp.csr_matrix) -> dict[str, np.ndarray]:
    rows = np.repeat(np.arange(X.shape[0]), np.diff(X.indptr))
    total = np.asarray(X.sum(axis=1), dtype=np.float32).ravel()
    scale32 = (np.float32(1) / (total / np.float32(1e4))).astype(np.float32)  # scanpy's row scale
    return {
        "normalize_total+log1p float32": np.log1p(X.data * scale32[rows]),
        "normalize_total+log1p float64": np.log1p(X.data.astype(np.float64) / total[rows] * 1e4),
        "log1p float32": np.log1p(X.data),
    }


@pytest.mark.parametrize("name", [PBMC, KANG])
def test_monotone_transform_invariance(name):
    """Binning raw counts == binning scGPT's log1p-normalised input? Measured, not assumed."""
    X = _real_counts(name, None)  # every cell of the file
    raw = bin_csr(X.indptr, X.data)
    report = {}
    for label, data in _transforms(X).items():
        report[label] = int((bin_csr(X.indptr, data) != raw).sum())
    # scGPT's own (left, right) bounds too, on the first cells
    n_bounds = 0
    t = _transforms(X)["normalize_total+log1p float32"]
    for i in range(N_CELLS):
        lo, hi = X.indptr[i], X.indptr[i + 1]
        l0, r0 = scgpt_digitize_bounds(X.data[lo:hi])
        l1, r1 = scgpt_digitize_bounds(t[lo:hi])
        n_bounds += int(((l0 != l1) | (r0 != r1)).sum())
    print(f"{name}: {X.shape[0]} cells, {X.nnz} entries; bins differing {report}; "
          f"scGPT bounds differing on {N_CELLS} cells: {n_bounds}")
    assert all(v == 0 for v in report.values()) and n_bounds == 0


def test_monotone_transform_can_differ_in_floating_point():
    """The invariance is exact in real arithmetic only: float32 log1p can merge huge counts."""
    c = np.array([1, 1, 2, 3, 5, 8, 5_000_000, 5_000_001, 5_000_003], dtype=np.float32)
    t = np.log1p(c / np.float32(c.sum(dtype=np.float64)) * np.float32(1e4)).astype(np.float32)
    assert np.unique(t).size < np.unique(c).size  # two distinct counts collide
    ip = np.array([0, c.size])
    assert not np.array_equal(bin_csr(ip, c, 11), bin_csr(ip, t, 11))


# ------------------------------------------------------------------------ rank-value encoding
def test_rank_value_encode_hand_example():
    # 3 genes: medians 2, 1, NaN (not in the dictionary); plus gene 3 with median 0 (excluded)
    medians = np.array([2.0, 1.0, np.nan, 0.0, 4.0])
    indptr = np.array([0, 5, 5, 8])
    cols = np.array([0, 1, 2, 3, 4, 4, 0, 1])
    counts = np.array([4, 1, 9, 9, 0, 8, 4, 2], dtype=np.float32)
    n_counts = np.array([100.0, 1.0, 10.0])
    ip, out = rank_value_encode(indptr, cols, counts, n_counts, medians)
    # cell 0: gene0 4/100*1e4/2 = 200, gene1 1/100*1e4/1 = 100; gene4 count 0 dropped
    # cell 2: gene4 8/10*1e4/4 = 2000, gene0 = 2000, gene1 = 2000: a three-way tie -> column order
    np.testing.assert_array_equal(ip, [0, 2, 2, 5])
    np.testing.assert_array_equal(out, [0, 1, 0, 1, 4])
    ip2, out2 = rank_value_encode(indptr, cols, counts, n_counts, medians, max_len=1)
    np.testing.assert_array_equal(ip2, [0, 1, 1, 2])
    np.testing.assert_array_equal(out2, [0, 0])


def test_rank_value_encode_matches_stable_argsort_loop():
    rng = np.random.default_rng(3)
    X = sp.random(40, 300, density=0.2, random_state=4, format="csr", dtype=np.float64)
    X.data = np.ceil(X.data * 4)  # small integer counts: many ties
    medians = rng.choice([0.5, 1.0, 2.0, np.nan, 0.0], size=300)
    n_counts = np.asarray(X.sum(axis=1)).ravel() + 1
    ip, out = rank_value_encode(X.indptr, X.indices, X.data, n_counts, medians, max_len=25)
    for i in range(X.shape[0]):
        row = X[i].toarray().ravel()
        genes = np.flatnonzero(np.isfinite(medians) & (medians > 0))
        v = row[genes] / n_counts[i] * 10_000 / medians[genes]
        genes, v = genes[v != 0], v[v != 0]
        expect = genes[np.argsort(-v, kind="stable")][:25]
        np.testing.assert_array_equal(out[ip[i] : ip[i + 1]], expect)


def test_rank_value_encode_reproduces_geneformer_fixture():
    fixtures = data_dir().parent / "fixtures" / "geneformer_tiny"
    ref_path = fixtures / "reference.npz"
    if not ref_path.is_file():
        pytest.skip(f"Geneformer fixture {ref_path} not found")
    import anndata as ad

    h5ad = data_dir() / "h5ad" / CITESEQ
    if not h5ad.is_file():
        pytest.skip(f"real data file {h5ad} not found")
    ref = np.load(ref_path)
    adata = ad.read_h5ad(h5ad)
    n = ref["input_ids"].shape[0]
    assert list(adata.obs_names[:n]) == list(ref["obs_names"])
    X = sp.csr_matrix(adata.X[:n])
    tokens = json.loads((fixtures / "token_dictionary.json").read_text())
    medians = json.loads((fixtures / "gene_median_dictionary.json").read_text())
    ens = [str(g).split(".")[0] for g in adata.var["gene_ids"]]
    gene_medians = np.array([medians.get(g, np.nan) for g in ens], dtype=np.float64)
    gene_tokens = np.array([tokens.get(g, -1) for g in ens], dtype=np.int64)
    n_counts = np.asarray(X.sum(axis=1), dtype=np.float64).ravel()
    np.testing.assert_array_equal(n_counts, ref["n_counts"])
    ip, cols = rank_value_encode(X.indptr, X.indices, X.data, n_counts, gene_medians, max_len=2048)
    assert np.all(gene_tokens[cols] >= 2)
    n_ties = 0
    for i in range(n):
        expect = ref["input_ids"][i][ref["attention_mask"][i] == 1]
        got = gene_tokens[cols[ip[i] : ip[i + 1]]]
        np.testing.assert_array_equal(got, expect, err_msg=f"cell {i}")
        c = cols[ip[i] : ip[i + 1]]
        row = X[i].toarray().ravel()
        v = row[c] / n_counts[i] * 10_000 / gene_medians[c]
        n_ties += int((v[1:] == v[:-1]).sum())
    print(f"geneformer fixture: {n} cells reproduced exactly; adjacent equal values (ties): {n_ties}")
