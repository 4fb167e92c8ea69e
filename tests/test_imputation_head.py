"""Imputation / denoising (issue #6): ScFMForImputation, the held-out-gene collator,
`fm finetune` of the recipe, fm.impute, bad input, and the harness's fm_finetune row (no leakage)."""
from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
import transformers

import fm
from fm.cli import main
from fm.config import load_config
from fm.heads.imputation import ScFMForImputation
from fm.paths import recipe_path
from fm.tasks.common import TaskCells
from fm.tasks.imputation import ImputationCollator, build_imputer, init_query_from_mvc, library_sizes
from fm.tokenizer import CellTokenizer

RECIPE = "finetune/imputation"


def _rows(model_dir, adata) -> list[dict]:
    data = TaskCells(CellTokenizer.from_pretrained(model_dir).encode(adata), {"library": library_sizes(adata)})
    return [data[i] for i in range(len(data))]


def _collator(model_dir, **kw) -> ImputationCollator:
    config = transformers.AutoConfig.from_pretrained(model_dir)
    return ImputationCollator(n_bins=config.n_bins, max_genes=config.max_genes, pad_token_id=config.pad_token_id,
                              zero_fraction=config.zero_fraction, mask_ratio=0.4, **kw)


def _imputer(model_dir):
    cfg = load_config(recipe_path(RECIPE), [f"model.init_from={model_dir}"])
    return build_imputer(cfg)


def test_collator_holds_genes_out_of_the_input_and_scores_them(tiny_model_dir, pbmc_small):
    rows = _rows(tiny_model_dir, pbmc_small[:16])
    batch = _collator(tiny_model_dir)(rows)
    assert batch["target_gene_ids"].shape == batch["labels"].shape == batch["label_weights"].shape
    assert not (batch["values"] == 51).any(), "nothing is value-masked: held-out genes leave the input"
    for i, row in enumerate(rows):
        w = batch["label_weights"][i].numpy()
        genes, values = batch["target_gene_ids"][i].numpy()[w > 0], batch["labels"][i].numpy()[w > 0]
        counts = dict(zip(row["gene_ids"].tolist(), row["counts"].tolist()))
        expressed = np.array([g in counts for g in genes])
        assert expressed.any() and (~expressed).any(), "held-out expressed genes and held-out zeros are scored"
        truth = np.array([np.log1p(counts[g] / row["library"] * 1e4) for g in genes[expressed]])
        np.testing.assert_allclose(values[expressed], truth, rtol=1e-5)
        assert (values[~expressed] == 0).all() and np.isin(genes[~expressed], row["panel"]).all()
        input_ids = batch["gene_ids"][i][batch["attention_mask"][i]].numpy()
        visible = input_ids[batch["values"][i][batch["attention_mask"][i]].numpy() > 0]
        assert not np.isin(genes[expressed], visible).any(), "a scored gene is never visible with its value"
    again = _collator(tiny_model_dir)(rows)
    torch.testing.assert_close(again["target_gene_ids"], batch["target_gene_ids"])  # deterministic
    other = _collator(tiny_model_dir, epoch=1)(rows)
    assert not torch.equal(other["target_gene_ids"], batch["target_gene_ids"]), "fresh draws every epoch"
    capped = _collator(tiny_model_dir, max_targets=5)(rows)
    full = (_collator(tiny_model_dir, max_targets=10**6)(rows)["label_weights"] > 0).sum(1)
    np.testing.assert_allclose(capped["label_weights"].sum(1), full.float(), rtol=1e-5)  # reweighted, unbiased
    assert int((capped["label_weights"] > 0).sum(1).max()) <= 10
    with pytest.raises(ValueError, match="train=False"):
        ImputationCollator(train=True)


def test_head_shapes_loss_and_mvc_init(tiny_model_dir, pbmc_small):
    model = _imputer(tiny_model_dir)
    mvc = transformers.AutoModelForMaskedLM.from_pretrained(tiny_model_dir).mvc_head
    torch.testing.assert_close(model.impute_head.W.weight * model.impute_head.scale, mvc.W.weight)  # from the mvc_head
    torch.testing.assert_close(model.impute_head.query.bias, mvc.query.bias)
    assert model.config.target_scale == "log1p" and model.scfm.embeddings.gene.weight.requires_grad
    batch = _collator(tiny_model_dir)(_rows(tiny_model_dir, pbmc_small[:8]))
    model.eval()
    out = model(**batch)
    assert out.predictions.shape == batch["target_gene_ids"].shape and out.cell_embedding.shape == (8, model.config.d_model)
    w = batch["label_weights"]
    torch.testing.assert_close(out.loss, ((out.predictions - batch["labels"]) ** 2 * w).sum() / w.sum())
    keys, bias = model.gene_keys(batch["target_gene_ids"][0])
    torch.testing.assert_close(out.cell_embedding[0] @ keys.T + bias, out.predictions[0], rtol=1e-4, atol=1e-5)
    assert init_query_from_mvc(model, tiny_model_dir)  # a pretraining checkpoint has an mvc_head


def test_loss_goes_down(tiny_model_dir, pbmc_small):
    model = _imputer(tiny_model_dir)
    batch = _collator(tiny_model_dir)(_rows(tiny_model_dir, pbmc_small[:32]))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(30):  # the mean-pooled, co-expression-initialised tiny model starts near the mean (loss ~1.0)
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.03 and losses[-1] < losses[0], losses


@pytest.fixture(scope="module")
def finetuned(tiny_model_dir, small_h5ad_path, tmp_path_factory):
    """`fm finetune` of the shipped recipe on small_h5ad_path (the recipe's own pbmc3k when present),
    shrunk to a few steps."""
    out = tmp_path_factory.mktemp("imputation")
    code = main(["finetune", RECIPE, f"model.init_from={tiny_model_dir}", f"train.output_dir={out}",
                 f"data.paths=[{small_h5ad_path}]",
                 "train.max_steps=6", "train.batch_size=16", "train.progress=false", "train.save_every=0",
                 "train.eval_every=0", "train.warmup_steps=1", "data.max_genes=64", "task.target_scale=normalized"])
    assert code == 0
    return out / "model"


def test_finetune_exports_a_self_describing_model(finetuned):
    config = json.loads((finetuned / "config.json").read_text())
    assert config["architectures"] == ["ScFMForImputation"]
    assert config["target_scale"] == "normalized" and config["target_sum"] == 1e4
    model = fm.load(finetuned)
    assert isinstance(model, ScFMForImputation) and not model.training
    backbone, info = transformers.AutoModel.from_pretrained(finetuned, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_impute_fields_scales_and_x_untouched(finetuned, pbmc_small, tmp_path):
    a = pbmc_small[:40].copy()
    a.var_names = [*a.var_names[:-2], "NOT_A_GENE_1", "NOT_A_GENE_2"]  # two genes outside the vocabulary
    x_before = a.X.copy()
    model = fm.load(finetuned)
    normalized = fm.impute(a, model, batch_size=16)  # scale None → the model's target_scale
    assert (a.X != x_before).nnz == 0, "X untouched"
    layer = a.layers["fm_imputed"]
    np.testing.assert_array_equal(layer, normalized)
    assert layer.shape == a.shape and layer.dtype == np.float32
    known = a.var["fm_imputed"].to_numpy()
    expected = model.cell_tokenizer.match_genes(a).vocab_ids >= 0
    np.testing.assert_array_equal(known, expected)
    assert known.dtype == bool and not known[-2:].any() and known.sum() > 1000
    assert a.uns["fm_imputed"]["scale"] == "normalized" and a.uns["fm_imputed"]["n_imputed_genes"] == known.sum()
    counts = x_before.toarray()
    observed = counts[:, ~known] / counts.sum(1, keepdims=True) * 1e4  # library over all genes
    np.testing.assert_allclose(layer[:, ~known], observed, rtol=1e-4, atol=1e-4)  # kept, on the same scale
    assert (layer >= 0).all() and (layer[:, known] > 0).any()

    log1p = fm.impute(a, model, scale="log1p", key="imp", batch_size=7)  # other batching: same numbers
    np.testing.assert_allclose(np.expm1(log1p), normalized, rtol=1e-4, atol=1e-4)
    assert a.uns["imp"]["scale"] == "log1p"

    model.save_pretrained(tmp_path)  # save → load → same predictions
    model.cell_tokenizer.save_pretrained(tmp_path)
    again = a.copy()
    np.testing.assert_array_equal(fm.impute(again, fm.load(tmp_path), scale="log1p", batch_size=7), log1p)


def test_impute_bad_input_is_explained(finetuned, tiny_model_dir, pbmc_small):
    model = fm.load(finetuned)
    with pytest.raises(ValueError, match="no imputation head.*finetune recipes/finetune/imputation.yaml"):
        fm.impute(pbmc_small, fm.load(tiny_model_dir))
    with pytest.raises(ValueError, match="scale must be one of"):
        fm.impute(pbmc_small, model, scale="counts")
    nothing = ad.AnnData(sp.csr_matrix(np.ones((3, 4), np.float32)), var=pd.DataFrame(index=[f"NOPE{i}" for i in range(4)]))
    with pytest.raises(ValueError, match="vocabulary"):
        fm.impute(nothing, model)
    assert "fm_imputed" not in nothing.layers and "fm_imputed" not in pbmc_small.layers, "nothing written"
    with pytest.raises(ValueError, match="target_scale"):
        load_config(recipe_path(RECIPE), ["task.target_scale=counts"])


def test_harness_fm_finetune_sees_only_the_input_counts(tiny_model_dir, small_h5ad_path, tmp_path, monkeypatch):
    """The fm row fine-tunes on the masked counts and on the MCV train half — never on held-out counts."""
    from fm.eval.context import EvalContext
    from fm.eval.harness import run_task
    from fm.eval.tasks import imputation as task

    ctx = EvalContext(output_dir=tmp_path, profile="ci", models=[tiny_model_dir], data_dir=small_h5ad_path.parent.parent,
                      caps={"max_cells": 120, "finetune": {"train.max_steps": 3, "train.batch_size": 16,
                                                           "data.max_genes": 64, "data.val_fraction": 0.0}})
    seen = {}
    real = EvalContext.fm_finetune

    def spy(self, train_adata, model_dir, name, dataset, seed, **overrides):
        seen[dataset] = train_adata.X.toarray()
        return real(self, train_adata, model_dir, name, dataset, seed, **overrides)

    monkeypatch.setattr(EvalContext, "fm_finetune", spy)
    dataset = {"name": "pbmc3k", "file": "h5ad/" + small_h5ad_path.name, "label_key": "cell_type"}
    rows = run_task(task, dataset, ["none", "fm_finetune"], 0, ctx)
    label = f"fm_finetune[{ctx.model_label(tiny_model_dir)}]"
    values = {(r["method"], r["metric"]): r["value"] for r in rows}
    assert np.isfinite(values[(label, "mcv_mse")]) and np.isfinite(values[(label, "masked_mse")])

    split = np.load(tmp_path / "splits" / "pbmc3k_seed0.npz")
    adata = ctx.load_dataset(dataset)
    counts = adata.X.toarray()
    train_half = split["mcv_train_counts"].reshape(counts.shape)
    r, c = np.unravel_index(split["held_out"], counts.shape)
    masked = counts.copy()
    masked[r, c] = 0
    np.testing.assert_array_equal(seen["pbmc3k_masked"], masked[masked.sum(1) > 0])
    np.testing.assert_array_equal(seen["pbmc3k_mcv"], train_half[train_half.sum(1) > 0])
    assert Path(tmp_path / "finetune" / f"imputation_pbmc3k_mcv_seed0_{ctx.model_label(tiny_model_dir)}").is_dir()
