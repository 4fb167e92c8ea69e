"""CellTokenizer on cells (real when the shared data is there, else generated stand-ins with the same
layout; see conftest): counts round-trip, conditions, save/load, and every bad input."""
import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from conftest import real_file
from fm.tokenizer import UNKNOWN_CONDITION, CellTokenizer


def test_encode_round_trips_counts(pbmc_small):
    tok = CellTokenizer()
    cells = tok.encode(pbmc_small, source="pbmc")
    match = tok.match_genes(pbmc_small)
    assert match.fraction > 0.85 and match.species == "human"
    x = pbmc_small.X.tocsr()
    for i in (0, 17, 199):
        row = cells[i]
        cols = {g: c for g, c in zip(match.vocab_ids, range(x.shape[1])) if g >= 0}
        expected = {g: x[i, c] for g, c in cols.items() if x[i, c] != 0}
        assert dict(zip(row["gene_ids"].tolist(), row["counts"].tolist())) == pytest.approx(expected)
        assert np.all(np.diff(row["gene_ids"]) > 0), "rows are sorted by vocab id"


def test_many_genes_outside_vocab_still_encode(pbmc_small):
    a = pbmc_small.copy()
    names = a.var_names.to_numpy().copy()
    names[: len(names) // 2] = [f"NOT_A_GENE_{i}" for i in range(len(names) // 2)]
    a.var_names = names
    tok = CellTokenizer(min_matched_fraction=0.2)
    m = tok.match_genes(a)
    assert 0.4 < m.fraction < 0.55
    assert len(tok.encode(a, drop_empty=True)) > 150


def test_conditions_fit_encode_and_unknown(kang_path):
    a = ad.read_h5ad(kang_path)
    tok = CellTokenizer(condition_keys=["sample", "condition"])
    tok.fit_conditions(a.obs)
    assert tok.condition_categories["condition"] == [UNKNOWN_CONDITION, "ctrl", "stim"]
    ids = tok.encode_conditions(a.obs)
    assert ids.shape == (a.n_obs, 2) and ids.min() >= 1
    other = a.obs.copy()
    other["condition"] = "never_seen"
    assert (tok.encode_conditions(other)[:, 1] == 0).all()


def test_save_load_round_trip(tmp_path, batch_h5ad_path):
    a = ad.read_h5ad(batch_h5ad_path)
    tok = CellTokenizer(condition_keys=["sample"], n_bins=21)
    tok.fit_conditions(a.obs)
    tok.save_pretrained(tmp_path)
    back = CellTokenizer.from_pretrained(tmp_path)
    assert back.n_bins == 21 and back.condition_categories == tok.condition_categories
    np.testing.assert_array_equal(back.encode(a[:50]).gene_ids, tok.encode(a[:50]).gene_ids)


# ---------------------------------------------------------------- bad input: clear errors, nothing changed

def test_scaled_not_count_file_is_refused():
    a = ad.read_h5ad(real_file("10x_pbmc68k_reduced.h5ad"))
    with pytest.raises(ValueError, match="negative values.*raw counts"):
        CellTokenizer().encode(a)


def test_normalised_values_refused_unless_allowed(pbmc_small):
    a = pbmc_small.copy()
    a.X = a.X.multiply(1.0 / a.X.sum(1)).tocsr() * 1e4
    with pytest.raises(ValueError, match="non-integer.*allow_non_counts"):
        CellTokenizer().encode(a)
    assert len(CellTokenizer(allow_non_counts=True).encode(a)) == a.n_obs


def test_nan_refused(pbmc_small):
    a = pbmc_small.copy()
    a.X = a.X.tocsr()
    a.X.data[5] = np.nan
    before = a.X.data.copy()
    with pytest.raises(ValueError, match="NaN"):
        CellTokenizer().encode(a)
    np.testing.assert_array_equal(a.X.data, before)  # input untouched


def test_negative_refused(pbmc_small):
    a = pbmc_small.copy()
    a.X.data[3] = -2
    with pytest.raises(ValueError, match="negative"):
        CellTokenizer().encode(a)


def test_all_zero_cells(pbmc_small):
    a = pbmc_small.copy()
    x = a.X.tolil()
    x[[4, 9], :] = 0
    a.X = x.tocsr()
    with pytest.raises(ValueError, match="no counts in vocabulary genes.*filter_cells"):
        CellTokenizer().encode(a)
    assert len(CellTokenizer().encode(a, drop_empty=True)) == a.n_obs - 2


def test_duplicate_gene_names(pbmc_small):
    a = pbmc_small.copy()
    names = a.var_names.to_numpy().copy()
    names[1] = names[0]
    a.var_names = names
    with pytest.raises(ValueError, match="duplicate gene names.*gene_key"):
        CellTokenizer().encode(a)


def test_symbol_and_id_of_same_gene_clash(pbmc_small):
    a = pbmc_small[:, :3].copy()
    tok = CellTokenizer()
    tp53 = tok.vocab.tokens[tok.vocab.lookup(["TP53"])[0]]
    a.var_names = ["TP53", tp53 + ".4", "GAPDH"]
    with pytest.raises(ValueError, match="same vocabulary gene"):
        tok.match_genes(a)


def test_too_few_genes_in_vocab(pbmc_small):
    a = pbmc_small.copy()
    a.var_names = [f"feature_{i}" for i in range(a.n_vars)]
    with pytest.raises(ValueError, match="below the minimum.*gene_key"):
        CellTokenizer().encode(a)


def test_missing_condition_column(pbmc_small):
    with pytest.raises(KeyError, match="'batch'.*missing.*data.conditions"):
        CellTokenizer(condition_keys=["batch"]).encode(pbmc_small)


def test_missing_gene_key(pbmc_small):
    with pytest.raises(KeyError, match="gene_key"):
        CellTokenizer(gene_key="gene_ids").encode(pbmc_small)


def test_gene_key_with_ensembl_ids():
    a = ad.read_h5ad(real_file("citeseq_pbmc1k_10x_scarf.h5ad"))[:100].copy()
    by_symbol = CellTokenizer().match_genes(a)
    by_id = CellTokenizer(gene_key="gene_ids").match_genes(a)
    assert by_id.fraction >= by_symbol.fraction > 0.5


def test_dense_and_backed_inputs_agree(small_h5ad_path, pbmc_small):
    dense = ad.AnnData(pbmc_small.X.toarray(), obs=pbmc_small.obs, var=pbmc_small.var)
    backed = ad.read_h5ad(small_h5ad_path, backed="r")
    tok = CellTokenizer()
    a, b = tok.encode(dense), tok.encode(backed, chunk_size=37)
    c = tok.encode(pbmc_small)
    np.testing.assert_array_equal(a.gene_ids, c.gene_ids)
    np.testing.assert_array_equal(b.gene_ids[: c.indptr[-1]], c.gene_ids)
    np.testing.assert_array_equal(b.counts[: c.indptr[-1]], c.counts)


def test_mouse_file_detected():
    a = ad.read_h5ad(real_file("spatial_starmap_cortex_930c_labeled.h5ad"))
    m = CellTokenizer().match_genes(a)
    assert m.species == "mouse" and m.fraction > 0.8


def test_corrupt_h5ad_named_in_error(tmp_path, small_h5ad_path):
    from fm.data import open_anndata

    bad = tmp_path / "truncated.h5ad"
    bad.write_bytes(small_h5ad_path.read_bytes()[:5000])
    with pytest.raises(ValueError, match="truncated.h5ad.*cannot read"):
        open_anndata(bad)


def test_sparse_formats(pbmc_small):
    a = pbmc_small.copy()
    a.X = sp.csc_matrix(a.X)
    assert len(CellTokenizer().encode(a)) == a.n_obs
    a.obs = pd.DataFrame(index=a.obs_names)
    assert CellTokenizer().encode(a).conditions.shape == (a.n_obs, 0)
