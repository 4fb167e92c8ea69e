"""Modality prediction, RNA → protein (issue #6): ScFMForModalityPrediction, CLR targets shared with
the benchmark, `fm finetune` of the shipped recipe on its CITE-seq file (the real one when the shared
data is there, else conftest's generated cells with obsm['protein_counts']), fm.predict_protein, bad
protein input, and the harness's fm_finetune row on the ci profile (real data only)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
import transformers

from conftest import SYNTHETIC_PROTEINS, is_real, real_file

import fm
from fm.cli import main
from fm.config import load_config
from fm.data import LabeledCellCollator
from fm.heads.modality_prediction import ScFMForModalityPrediction
from fm.paths import recipe_path
from fm.tasks.modality_prediction import clr, load_protein_cells, read_proteins, run as run_modality
from fm.tokenizer import CellTokenizer

RECIPE = "finetune/modality_prediction"
NAMES = ["CD3", "CD14", "CD19"]
# the panel the recipe's file exports (targets, isotype controls): the real 10x PBMC 1k file, the stand-in
REAL_PANEL = (["CD3", "CD4-1", "CD8", "CD11c", "CD14-1", "CD16", "CD19-1", "CD56", "CD45"], ["IgG1_control_TotalSeqC"])
SYNTHETIC_PANEL = ([n for n in SYNTHETIC_PROTEINS if "IgG" not in n], [n for n in SYNTHETIC_PROTEINS if "IgG" in n])
PBMC_MARKERS = (["CD4 T", "CD8 T"], ["CD14 Mono", "FCGR3A Mono"], ["B"])


def _head(tiny_model_dir, **fields):
    """The head on the tiny backbone; task fields go through the config (unknown from_pretrained kwargs
    would reach __init__)."""
    torch.manual_seed(0)
    config = transformers.AutoConfig.from_pretrained(tiny_model_dir)
    config.update({"protein_names": NAMES, **fields})
    return ScFMForModalityPrediction.from_pretrained(tiny_model_dir, config=config, output_loading_info=True)


def _batch(tiny_model_dir, adata, targets):
    config = transformers.AutoConfig.from_pretrained(tiny_model_dir)
    cells = CellTokenizer.from_pretrained(tiny_model_dir).encode(adata)
    collator = LabeledCellCollator(n_bins=config.n_bins, max_genes=config.max_genes, pad_token_id=config.pad_token_id,
                                   zero_fraction=config.zero_fraction, targets={"protein": "labels"})
    return collator([dict(cells[i], protein=targets[i]) for i in range(len(cells))])


def _type_targets(adata) -> np.ndarray:
    """A learnable stand-in for CLR protein levels: 3 'markers' set by each cell's PBMC type."""
    types = adata.obs["cell_type"].astype(str).to_numpy()
    marks = [np.isin(types, group) for group in PBMC_MARKERS]
    return np.stack(marks, axis=1).astype(np.float64) * 2.0 - 0.5


def test_head_shapes_standardised_loss(tiny_model_dir, pbmc_small):
    model, info = _head(tiny_model_dir, protein_mean=[1.0, 0.0, -1.0], protein_std=[2.0, 1.0, 0.5])
    assert sorted(info["missing_keys"]) == sorted(f"protein_head.{n}" for n in
                                                  ("dense.weight", "dense.bias", "out.weight", "out.bias"))
    assert not info["unexpected_keys"]
    batch = _batch(tiny_model_dir, pbmc_small[:16], _type_targets(pbmc_small[:16]))
    assert batch["labels"].dtype == torch.float32 and batch["labels"].shape == (16, 3)
    model.eval()
    out = model(**batch)
    assert out.predictions.shape == (16, 3) and out.cell_embedding.shape == (16, model.config.d_model)
    mean, std = torch.tensor([1.0, 0.0, -1.0]), torch.tensor([2.0, 1.0, 0.5])
    z = (out.predictions - mean) / std  # the loss lives on the standardised scale, predictions on CLR's
    torch.testing.assert_close(out.loss, torch.nn.functional.mse_loss(z, (batch["labels"] - mean) / std))
    assert float(model(**{**batch, "labels": out.predictions}).loss.detach()) < 1e-10
    with pytest.raises(ValueError, match="protein_names"):
        ScFMForModalityPrediction.from_pretrained(tiny_model_dir)


def test_loss_goes_down(tiny_model_dir, pbmc_path, pbmc_small):
    """On PBMC's own cell types (real data only: PBMC_MARKERS names them, and the threshold was set on
    them; the generated stand-in's types are not PBMC's)."""
    model, _ = _head(tiny_model_dir)
    batch = _batch(tiny_model_dir, pbmc_small[:48], _type_targets(pbmc_small[:48]))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0], losses


def test_clr_is_the_benchmarks_and_keeps_controls_in_the_mean():
    pytest.importorskip("sklearn")
    from fm.eval.tasks import modality_prediction as modality

    assert modality.clr is clr and modality.CONTROL_RE.pattern == "igg|isotype|control"
    a = ad.AnnData(np.ones((2, 3), dtype=np.float32))
    a.obsm["adt"] = pd.DataFrame([[9.0, 99.0, 0.0], [0.0, 0.0, 0.0]], index=a.obs_names, columns=["CD3", "CD4", "IgG1"])
    counts, names = read_proteins(a, "adt", "x")
    expected = np.log1p(np.array([9.0, 99.0]) / np.exp(np.log1p([9.0, 99.0, 0.0]).mean()))  # IgG1 in the mean
    np.testing.assert_allclose(clr(counts)[0, :2], expected)
    np.testing.assert_array_equal(clr(counts)[1], 0.0)  # all-zero cell: defined, every protein 0


# ----------------------------------------------------------------------------- fm finetune + predict
@pytest.fixture(scope="module")
def finetuned(tiny_model_dir, citeseq_h5ad_path, tmp_path_factory):
    """`fm finetune` of the shipped recipe on citeseq_h5ad_path (the recipe's own file when present) for a
    few steps."""
    out = tmp_path_factory.mktemp("protein")
    code = main(["finetune", RECIPE, f"model.init_from={tiny_model_dir}", f"train.output_dir={out}",
                 f"data.paths=[{citeseq_h5ad_path}]",
                 "train.max_steps=6", "train.batch_size=16", "train.progress=false", "train.save_every=0",
                 "train.eval_every=0", "train.warmup_steps=1", "data.max_genes=64"])
    assert code == 0
    return out / "model"


@pytest.fixture()
def citeseq_small(citeseq_h5ad_path):
    return ad.read_h5ad(citeseq_h5ad_path)[:120].copy()


def test_finetune_exports_proteins(finetuned, tiny_model_dir, citeseq_h5ad_path):
    config = json.loads((finetuned / "config.json").read_text())
    names, controls = REAL_PANEL if is_real(citeseq_h5ad_path) else SYNTHETIC_PANEL
    assert config["architectures"] == ["ScFMForModalityPrediction"]
    assert config["protein_names"] == names
    assert config["isotype_controls"] == controls and config["protein_key"] == "protein_counts"
    assert len(config["protein_mean"]) == len(config["protein_std"]) == len(names) and min(config["protein_std"]) > 0
    assert isinstance(fm.load(finetuned), ScFMForModalityPrediction)
    backbone, info = transformers.AutoModel.from_pretrained(finetuned, output_loading_info=True)
    assert type(backbone).__name__ == "ScFMModel" and not info["missing_keys"] and not info["unexpected_keys"]


def test_predict_protein_fields_deterministic_x_untouched(finetuned, citeseq_small, tmp_path, tiny_model_dir):
    model = fm.load(finetuned)
    x_before = citeseq_small.X.copy()
    frame = fm.predict_protein(citeseq_small, model, batch_size=32)
    stored = citeseq_small.obsm["fm_protein"]
    assert stored is frame and list(frame.columns) == list(model.config.protein_names)
    assert frame.index.equals(citeseq_small.obs_names) and (frame.dtypes == np.float32).all()
    assert np.isfinite(frame.to_numpy()).all() and frame.to_numpy().std(axis=0).min() > 0
    assert (citeseq_small.X != x_before).nnz == 0, "X untouched"
    again = citeseq_small.copy()
    fm.predict_protein(again, model, batch_size=7, key="prot")  # other batching: same up to float noise
    np.testing.assert_allclose(again.obsm["prot"].to_numpy(), frame.to_numpy(), rtol=1e-5, atol=1e-5)
    citeseq_small.write_h5ad(tmp_path / "p.h5ad")  # names travel with the values
    assert list(ad.read_h5ad(tmp_path / "p.h5ad").obsm["fm_protein"].columns) == list(frame.columns)
    with pytest.raises(ValueError, match="protein head"):
        fm.predict_protein(citeseq_small, fm.load(tiny_model_dir))


def test_save_load_same_predictions(finetuned, citeseq_small, tmp_path):
    model = fm.load(finetuned)
    reference = fm.predict_protein(citeseq_small, model).to_numpy()
    model.save_pretrained(tmp_path)
    model.cell_tokenizer.save_pretrained(tmp_path)
    np.testing.assert_array_equal(fm.predict_protein(citeseq_small.copy(), fm.load(tmp_path)).to_numpy(), reference)


# ----------------------------------------------------------------------------- bad protein input
def _with_proteins(adata, table) -> ad.AnnData:
    a = adata.copy()
    a.obsm["protein_counts"] = table
    return a


def _counts(n, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).poisson(20, size=(n, 3)).astype(np.float64)


def test_missing_protein_key_names_key_obsm_and_setting(tiny_model_dir, pbmc_small, tmp_path):
    path = tmp_path / "rna_only.h5ad"
    pbmc_small.write_h5ad(path)
    cfg = load_config(recipe_path(RECIPE), [f"model.init_from={tiny_model_dir}", f"data.paths=[{path}]",
                                            f"train.output_dir={tmp_path / 'run'}"])
    with pytest.raises(KeyError, match=r"rna_only\.h5ad: obsm has no 'protein_counts'.*obsm keys: \[.*task\.protein_key"):
        run_modality(cfg)
    assert main(["finetune", RECIPE, f"model.init_from={tiny_model_dir}", f"data.paths=[{path}]",
                 f"train.output_dir={tmp_path / 'run'}"]) == 2


def test_bare_array_gets_names_with_a_warning(pbmc_small, caplog):
    a = _with_proteins(pbmc_small, _counts(pbmc_small.n_obs))
    with caplog.at_level(logging.WARNING, logger="fm"):
        assert read_proteins(a, "protein_counts", "x")[1] == ["protein_0", "protein_1", "protein_2"]
    assert "without protein names" in caplog.text and "isotype controls cannot be recognised" in caplog.text
    a.uns["protein_names"] = ["CD3", "CD4", "IgG2a_isotype"]
    assert read_proteins(a, "protein_counts", "x")[1] == ["CD3", "CD4", "IgG2a_isotype"]


@pytest.mark.parametrize("bad, match", [(np.nan, "1 cells with NaN"), (-1.0, "negative values")])
def test_nan_and_negative_counts_are_errors(pbmc_small, bad, match):
    counts = _counts(pbmc_small.n_obs)
    counts[3, 1] = bad
    with pytest.raises(ValueError, match=match):
        read_proteins(_with_proteins(pbmc_small, counts), "protein_counts", "x")


def test_all_zero_cells_are_left_out_and_panels_must_match(tiny_model_dir, pbmc_small, caplog):
    tokenizer = CellTokenizer.from_pretrained(tiny_model_dir)
    counts = _counts(pbmc_small.n_obs)
    counts[:4] = 0.0
    frame = pd.DataFrame(counts, index=pbmc_small.obs_names, columns=["CD3", "CD4", "IgG1"])
    a = _with_proteins(pbmc_small[:100], frame.iloc[:100])
    b = _with_proteins(pbmc_small[100:], frame.iloc[100:, [2, 0, 1]])  # same panel, other column order
    with caplog.at_level(logging.WARNING, logger="fm"):
        data, names, controls = load_protein_cells([(a, "a"), (b, "b")], tokenizer, "protein_counts")
    assert "4 of 200 cells have no protein counts" in caplog.text
    assert len(data) == 196 and names == ["CD3", "CD4"] and controls == ["IgG1"]
    np.testing.assert_allclose(data.targets["protein"], clr(counts[4:])[:, :2], rtol=1e-6)
    other = _with_proteins(pbmc_small[100:], frame.iloc[100:].rename(columns={"CD4": "CD8"}))
    with pytest.raises(ValueError, match="differ from the first file"):
        load_protein_cells([(a, "a"), (other, "b")], tokenizer, "protein_counts")
    with pytest.raises(ValueError, match="every cell has zero counts"):
        load_protein_cells([(_with_proteins(pbmc_small, frame * 0), "z")], tokenizer, "protein_counts")


# ----------------------------------------------------------------------------- benchmark row
def test_harness_fm_finetune_ci_profile(tiny_model_dir, tmp_path, monkeypatch):
    """The ci profile with a model: fm_finetune fine-tunes on the train split's cells only (their
    proteins named), predicts the test cells from RNA alone, and gets a row."""
    pytest.importorskip("scanpy")
    real_file("pbmc_10k_protein_v3.h5ad")
    from fm.eval.harness import run_suite

    seen = []
    real_finetune = fm.finetune
    monkeypatch.setattr(fm, "finetune", lambda model, adata, **kw: seen.append(adata) or real_finetune(model, adata, **kw))
    df = run_suite(Path(__file__).resolve().parents[1] / "eval" / "modality_prediction.yaml", profile="ci",
                   models=[tiny_model_dir], output_dir=tmp_path, write=False)
    main_metric = df[df.metric == "pearson_protein"].set_index("method")["value"]
    label = f"fm_finetune[{tiny_model_dir.parent.name}]"
    assert label in main_metric.index and np.isfinite(main_metric[label]), main_metric.to_dict()
    split = np.load(tmp_path / "splits" / "pbmc10k_protein_200c_seed0.npz")
    assert len(seen) == 2  # the checkpoint and its random-init twin (fm_finetune[…:scratch]), same cells
    for adata in seen:
        np.testing.assert_array_equal(adata.obs_names, split["obs_names"][split["train"]])
        assert list(adata.obsm["protein_counts"].columns)[:2] == ["CD3_TotalSeqB", "CD4_TotalSeqB"]
