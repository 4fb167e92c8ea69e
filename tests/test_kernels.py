"""The compiled collator kernels (fm._kernels, numba) give exactly the numpy path's output."""
import anndata as ad
import numpy as np
import pytest
import torch

pytest.importorskip("numba")

from fm import _kernels  # noqa: E402
from fm.binning import _bin_csr_numpy, bin_csr, compiled_kernels  # noqa: E402
from fm.data.collator import CellCollator, LabeledCellCollator  # noqa: E402
from fm.tokenizer import CellTokenizer  # noqa: E402

from conftest import is_real  # noqa: E402


@pytest.fixture()
def force(monkeypatch):
    """force(True / False): the compiled path on / off for the calls that follow."""
    def set_(on: bool):
        monkeypatch.setattr(_kernels, "ENABLED", on)
    return set_


@pytest.fixture(scope="module")
def real_cells(small_h5ad_path, batch_h5ad_path, citeseq_h5ad_path):
    """Rows of pbmc3k, Kang and CITE-seq (36k genes: long cells that fill max_genes), 300 cells each."""
    out = {}
    for name, path in (("pbmc3k", small_h5ad_path), ("kang", batch_h5ad_path), ("citeseq", citeseq_h5ad_path)):
        tok = CellTokenizer(gene_key="gene_ids") if name == "citeseq" and is_real(path) else CellTokenizer()
        cells = tok.encode(ad.read_h5ad(path)[:300].copy())
        out[name] = [cells[i] for i in range(len(cells))]
    return out


def _both(force, fn):
    force(False)
    a = fn()
    force(True)
    b = fn()
    return a, b


def test_switch(monkeypatch):
    monkeypatch.setattr(_kernels, "ENABLED", None)
    monkeypatch.setenv("FM_COLLATOR", "numpy")
    assert compiled_kernels() is None
    monkeypatch.delenv("FM_COLLATOR")
    assert compiled_kernels() is _kernels


def test_bin_csr_compiled_equals_numpy_on_real_cells(real_cells, force):
    for rows in real_cells.values():
        indptr = np.concatenate([[0], np.cumsum([len(r["counts"]) for r in rows])])
        counts = np.concatenate([r["counts"] for r in rows]).astype(np.float32)
        numpy_bins, compiled = _both(force, lambda: bin_csr(indptr, counts))
        np.testing.assert_array_equal(numpy_bins, _bin_csr_numpy(indptr, counts))
        np.testing.assert_array_equal(compiled, numpy_bins)
        # log1p-normalised values (no integer histogram), odd bin counts
        lognorm = np.log1p(counts * np.float32(1.7)).astype(np.float32)
        for n_bins in (2, 3, 51, 101):
            a, b = _both(force, lambda: bin_csr(indptr, lognorm, n_bins))
            np.testing.assert_array_equal(a, b)


def test_bin_csr_compiled_edge_cases(force):
    rng = np.random.default_rng(0)
    rows = [np.zeros(5), np.array([3.0]), np.array([0.0, -0.0, 2.0, 0.0]), np.array([1e9, 1e9, 1.0, 2048.0, 0.5]),
            rng.integers(0, 5000, 800).astype(float), rng.gamma(0.3, 50, 3000).round(), np.ones(7), np.zeros(0),
            rng.random(60) * 1e-30]
    indptr = np.concatenate([[0], np.cumsum([len(r) for r in rows])])
    values = np.concatenate(rows).astype(np.float32)
    a, b = _both(force, lambda: bin_csr(indptr, values, 51))
    np.testing.assert_array_equal(a, b)
    for bad in (np.nan, np.inf, -1.0):
        v = values.copy()
        v[7] = bad
        with pytest.raises(ValueError):
            bin_csr(indptr, v, 51)  # the compiled path hands invalid values to the numpy checks


def _assert_same(a: dict, b: dict):
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert torch.equal(a[key], b[key]), key


OPTIONS = [
    dict(),
    dict(max_genes=64),  # every long cell sampled
    dict(seed=3, epoch=2, mask_ratio=0.15),
    dict(zero_fraction=0.25, seed=1),
    dict(zero_fraction=0.1, max_genes=300, seed=9, epoch=1),
    dict(train=False),
    dict(train=False, max_genes=64),
    dict(train=False, zero_fraction=0.25),
    dict(views=2, view_keep=0.6, view_thinning=0.3, seed=4),
    dict(views=3, max_genes=128, decode_genes=40, zero_fraction=0.2, seed=5),
    dict(decode_genes=32, seed=6),
    dict(value_encoding="continuous", max_genes=100),
    dict(value_encoding="rank", max_genes=100, train=False),
    dict(value_encoding="bin_values", max_genes=100),
    dict(n_bins=11, pad_to_multiple_of=1, pad_token_id=3),
]


@pytest.mark.parametrize("options", OPTIONS, ids=[",".join(f"{k}={v}" for k, v in o.items()) or "default"
                                                  for o in OPTIONS])
def test_collator_compiled_equals_numpy(real_cells, force, options):
    col = CellCollator(**{"max_genes": 1200, **options})
    for rows in real_cells.values():
        for start in (0, 37, 150):
            batch = rows[start:start + 32]
            _assert_same(*_both(force, lambda: col(batch)))
        _assert_same(*_both(force, lambda: col(rows[5:6])))  # a batch of one cell


def test_labeled_and_geneformer_collators(real_cells, force):
    rows = [{**r, "label": i % 3} for i, r in enumerate(real_cells["pbmc3k"][:40])]
    for col in (LabeledCellCollator(max_genes=100, zero_fraction=0.2),
                LabeledCellCollator(max_genes=100, train=True, targets={"label": "y"})):
        _assert_same(*_both(force, lambda: col(rows)))
    medians = np.random.default_rng(0).random(200_000) + 0.1
    col = CellCollator(max_genes=100, value_encoding="geneformer", gene_medians=medians)  # numpy path both times
    _assert_same(*_both(force, lambda: col(rows)))


def test_inference_nan_count_falls_back(real_cells, force):
    row = dict(real_cells["pbmc3k"][0])
    row["counts"] = row["counts"].copy()
    row["counts"][0] = np.nan
    col = CellCollator(max_genes=50, train=False, value_encoding="continuous")
    _assert_same(*_both(force, lambda: col([row])))


def test_smallest_with_ties_matches_lexsort():
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 100, 2245):
        for k in {1, n // 2 + 1, n}:
            keys = rng.integers(0, 2**53, n).astype(np.uint64)
            keys[rng.integers(0, n, n // 3)] = keys[rng.integers(0, n, n // 3)]  # ties
            keys[: n // 4] &= np.uint64(0xFFF)  # crowded low buckets
            out, count, perm, sk = (np.empty(n, np.int64), np.empty(2 * n + 2, np.int64), np.empty(n, np.int64),
                                    np.empty(n, np.uint64))
            _kernels._smallest(keys, n, k, out, count, perm, sk)
            np.testing.assert_array_equal(out[:k], np.lexsort((np.arange(n), keys))[:k])


def test_mask_row_threshold_with_ties_matches_token_order():
    """fill_batch_binned's masking (a threshold, not a sort) takes the numpy path's set: the n_mask smallest keys,
    equal keys by token order (expressed genes by row position, then zero genes), also where ties straddle it."""
    rng = np.random.default_rng(1)
    for t in (1, 2, 5, 64, 1200, 1700):
        for trial in range(6):
            ke = t if trial % 2 else int(rng.integers(0, t + 1))
            n = ke + int(rng.integers(0, 50))
            sel = np.sort(rng.choice(n, ke, replace=False)) if trial % 3 == 0 else rng.choice(n, ke, replace=False)
            sel = np.concatenate([sel, np.zeros(t - ke, np.int64)]).astype(np.int64)
            keys = rng.integers(0, 2**53, t).astype(np.uint64)
            if trial >= 2:  # many ties, some at the threshold
                keys = rng.integers(0, 2**53, max(t // 7, 1)).astype(np.uint64)[rng.integers(0, max(t // 7, 1), t)]
            if trial >= 4:
                keys &= np.uint64(0xFFFF)  # crowded low buckets
            for n_mask in {1, t // 3 + 1, t - 1, t, t + 5}:
                masked, values = np.zeros(t, bool), np.arange(t, dtype=np.int64)
                count, tmp = np.empty(2 * t + 2, np.int64), np.empty(t, np.uint64)
                _kernels._mask_row(keys, t, n_mask, sel, ke, n, count, tmp, masked, values, -7)
                token_rank = np.where(np.arange(t) < ke, sel, n + np.arange(t))
                want = np.zeros(t, bool)
                want[np.lexsort((token_rank, keys))[:min(n_mask, t)]] = True
                np.testing.assert_array_equal(masked, want)
                np.testing.assert_array_equal(values, np.where(want, -7, np.arange(t)))


PARALLEL_OPTIONS = [
    dict(),
    dict(max_genes=64, seed=2),
    dict(zero_fraction=0.1, max_genes=300, seed=9, epoch=1),
    dict(train=False),
    dict(train=False, zero_fraction=0.25, max_genes=64),
    dict(value_encoding="bin_values", max_genes=100, mask_ratio=0.9),
    dict(views=2, view_keep=0.6, view_thinning=0.3, seed=4),
]


@pytest.mark.parametrize("options", PARALLEL_OPTIONS, ids=[",".join(f"{k}={v}" for k, v in o.items()) or "default"
                                                           for o in PARALLEL_OPTIONS])
def test_parallel_kernel_equals_serial_and_numpy(real_cells, force, monkeypatch, options):
    """fill_batch_binned_parallel (cells over threads, FM_COLLATOR_THREADS > 1) gives the serial kernel's and the
    numpy path's tensors bit for bit, with 2 threads and with more chunks than threads (uneven round-robin)."""
    col = CellCollator(**{"max_genes": 1200, **options})
    for rows in real_cells.values():
        for batch in (rows[0:32], rows[37:69], rows[150:157], rows[5:6]):
            force(False)
            want = col(batch)
            force(True)
            monkeypatch.setattr(_kernels, "collator_threads", lambda: 1)
            _assert_same(want, col(batch))
            for threads in (2, 3, 5):
                monkeypatch.setattr(_kernels, "collator_threads", lambda threads=threads: threads)
                _assert_same(want, col(batch))


def test_parallel_kernel_status_is_the_serial_one(real_cells, monkeypatch):
    """A NaN count: the parallel kernel reports the serial kernel's status (the caller then falls back)."""
    col = CellCollator(max_genes=50, train=False)
    rows = [dict(r) for r in real_cells["kang"][:9]]
    rows[4]["counts"] = rows[4]["counts"].copy()
    rows[4]["counts"][0] = np.nan
    monkeypatch.setattr(_kernels, "ENABLED", True)
    calls = []
    real = _kernels.fill_batch_binned_parallel

    def spy(*args):
        calls.append(real(*args))
        return calls[-1]

    monkeypatch.setattr(_kernels, "fill_batch_binned_parallel", spy)
    monkeypatch.setattr(_kernels, "collator_threads", lambda: 3)
    with pytest.raises(ValueError):
        col(rows)  # the numpy path's check raises, as without threads
    assert calls == [2]


def test_collator_threads_setting(monkeypatch):
    monkeypatch.setattr(_kernels, "THREADS", None)
    import numba
    monkeypatch.delenv("FM_COLLATOR_THREADS", raising=False)
    assert _kernels.collator_threads() == min(2, numba.config.NUMBA_NUM_THREADS)
    monkeypatch.setenv("FM_COLLATOR_THREADS", "1")
    assert _kernels.collator_threads() == 1
    monkeypatch.setenv("FM_COLLATOR_THREADS", "junk")
    assert _kernels.collator_threads() == 1
    monkeypatch.setattr(_kernels, "THREADS", 64)
    assert _kernels.collator_threads() == numba.config.NUMBA_NUM_THREADS


def _threads_in_child(q):
    q.put(_kernels.collator_threads())


def test_collator_threads_is_one_in_a_forked_worker(real_cells):
    """After the parent ran the parallel kernel, a forked child (a DataLoader worker) runs the serial one."""
    import multiprocessing as mp
    col = CellCollator(max_genes=1200)
    col(real_cells["citeseq"][:8])
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_threads_in_child, args=(q,))
    p.start()
    assert q.get(timeout=60) == 1
    p.join(60)
    assert p.exitcode == 0
