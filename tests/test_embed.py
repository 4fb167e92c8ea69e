"""Zero-shot embedding: deterministic, save→load identical, streams backed files, CLI, bad input."""
import anndata as ad
import numpy as np
import pytest

import fm
from fm.cli import main


def test_embed_writes_obsm_and_is_deterministic(tiny_model_dir, pbmc_small):
    model = fm.load(tiny_model_dir)
    x_before = pbmc_small.X.copy()
    first = fm.embed(pbmc_small, model, batch_size=32)
    assert pbmc_small.obsm["X_fm"] is first
    assert first.shape == (pbmc_small.n_obs, model.config.d_model) and first.dtype == np.float32
    assert np.isfinite(first).all()
    np.testing.assert_array_equal(fm.embed(pbmc_small, model, batch_size=32), first)
    assert (pbmc_small.X != x_before).nnz == 0, "X untouched"


def test_save_load_embed_identical(tiny_model_dir, pbmc_small, tmp_path):
    model = fm.load(tiny_model_dir)
    reference = fm.embed(pbmc_small, model)
    model.save_pretrained(tmp_path)
    model.cell_tokenizer.save_pretrained(tmp_path)
    np.testing.assert_array_equal(fm.embed(pbmc_small.copy(), fm.load(tmp_path)), reference)


def test_backed_streaming_matches_in_memory(tiny_model_dir, small_h5ad_path):
    model = fm.load(tiny_model_dir)
    backed = ad.read_h5ad(small_h5ad_path, backed="r")
    streamed = fm.embed(backed, model, batch_size=50, chunk_size=300)
    in_memory = fm.embed(ad.read_h5ad(small_h5ad_path), model, batch_size=50)
    np.testing.assert_allclose(streamed, in_memory, rtol=1e-5, atol=1e-6)


def test_embed_with_many_genes_outside_vocab(tiny_model_dir, pbmc_small):
    a = pbmc_small.copy()
    names = a.var_names.to_numpy().copy()
    names[::2] = [f"UNKNOWN{i}" for i in range(len(names[::2]))]
    a.var_names = names
    out = fm.embed(a, fm.load(tiny_model_dir), drop_empty=True)
    assert out.shape[0] == a.n_obs


def test_missing_condition_leaves_adata_untouched(tmp_path, batch_h5ad_path, pbmc_small):
    from conftest import tiny_overrides
    from fm.config import load_config
    from fm.paths import recipe_path
    from fm.pretrain import run_pretraining

    cfg = load_config(recipe_path("debug"), tiny_overrides(tmp_path, [batch_h5ad_path], 2) + ["data.conditions=[sample]"])
    model = fm.load(run_pretraining(cfg).export_dir)
    with pytest.raises(KeyError, match="'sample'"):
        fm.embed(pbmc_small, model)
    assert "X_fm" not in pbmc_small.obsm


def test_cli_embed(tiny_model_dir, pbmc_small, tmp_path, capsys):
    src = tmp_path / "in.h5ad"
    pbmc_small.write_h5ad(src)
    out = tmp_path / "out.h5ad"
    assert main(["embed", "--model", str(tiny_model_dir), "--input", str(src), "--output", str(out)]) == 0
    written = ad.read_h5ad(out)
    np.testing.assert_array_equal(written.obsm["X_fm"], fm.embed(pbmc_small, fm.load(tiny_model_dir)))
    # a failing run (bad model dir) reports and leaves the earlier output as it was
    assert main(["embed", "--model", str(tmp_path), "--input", str(src), "--output", str(out)]) == 2
    assert "config.json" in capsys.readouterr().err
    assert ad.read_h5ad(out).obsm["X_fm"].shape == written.obsm["X_fm"].shape
