"""Batch correction (issue #6): ScFMForBatchCorrection (reconstruction + DAR + ECS), the batch
condition token, `fm finetune` of the recipe, fm.integrate, bad batch input, the harness's fm_finetune row.

Data: `kang_small` / `batch_h5ad_path` (conftest): Kang 2018 with its 4 samples (ctrl101, ctrl107,
stim101, stim107) as batches when the shared data is there, else generated cells in 4 batches with
the same obs columns; the harness row needs the real CellBench file (Ensembl IDs)."""
from __future__ import annotations

import json
import logging

import anndata as ad
import numpy as np
import pytest
import torch

import fm
from fm.cli import main
from fm.config import load_config
from fm.configuration_scfm import ScFMConfig
from fm.heads import IGNORE_INDEX
from fm.heads.batch_correction import ScFMDiscriminatorHead, ScFMForBatchCorrection, adversarial_losses, ecs_loss
from fm.paths import recipe_path
from fm.tasks.batch_correction import (BatchCorrectionCollator, build_integration_model, load_batch_cells,
                                       run as run_batch_correction)
from fm.tokenizer import TOKENIZER_FILE, UNKNOWN_CONDITION, CellTokenizer

RECIPE = "finetune/batch_correction"


def _samples(adata) -> list[str]:
    """The batches (obs['sample']) in sorted order: the order of the condition table."""
    return sorted(set(adata.obs["sample"].astype(str)))


def _cfg(tiny_model_dir, tmp_path, *extra):
    return load_config(recipe_path(RECIPE), [f"model.init_from={tiny_model_dir}", "data.max_genes=64",
                                             f"train.output_dir={tmp_path / 'run'}", *extra])


def _model_and_batch(tiny_model_dir, tmp_path, adata, *extra):
    cfg = _cfg(tiny_model_dir, tmp_path, *extra)
    tokenizer = CellTokenizer.from_pretrained(tiny_model_dir)
    data, column = load_batch_cells([(adata, "kang")], tokenizer, cfg.task.batch_key)
    model = build_integration_model(tokenizer, cfg, column)
    collator = BatchCorrectionCollator(n_bins=model.config.n_bins, max_genes=64, train=True, batch_column=column,
                                        zero_fraction=model.config.zero_fraction)
    return model, collator([data[i] for i in range(len(data))]), tokenizer


def test_head_shapes_condition_table_and_loss_terms(tiny_model_dir, kang_small, tmp_path):
    model, batch, tokenizer = _model_and_batch(tiny_model_dir, tmp_path, kang_small)
    assert tokenizer.condition_keys[-1] == "sample"
    assert len(_samples(kang_small)) == 4
    assert tokenizer.condition_categories["sample"] == [UNKNOWN_CONDITION, *_samples(kang_small)]
    assert model.config.condition_vocab_sizes[-1] == 5 and model.config.num_batches == 4
    assert model.config.batch_key == "sample" and model.config.n_prefix == 1 + len(tokenizer.condition_keys)
    pretrained = fm.load(tiny_model_dir)
    torch.testing.assert_close(model.gep_head[0].weight, pretrained.gep_head[0].weight)  # pretrained heads reused
    torch.testing.assert_close(model.mvc_head.W.weight, pretrained.mvc_head.W.weight)
    assert batch["batch_labels"].tolist() == np.repeat(np.arange(4), 30).tolist()
    assert "masked_positions" in batch and batch["labels"].shape == batch["gene_ids"].shape

    model.eval()
    out = model(**batch)
    B, D = 120, model.config.d_model
    assert out.cell_embedding.shape == (B, D) and out.batch_logits.shape == (B, 4)
    for name in ("gep_loss", "mvc_loss", "dar_loss", "confusion_loss", "ecs_loss"):
        assert getattr(out, name).ndim == 0 and torch.isfinite(getattr(out, name)), name
    total = (out.gep_loss + out.mvc_loss + model.config.dar_weight * (out.dar_loss + out.confusion_loss)
             + model.config.ecs_weight * out.ecs_loss)
    torch.testing.assert_close(out.loss, total)
    plain = model(**{k: v for k, v in batch.items() if k not in ("labels", "batch_labels")})
    assert plain.loss is None and plain.cell_embedding.shape == (B, D)
    unknown = model(**{**batch, "batch_labels": torch.full((B,), IGNORE_INDEX)})
    assert float(unknown.dar_loss.detach()) == 0.0 and unknown.dar_loss.requires_grad
    assert float(unknown.confusion_loss.detach()) == 0.0


def test_ecs_loss():
    one = torch.randn(1, 8, requires_grad=True)
    assert float(ecs_loss(one, 0.8).detach()) == 0.0 and ecs_loss(one, 0.8).requires_grad
    # centred pairs: two tight, opposite clusters have cos ±1 → terms 1-(1-0.8)² and 1-(0-0.8)²
    cells = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [-1.0, 0.0]]) + 5.0
    expected = (4 * (1 - 0.2 ** 2) + 8 * (1 - 0.8 ** 2)) / 12
    torch.testing.assert_close(ecs_loss(cells, 0.8), torch.tensor(expected))


def test_discriminator_and_backbone_each_get_only_their_own_gradient():
    torch.manual_seed(0)
    head = ScFMDiscriminatorHead(ScFMConfig(d_model=16, n_heads=4, num_batches=4))
    cell = torch.randn(8, 16, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, IGNORE_INDEX, 3])
    logits, dar, confusion = adversarial_losses(head, cell, labels)
    assert logits.shape == (8, 4)
    dar_grads = torch.autograd.grad(dar, [head.out.weight, cell], allow_unused=True, retain_graph=True)
    assert dar_grads[0].abs().sum() > 0 and dar_grads[1] is None, "the discriminator loss never reaches the embedding"
    conf_grads = torch.autograd.grad(confusion, [head.out.weight, cell], allow_unused=True)
    assert conf_grads[0] is None and conf_grads[1].abs().sum() > 0, "the confusion loss never reaches the discriminator"
    # confusion = cross-entropy to uniform over the known cells: log K exactly at uniform predictions
    uniform = torch.nn.Linear(16, 4)
    torch.nn.init.zeros_(uniform.weight), torch.nn.init.zeros_(uniform.bias)
    head.out = uniform
    _, _, at_chance = adversarial_losses(head, cell, labels)
    torch.testing.assert_close(at_chance, torch.tensor(np.log(4.0), dtype=torch.float32))


def test_gradient_reversal_mode_negates_the_backbone_gradient():
    """task.adversary=reversal (scGPT's DAR): one loss; the head descends it, the embedding ascends it."""
    torch.manual_seed(0)
    head = ScFMDiscriminatorHead(ScFMConfig(d_model=16, n_heads=4, num_batches=4))
    cell = torch.randn(8, 16, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, IGNORE_INDEX, 3])
    _, dar, confusion = adversarial_losses(head, cell, labels, mode="reversal")
    assert float(confusion) == 0.0
    reversed_grad = torch.autograd.grad(dar, cell)[0]
    plain = torch.nn.functional.cross_entropy(head(cell)[labels != IGNORE_INDEX], labels[labels != IGNORE_INDEX])
    torch.testing.assert_close(reversed_grad, -torch.autograd.grad(plain, cell)[0])
    with pytest.raises(ValueError, match="adversary"):
        adversarial_losses(head, cell, labels, mode="gan")
    with pytest.raises(ValueError, match="task.adversary"):
        load_config(None, ["task.name=batch_correction", "task.adversary=gan"])


@pytest.mark.parametrize("ecs_weight", [0.0, 10.0])  # the recipe's objective, and with scGPT's ECS weight
def test_loss_goes_down(tiny_model_dir, kang_small, tmp_path, ecs_weight):
    """Reconstruction improves and the total falls (the adversarial pair, dar_loss vs
    confusion_loss, pulls in opposite directions by design: not checked term by term)."""
    model, batch, _ = _model_and_batch(tiny_model_dir, tmp_path, kang_small[::2].copy(), f"task.ecs_weight={ecs_weight}")
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    history = []
    for _ in range(16):
        out = model(**batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        history.append({k: float(getattr(out, k).detach()) for k in ("loss", "gep_loss", "mvc_loss")})
    first, last = history[0], history[-1]
    assert last["gep_loss"] + last["mvc_loss"] < 0.9 * (first["gep_loss"] + first["mvc_loss"]), history
    assert last["loss"] < first["loss"] - 0.05, history


# ----------------------------------------------------------------------------- fm finetune + fm.integrate

@pytest.fixture(scope="module")
def integrated(tiny_model_dir, batch_h5ad_path, tmp_path_factory):
    """`fm finetune` of the shipped recipe (batch_key sample) on batch_h5ad_path (the recipe's own Kang
    file when present), shrunk to a few steps."""
    out = tmp_path_factory.mktemp("batch_correction")
    code = main(["finetune", RECIPE, f"model.init_from={tiny_model_dir}", f"train.output_dir={out}",
                 f"data.paths=[{batch_h5ad_path}]",
                 "train.max_steps=4", "train.batch_size=16", "train.progress=false", "train.save_every=0",
                 "train.eval_every=0", "train.warmup_steps=1", "data.max_genes=64"])
    assert code == 0
    return out


def test_finetune_exports_batch_condition_and_logs_every_term(integrated, tiny_model_dir, batch_h5ad_path):
    config = json.loads((integrated / "model" / "config.json").read_text())
    assert config["architectures"] == ["ScFMForBatchCorrection"]
    assert config["condition_keys"] == ["sample"] and config["condition_vocab_sizes"] == [5]
    assert config["batch_key"] == "sample" and config["ecs_weight"] == 0.0 and config["num_batches"] == 4
    tokenizer = json.loads((integrated / "model" / TOKENIZER_FILE).read_text())
    assert tokenizer["condition_categories"]["sample"][1:] == _samples(ad.read_h5ad(batch_h5ad_path, backed="r"))
    header = (integrated / "train_log.csv").read_text().splitlines()[0].split(",")
    assert {"loss", "gep_loss", "mvc_loss", "dar_loss", "confusion_loss", "ecs_loss"} <= set(header)
    model = fm.load(integrated / "model")
    assert isinstance(model, ScFMForBatchCorrection) and not model.training
    assert CellTokenizer.from_pretrained(tiny_model_dir).condition_keys == [], "the pretrained tokenizer is untouched"


def test_integrate_fields_deterministic_x_untouched(integrated, kang_small, caplog):
    model = fm.load(integrated / "model")
    x_before = kang_small.X.copy()
    obs_before = kang_small.obs.copy()
    emb = fm.integrate(kang_small, model, batch_size=32)
    assert emb.shape == (kang_small.n_obs, model.config.d_model) and emb.dtype == np.float32
    np.testing.assert_array_equal(kang_small.obsm["X_fm_integrated"], emb)
    assert kang_small.uns["X_fm_integrated"]["params"] == {"batch_key": "sample", "fine_tuned": True}
    assert (kang_small.X != x_before).nnz == 0 and kang_small.obs.equals(obs_before)
    again = kang_small.copy()
    np.testing.assert_allclose(fm.integrate(again, model, batch_size=7, key="z"), emb, rtol=1e-5, atol=1e-6)

    renamed = kang_small.copy()  # another column name for the batches: same embedding
    renamed.obs = renamed.obs.rename(columns={"sample": "donor_condition"})
    np.testing.assert_allclose(fm.integrate(renamed, model, batch_key="donor_condition"), emb, rtol=1e-5, atol=1e-6)
    assert model.cell_tokenizer.condition_keys == ["sample"], "the model's tokenizer is restored"

    unseen = kang_small.copy()
    unseen.obs["sample"] = "new_lab"
    with caplog.at_level(logging.WARNING, logger="fm"):
        out = fm.integrate(unseen, model)
    assert "new_lab" in caplog.text and "unknown token" in caplog.text
    assert np.isfinite(out).all() and not np.allclose(out, emb)


def test_save_load_same_embedding(integrated, kang_small, tmp_path):
    model = fm.load(integrated / "model")
    reference = fm.integrate(kang_small.copy(), model)
    model.save_pretrained(tmp_path)
    model.cell_tokenizer.save_pretrained(tmp_path)
    np.testing.assert_array_equal(fm.integrate(kang_small.copy(), fm.load(tmp_path)), reference)


def test_plain_checkpoint_falls_back_to_zero_shot(tiny_model_dir, kang_small, caplog):
    model = fm.load(tiny_model_dir)
    with caplog.at_level(logging.WARNING, logger="fm"):
        out = fm.integrate(kang_small, model, batch_key="sample")
    assert "not fine-tuned for batch correction" in caplog.text
    np.testing.assert_array_equal(out, fm.embed(kang_small.copy(), model))
    assert kang_small.uns["X_fm_integrated"]["params"]["fine_tuned"] is False


# ----------------------------------------------------------------------------- bad batch input

def test_missing_batch_column_names_file_and_column(tiny_model_dir, kang_small, tmp_path, integrated):
    path = tmp_path / "kang.h5ad"
    kang_small.write_h5ad(path)
    cfg = _cfg(tiny_model_dir, tmp_path, f"data.paths=[{path}]", "task.batch_key=donor")
    with pytest.raises(KeyError, match=r"kang\.h5ad: no obs column 'donor'.*'cell_type', 'sample'"):
        run_batch_correction(cfg)
    assert main(["finetune", RECIPE, f"model.init_from={tiny_model_dir}", f"data.paths=[{path}]",
                 "task.batch_key=donor", f"train.output_dir={tmp_path / 'cli'}"]) == 2
    with pytest.raises(KeyError, match=r"no obs column 'donor'.*batch_key="):
        fm.integrate(kang_small, fm.load(integrated / "model"), batch_key="donor")
    assert "X_fm_integrated" not in kang_small.obsm, "a failure leaves adata as it was"


def test_single_batch_is_nothing_to_correct(tiny_model_dir, kang_small, tmp_path):
    first = _samples(kang_small)[0]  # ctrl101 in Kang
    a = kang_small[kang_small.obs["sample"] == first].copy()
    with pytest.raises(ValueError, match=rf"single batch \['{first}'\] — nothing to correct.*task.batch_key"):
        run_batch_correction(_cfg(tiny_model_dir, tmp_path), adatas=a)


def test_missing_batch_values_are_an_error(tiny_model_dir, kang_small, tmp_path, integrated):
    a = kang_small.copy()
    values = a.obs["sample"].astype(object).to_numpy()
    values[:3] = np.nan
    a.obs["sample"] = values
    with pytest.raises(ValueError, match=r"obs\['sample'\] is missing for 3 of 120 cells"):
        run_batch_correction(_cfg(tiny_model_dir, tmp_path), adatas=a)
    with pytest.raises(ValueError, match="missing for 3"):
        fm.integrate(a, fm.load(integrated / "model"))


def test_batch_dropout_is_deterministic_and_validated(tiny_model_dir, kang_small, tmp_path):
    cells = CellTokenizer(condition_keys=["sample"], condition_categories={
        "sample": [UNKNOWN_CONDITION, *_samples(kang_small)]}).encode(kang_small)
    rows = [cells[i] for i in range(len(cells))]
    collator = BatchCorrectionCollator(max_genes=32, batch_dropout=0.5)
    first, second = collator(rows), collator(rows)
    torch.testing.assert_close(first["condition_ids"], second["condition_ids"])
    dropped = first["condition_ids"][:, 0] == 0
    assert 0.2 < float(dropped.float().mean()) < 0.8 and (first["batch_labels"] >= 0).all()
    assert not (BatchCorrectionCollator(max_genes=32, train=False)(rows)["condition_ids"] == 0).any()
    with pytest.raises(ValueError, match="batch_dropout"):
        run_batch_correction(_cfg(tiny_model_dir, tmp_path, "task.batch_dropout=1.0"), adatas=kang_small)


# ----------------------------------------------------------------------------- harness row

def test_harness_fm_finetune_on_ensembl_ids(tiny_model_dir, tmp_path, real_cellbench, caplog):
    """The eval method on CellBench (Ensembl IDs): fine-tunes on all cells with obs[batch] only."""
    import yaml

    from fm.eval.context import EvalContext
    from fm.eval.tasks.batch_correction import integrate_finetuned

    caps = {"finetune": {"train.max_steps": 2, "train.batch_size": 16, "data.max_genes": 64}}
    ctx = EvalContext(output_dir=tmp_path, profile="ci", models=[tiny_model_dir], data_dir=tmp_path, caps=caps)
    emb = integrate_finetuned(real_cellbench, "batch", tiny_model_dir, "cellbench", 0, ctx)
    assert emb.shape == (real_cellbench.n_obs, 32) and np.isfinite(emb).all() and emb.std(0).max() > 0
    assert "(100.0%, human)" in caplog.text or "genes in the vocabulary (9" in caplog.text, "Ensembl IDs match"
    run = tmp_path / "finetune" / f"batch_correction_cellbench_seed0_{ctx.model_label(tiny_model_dir)}"
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["task"]["batch_key"] == "batch" and cfg["train"]["max_steps"] == 2 and cfg["data"]["val_fraction"] == 0
    model = fm.load(run / "model")
    assert model.cell_tokenizer.condition_keys == ["batch"] and "cell_line" not in model.cell_tokenizer.condition_keys


@pytest.fixture()
def real_cellbench():
    from fm.paths import data_dir

    path = data_dir() / "h5ad" / "cellbench_3cl_celseq2_dropseq.h5ad"
    if not path.is_file():
        pytest.skip(f"real data file {path} not found")
    a = ad.read_h5ad(path)
    assert a.var_names[0].startswith("ENSG")
    rows = np.concatenate([np.flatnonzero(a.obs["batch"].astype(str).to_numpy() == b)[:40]
                           for b in sorted(a.obs["batch"].astype(str).unique())])
    return a[rows].copy()
