"""scverse conventions on the AnnData functions (fm/scverse.py): layer= / use_raw= / gene_key= / allow_non_counts=
read the input another way for one call, key_added= (key= alias), copy=, views, uns["fm"] provenance."""
from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

import fm
from fm.cli import main

N_CELLS = 120


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return fm.load(tiny_model_dir)


@pytest.fixture(scope="module")
def base(small_h5ad_path):
    """Counts in X (the plain call's input)."""
    a = ad.read_h5ad(small_h5ad_path)[:N_CELLS].copy()
    a.X = sp.csr_matrix(a.X, dtype=np.float32)
    return a


@pytest.fixture(scope="module")
def reference(base, model):
    return fm.embed(base.copy(), model)


def normalised(x) -> sp.csr_matrix:
    """log1p of counts per 1e4: non-integer values, which the count check rejects."""
    x = sp.csr_matrix(x, dtype=np.float32)
    total = np.asarray(x.sum(axis=1)).ravel()
    return sp.csr_matrix(np.log1p(x.multiply(1e4 / np.maximum(total, 1.0)[:, None])), dtype=np.float32)


def snapshot(a: ad.AnnData) -> dict:
    return {"X": a.X.copy(), "layers": {k: v.copy() for k, v in a.layers.items()}, "obs": a.obs.copy(),
            "var": a.var.copy(), "obsm": sorted(a.obsm), "uns": sorted(a.uns), "obs_names": a.obs_names.copy(),
            "var_names": a.var_names.copy(), "raw": None if a.raw is None else a.raw.X.copy()}


def assert_untouched(a: ad.AnnData, before: dict, new_obsm=(), new_uns=()) -> None:
    assert (a.X != before["X"]).nnz == 0, "X untouched"
    assert sorted(a.layers) == sorted(before["layers"])
    for k, v in before["layers"].items():
        assert (a.layers[k] != v).nnz == 0
    assert a.obs.equals(before["obs"]) and a.var.equals(before["var"])
    assert a.obs_names.equals(before["obs_names"]) and a.var_names.equals(before["var_names"])
    assert sorted(set(a.obsm) - set(new_obsm)) == before["obsm"]
    assert sorted(set(a.uns) - set(new_uns)) == before["uns"]
    if before["raw"] is not None:
        assert (a.raw.X != before["raw"]).nnz == 0


def test_layer_reads_counts_from_a_layer(base, model, reference):
    a = base.copy()
    a.layers["counts"] = a.X.copy()
    a.X = normalised(a.X)
    with pytest.raises(ValueError, match="layer='counts'"):  # the message names the argument that fixes it
        fm.embed(a, model)
    before = snapshot(a)
    out = fm.embed(a, model, layer="counts", key_added="X_counts")
    np.testing.assert_array_equal(out, reference)
    assert a.obsm["X_counts"] is out
    assert_untouched(a, before, new_obsm={"X_counts"}, new_uns={"fm"})
    assert model.cell_tokenizer.layer is None and not model.cell_tokenizer.use_raw, "model's tokenizer unchanged"


def test_use_raw_reads_counts_and_genes_from_raw(base, model, reference):
    a = base.copy()
    a.raw = a  # counts with every gene
    a.X = normalised(a.X)
    a = a[:, a.var_names[: a.n_vars // 2]].copy()  # X keeps half the genes: only .raw has them all
    before = snapshot(a)
    np.testing.assert_array_equal(fm.embed(a, model, use_raw=True), reference)
    assert_untouched(a, before, new_obsm={"X_fm"}, new_uns={"fm"})
    assert a.uns["fm"]["X_fm"]["settings"]["use_raw"] is True


def test_gene_key_matches_a_var_column(base, model, reference):
    a = base.copy()
    a.var["gene_ids"] = a.var_names.to_numpy()
    a.var_names = [f"junk{i}" for i in range(a.n_vars)]
    with pytest.raises(ValueError, match="gene_key"):
        fm.embed(a, model)
    before = snapshot(a)
    np.testing.assert_array_equal(fm.embed(a, model, gene_key="gene_ids"), reference)
    assert_untouched(a, before, new_obsm={"X_fm"}, new_uns={"fm"})
    assert model.cell_tokenizer.gene_key is None


def test_allow_non_counts_keyword(base, model):
    a = base.copy()
    a.X = normalised(a.X)
    out = fm.embed(a, model, allow_non_counts=True)
    assert np.isfinite(out).all() and not model.cell_tokenizer.allow_non_counts


def test_copy_returns_a_modified_copy(base, model, reference):
    a = base.copy()
    before = snapshot(a)
    result = fm.embed(a, model, copy=True)
    assert isinstance(result, ad.AnnData) and result is not a
    np.testing.assert_array_equal(result.obsm["X_fm"], reference)
    assert "X_fm" not in a.obsm and "fm" not in a.uns
    assert_untouched(a, before)
    assert_untouched(result, before, new_obsm={"X_fm"}, new_uns={"fm"})


def test_view_is_an_error_unless_copy(base, model, reference):
    view = base[:40]
    assert view.is_view
    with pytest.raises(ValueError, match=r"view.*copy\(\).*copy=True"):
        fm.embed(view, model)
    assert "X_fm" not in base.obsm
    result = fm.embed(view, model, copy=True)
    assert not result.is_view and result.n_obs == 40
    np.testing.assert_allclose(result.obsm["X_fm"], reference[:40], rtol=1e-5, atol=1e-6)


def test_provenance_and_key_alias(base, model, tiny_model_dir, tmp_path):
    a = base.copy()
    fm.embed(a, model, key="X_alias", batch_size=16)
    entry = a.uns["fm"]["X_alias"]
    assert entry["model"] == str(tiny_model_dir) and entry["function"] == "fm.embed"
    assert entry["scfm_version"] == fm.__version__ and len(entry["model_sha256"]) == 64
    assert entry["settings"]["batch_size"] == 16 and "layer" not in entry["settings"]  # None settings left out
    fm.embed(a, model, key_added="X_other")
    assert set(a.uns["fm"]) == {"X_alias", "X_other"}, "one entry per output key"
    a.write_h5ad(tmp_path / "out.h5ad")  # provenance is h5ad-writable
    assert ad.read_h5ad(tmp_path / "out.h5ad").uns["fm"]["X_alias"]["model_sha256"] == entry["model_sha256"]
    with pytest.raises(ValueError, match="key_added"):
        fm.embed(a, model, key="a", key_added="b")


def test_missing_inputs_name_what_exists(base, model):
    a = base.copy()
    a.layers["spliced"] = a.X
    with pytest.raises(KeyError, match="'spliced'"):
        fm.embed(a, model, layer="counts")
    with pytest.raises(ValueError, match="adata.raw is None"):
        fm.embed(a, model, use_raw=True)
    with pytest.raises(KeyError, match="gene_key"):
        fm.embed(a, model, gene_key="symbol")
    with pytest.raises(ValueError, match="not both"):
        fm.embed(a, model, layer="spliced", use_raw=True)


def test_integrate_takes_the_same_arguments(base, model, reference):
    a = base.copy()
    a.layers["counts"] = a.X.copy()
    a.X = normalised(a.X)
    result = fm.integrate(a, model, layer="counts", key_added="X_int", copy=True)  # plain model: zero-shot embedding
    np.testing.assert_array_equal(result.obsm["X_int"], reference)
    assert "X_int" not in a.obsm and result.uns["fm"]["X_int"]["function"] == "fm.integrate"


def test_cli_embed_layer(base, tiny_model_dir, reference, tmp_path):
    a = base.copy()
    a.layers["counts"] = a.X.copy()
    a.X = normalised(a.X)
    a.write_h5ad(tmp_path / "in.h5ad")
    assert main(["embed", "--model", str(tiny_model_dir), "--input", str(tmp_path / "in.h5ad"),
                 "--output", str(tmp_path / "out.h5ad"), "--layer", "counts", "--key-added", "X_cli"]) == 0
    out = ad.read_h5ad(tmp_path / "out.h5ad")
    np.testing.assert_array_equal(out.obsm["X_cli"], reference)
    assert out.uns["fm"]["X_cli"]["settings"]["layer"] == "counts"


@pytest.fixture(scope="module")
def annotation_model(tiny_model_dir, small_h5ad_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("annotation_args")
    assert main(["finetune", "finetune/annotation", f"model.init_from={tiny_model_dir}",
                 f"train.output_dir={out}", f"data.paths=[{small_h5ad_path}]", "train.max_steps=2",
                 "train.batch_size=16", "train.progress=false", "train.save_every=0", "train.eval_every=0",
                 "train.warmup_steps=1", "data.max_genes=64"]) == 0
    return fm.load(out / "model")


def test_annotate_with_layer_gene_key_and_copy(base, annotation_model):
    plain = base.copy()
    labels = fm.annotate(plain, annotation_model, threshold=0.0)
    a = base.copy()
    a.layers["counts"] = a.X.copy()
    a.X = normalised(a.X)
    a.var["gene_ids"] = a.var_names.to_numpy()
    a.var_names = [f"junk{i}" for i in range(a.n_vars)]
    before = snapshot(a)
    result = fm.annotate(a, annotation_model, threshold=0.0, layer="counts", gene_key="gene_ids", key_added="ct",
                         copy=True)
    assert_untouched(a, before)
    np.testing.assert_array_equal(result.obs["ct"].to_numpy(), labels)
    np.testing.assert_array_equal(result.obsm["ct_probabilities"], plain.obsm["fm_cell_type_probabilities"])
    entry = result.uns["fm"]["ct"]
    assert entry["function"] == "fm.annotate" and entry["settings"] == {"layer": "counts", "use_raw": False,
                                                                        "gene_key": "gene_ids", "threshold": 0.0}
