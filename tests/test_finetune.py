"""Cell-type annotation (issue #6, first head): ScFMForAnnotation, the labelled collator,
`fm finetune` on PBMC labels (real pbmc3k when the shared data is there, else the generated stand-in
with 9 types, see conftest) through the one training loop, fm.annotate, bad label input."""
from __future__ import annotations

import json
import logging

import anndata as ad
import numpy as np
import pytest
import torch
import transformers

import fm
from fm.cli import main
from fm.config import load_config
from fm.data import LabeledCellCollator
from fm.heads import IGNORE_INDEX
from fm.heads.annotation import ScFMForAnnotation
from fm.paths import recipe_path
from fm.tasks.annotation import build_classifier, encode_classes, load_labeled_cells, run as run_annotation
from fm.tokenizer import TOKENIZER_FILE, CellTokenizer

RECIPE = "finetune/annotation"
CLASSES = ["B", "NK", "T"]


def _classifier(tiny_model_dir, classes=CLASSES):
    torch.manual_seed(0)
    return ScFMForAnnotation.from_pretrained(
        tiny_model_dir, num_labels=len(classes), id2label=dict(enumerate(classes)),
        label2id={c: i for i, c in enumerate(classes)}, output_loading_info=True)


def _rows(tiny_model_dir, adata):
    cells = CellTokenizer.from_pretrained(tiny_model_dir).encode(adata)
    return [cells[i] for i in range(len(cells))]


def _batch(tiny_model_dir, adata, labels):
    tokenizer = CellTokenizer.from_pretrained(tiny_model_dir)
    cells = tokenizer.encode(adata)
    config = transformers.AutoConfig.from_pretrained(tiny_model_dir)
    collator = LabeledCellCollator(n_bins=config.n_bins, max_genes=config.max_genes,
                                   pad_token_id=config.pad_token_id, zero_fraction=config.zero_fraction)
    rows = [dict(cells[i], label=int(labels[i])) for i in range(len(cells))]
    return collator(rows)


def test_head_init_from_pretrained_shapes_and_ignored_labels(tiny_model_dir, pbmc_small):
    model, info = _classifier(tiny_model_dir)
    assert sorted(info["missing_keys"]) == sorted(f"classifier_head.{n}" for n in (
        "dense.weight", "dense.bias", "out.weight", "out.bias", "norm.weight", "norm.bias", "norm.running_mean",
        "norm.running_var", "norm.num_batches_tracked"))
    norm = model.classifier_head.norm
    assert torch.equal(norm.running_var, torch.ones_like(norm.running_var)) and int(norm.num_batches_tracked) == 0
    assert not info["unexpected_keys"], "pretraining heads (gep_head, mvc_head) are dropped silently"
    pretrained = transformers.AutoModel.from_pretrained(tiny_model_dir)
    torch.testing.assert_close(model.scfm.embeddings.gene.weight, pretrained.embeddings.gene.weight)
    assert model.config.num_labels == 3 and model.config.id2label[1] == "NK"

    labels = np.arange(32) % 3
    batch = _batch(tiny_model_dir, pbmc_small[:32], labels)
    assert batch["labels"].dtype == torch.long and "masked_positions" not in batch
    assert not (batch["values"] == model.config.mask_value_id).any(), "fine-tuning inputs are never masked"
    model.eval()
    out = model(**batch)
    assert out.logits.shape == (32, 3) and out.cell_embedding.shape == (32, model.config.d_model)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)

    # cells labelled IGNORE_INDEX do not count: same loss as scoring the labelled cells only
    partial = batch["labels"].clone()
    partial[::2] = IGNORE_INDEX
    loss = model(**{**batch, "labels": partial}).loss
    keep = partial != IGNORE_INDEX
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(out.logits[keep], partial[keep]))
    none = model(**{**batch, "labels": torch.full_like(partial, IGNORE_INDEX)}).loss
    assert float(none.detach()) == 0.0 and none.requires_grad
    with pytest.raises(ValueError, match="masked values"):
        LabeledCellCollator(train=True)
    proteins = LabeledCellCollator(n_bins=51, max_genes=32, targets={"y": "targets"})(
        [dict(r, y=np.arange(3, dtype=np.float64)) for r in (_rows(tiny_model_dir, adata=pbmc_small[:4]))])
    assert proteins["targets"].dtype == torch.float32 and proteins["targets"].shape == (4, 3)


def test_loss_goes_down(tiny_model_dir, pbmc_small):
    model, _ = _classifier(tiny_model_dir)
    names = pbmc_small.obs["cell_type"].astype(str).to_numpy()[:48]
    classes = sorted(set(names))
    batch = _batch(tiny_model_dir, pbmc_small[:48], np.array([classes.index(n) for n in names]))
    model.classifier_head.out = torch.nn.Linear(model.config.d_model, len(classes))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] - 0.1, losses


@pytest.fixture(scope="module")
def finetuned(tiny_model_dir, small_h5ad_path, tmp_path_factory):
    """`fm finetune` on all cells of small_h5ad_path (the recipe's own pbmc3k file when present) for a
    few steps (the shipped recipe, shrunk)."""
    out = tmp_path_factory.mktemp("annotation")
    code = main(["finetune", RECIPE, f"model.init_from={tiny_model_dir}", f"train.output_dir={out}",
                 f"data.paths=[{small_h5ad_path}]",
                 "train.max_steps=6", "train.batch_size=16", "train.progress=false", "train.save_every=0",
                 "train.eval_every=0", "train.warmup_steps=1", "data.max_genes=64", "task.unknown_threshold=0.2"])
    assert code == 0
    return out / "model"


def test_finetune_exports_labels_and_tokenizer(finetuned, tiny_model_dir, small_h5ad_path):
    config = json.loads((finetuned / "config.json").read_text())
    assert config["architectures"] == ["ScFMForAnnotation"]
    classes = sorted(set(ad.read_h5ad(small_h5ad_path, backed="r").obs["cell_type"].astype(str)))
    assert len(config["id2label"]) == 9 and config["id2label"] == {str(i): c for i, c in enumerate(classes)}
    assert config["unknown_threshold"] == 0.2 and config["label_key"] == "cell_type"
    assert (finetuned / TOKENIZER_FILE).is_file()
    assert CellTokenizer.from_pretrained(finetuned).vocab.sha256 == CellTokenizer.from_pretrained(tiny_model_dir).vocab.sha256
    model = fm.load(finetuned)
    assert isinstance(model, ScFMForAnnotation) and not model.training

    # AutoModel: the backbone alone, nothing missing or unexpected; the Auto head class finds the head
    backbone, info = transformers.AutoModel.from_pretrained(finetuned, output_loading_info=True)
    assert type(backbone).__name__ == "ScFMModel"
    assert not info["missing_keys"] and not info["unexpected_keys"]
    torch.testing.assert_close(backbone.layers[0].attn.qkv.weight, model.scfm.layers[0].attn.qkv.weight)
    assert isinstance(transformers.AutoModelForSequenceClassification.from_pretrained(finetuned),
                      ScFMForAnnotation)


def test_annotate_fields_deterministic_x_untouched(finetuned, pbmc_small, tiny_model_dir):
    model = fm.load(finetuned)
    x_before = pbmc_small.X.copy()
    labels = fm.annotate(pbmc_small, model, batch_size=32)
    classes = [model.config.id2label[i] for i in range(model.config.num_labels)]
    obs, probs = pbmc_small.obs, pbmc_small.obsm["fm_cell_type_probabilities"]
    assert list(pbmc_small.uns["fm_cell_type_classes"]) == classes
    assert probs.shape == (pbmc_small.n_obs, 9) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    conf = obs["fm_cell_type_confidence"].to_numpy()
    assert conf.dtype == np.float32
    np.testing.assert_array_equal(conf, probs.max(1))
    expected = np.where(conf < 0.2, "unknown", np.asarray(classes)[probs.argmax(1)])  # config threshold 0.2
    np.testing.assert_array_equal(obs["fm_cell_type"].astype(str).to_numpy(), expected)
    np.testing.assert_array_equal(np.asarray(labels, dtype=str), expected)
    assert (pbmc_small.X != x_before).nnz == 0, "X untouched"

    again = pbmc_small.copy()
    fm.annotate(again, model, batch_size=32, key="ct", threshold=1.0)  # deterministic: same numbers
    np.testing.assert_array_equal(again.obsm["ct_probabilities"], probs)
    np.testing.assert_array_equal(again.obsm["fm_cell_type_probabilities"], probs)  # copied, not recomputed
    assert (again.obs["ct"] == "unknown").all()
    fm.annotate(again, model, batch_size=7, key="ct", threshold=0.0)  # other padding: equal up to float noise
    np.testing.assert_allclose(again.obsm["ct_probabilities"], probs, rtol=1e-5, atol=1e-6)
    assert not (again.obs["ct"] == "unknown").any()
    with pytest.raises(ValueError, match="classifier head"):
        fm.annotate(pbmc_small, fm.load(tiny_model_dir))


def test_save_load_same_predictions(finetuned, pbmc_small, tmp_path):
    model = fm.load(finetuned)
    reference = fm.annotate(pbmc_small, model)
    probs = pbmc_small.obsm["fm_cell_type_probabilities"].copy()
    model.save_pretrained(tmp_path)
    model.cell_tokenizer.save_pretrained(tmp_path)
    again = pbmc_small.copy()
    np.testing.assert_array_equal(fm.annotate(again, fm.load(tmp_path)), reference)
    np.testing.assert_array_equal(again.obsm["fm_cell_type_probabilities"], probs)


# ----------------------------------------------------------------------------- bad label input

def _write(adata, path):
    adata.write_h5ad(path)
    return path


def test_single_class_is_a_clear_error(tiny_model_dir, pbmc_small, tmp_path):
    a = pbmc_small.copy()
    a.obs["cell_type"] = "T"
    path = _write(a, tmp_path / "one.h5ad")
    cfg = load_config(recipe_path(RECIPE), [f"model.init_from={tiny_model_dir}", f"data.paths=[{path}]",
                                            f"train.output_dir={tmp_path / 'run'}"])
    with pytest.raises(ValueError, match="at least 2.*task.label_key"):
        run_annotation(cfg)


def test_missing_label_column_names_file_and_column(tiny_model_dir, pbmc_small, tmp_path):
    path = _write(pbmc_small, tmp_path / "pbmc.h5ad")
    cfg = load_config(recipe_path(RECIPE), [f"model.init_from={tiny_model_dir}", f"data.paths=[{path}]",
                                            "task.label_key=celltype_l2", f"train.output_dir={tmp_path / 'run'}"])
    with pytest.raises(KeyError, match=r"pbmc\.h5ad.*celltype_l2"):
        run_annotation(cfg)
    assert main(["finetune", RECIPE, f"model.init_from={tiny_model_dir}", f"data.paths=[{path}]",
                 "task.label_key=celltype_l2", f"train.output_dir={tmp_path / 'run'}"]) == 2


def test_missing_init_from_is_a_clear_error(capsys):
    assert main(["finetune", RECIPE]) == 2
    assert "model.init_from" in capsys.readouterr().err


def test_cells_without_labels_are_ignored_and_reported(tiny_model_dir, pbmc_small, tmp_path, caplog):
    a = pbmc_small.copy()
    names = a.obs["cell_type"].astype(object).to_numpy()
    names[:5] = np.nan
    names[5:8] = ""
    a.obs["cell_type"] = names
    a.obs.loc[a.obs_names[8], "cell_type"] = "Rare"  # 1 cell < min_cells_per_class=2
    path = _write(a, tmp_path / "partial.h5ad")
    with caplog.at_level(logging.WARNING, logger="fm"):
        data, classes = load_labeled_cells([(a, str(path))], CellTokenizer.from_pretrained(tiny_model_dir),
                                           "cell_type", 2)
    assert "Rare" not in classes and len(classes) >= 2
    assert len(data) == a.n_obs and (data.targets["label"][:9] == IGNORE_INDEX).all() and (data.targets["label"][9:] >= 0).all()
    assert "9 of 200 cells have no usable obs['cell_type'] label (8 missing/empty, 1 in dropped classes)" in caplog.text
    assert data[0]["label"] == IGNORE_INDEX and data[9]["label"] == classes.index(str(names[9]))
    labels, _ = encode_classes(np.array(["a", None, "b"], dtype=object), 1, "x")
    assert labels.tolist() == [0, IGNORE_INDEX, 1]


def test_task_section_is_the_chosen_tasks_own_config():
    cfg = load_config(recipe_path("debug"))
    assert cfg.task is None and cfg.data.paths, "pretraining has no task section"
    ft = load_config(recipe_path(RECIPE))
    assert type(ft.task).__name__ == "AnnotationConfig"
    assert ft.task.label_key == "cell_type" and ft.data.paths and ft.model.init_from is None
    with pytest.raises(ValueError, match="task.name"):
        load_config(None, ["task.name=segmentation"])
    with pytest.raises(KeyError, match="task.batch_key"):  # another task's field is an unknown key here
        load_config(recipe_path(RECIPE), ["task.batch_key=sample"])
    with pytest.raises(ValueError, match="task.n_neighbors"):  # validated by the task's own config
        load_config(None, ["task.name=cci", "task.n_neighbors=0"])
    assert load_config(None, ["task.name=cci"]).task.spatial_key == "spatial"


def test_build_classifier_refuses_a_non_backbone(tmp_path, tiny_model_dir):
    cfg = load_config(recipe_path(RECIPE), [f"model.init_from={tiny_model_dir}"])
    model = build_classifier(CLASSES, cfg)
    assert model.config.unknown_threshold == cfg.task.unknown_threshold
    assert model.scfm.embeddings.gene.weight.requires_grad, "compact gene table: task.freeze_gene_embedding defaults off"
    assert model.scfm.layers[0].attn.qkv.weight.requires_grad and model.classifier_head.out.weight.requires_grad
    head_only = build_classifier(CLASSES, load_config(recipe_path(RECIPE), [f"model.init_from={tiny_model_dir}",
                                                                             "task.freeze_backbone=true"]))
    assert not any(p.requires_grad for p in head_only.scfm.parameters())
    with pytest.raises(ValueError, match="full backbone"):
        build_classifier(CLASSES, load_config(recipe_path(RECIPE), [f"model.init_from={_headless(tmp_path, tiny_model_dir)}"]))


def _headless(tmp_path, tiny_model_dir):
    """A checkpoint directory whose weights lack the backbone's layers (not an scfm backbone)."""
    import shutil

    from safetensors.torch import load_file, save_file

    out = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, out)
    weights = load_file(out / "model.safetensors")
    save_file({k: v for k, v in weights.items() if ".layers." not in k}, out / "model.safetensors")
    return out


def test_finetune_from_python_on_anndata(tiny_model_dir, pbmc_small, tmp_path):
    """fm.finetune: the Python path of `fm finetune`, on an in-memory AnnData; returns the loaded head."""
    model = fm.finetune(tiny_model_dir, pbmc_small, task="annotation", output_dir=tmp_path / "ft",
                        train__max_steps=3, train__batch_size=16, train__progress=False, train__save_every=0,
                        data__max_genes=32, overrides={"task.min_cells_per_class": 1})
    assert isinstance(model, ScFMForAnnotation) and model.config.num_labels >= 2
    assert model.cell_tokenizer is not None and (tmp_path / "ft" / "config.yaml").is_file()
    with pytest.raises(ValueError, match="unknown task"):
        fm.finetune(tiny_model_dir, pbmc_small, task="segmentation")


def test_transfer_labels_zero_shot(tiny_model_dir, small_h5ad_path):
    """kNN label transfer in embedding space: reference cells vote; fields as fm.annotate; inputs unchanged."""
    full = ad.read_h5ad(small_h5ad_path)[:300].copy()
    reference, query = full[:200].copy(), full[200:].copy()
    ref_x, qry_x = reference.X.copy(), query.X.copy()
    model = fm.load(tiny_model_dir)
    labels = fm.transfer_labels(query, reference, model, k=5)
    probs = query.obsm["fm_cell_type_probabilities"]
    classes = list(query.uns["fm_cell_type_classes"])
    assert classes == sorted(set(reference.obs["cell_type"].astype(str)))
    assert probs.shape == (100, len(classes)) and np.allclose(probs.sum(1), 1, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(labels, dtype=str), np.asarray(classes)[probs.argmax(1)])
    assert "fm_cell_type" not in reference.obs and not reference.obsm, "the reference is not written to"
    assert (query.X != qry_x).nnz == 0 and (reference.X != ref_x).nnz == 0
    # self-transfer with k=1 returns each cell's own label (its nearest neighbour is itself)
    again = reference.copy()
    fm.transfer_labels(again, reference, model, k=1)
    agree = (again.obs["fm_cell_type"].astype(str) == reference.obs["cell_type"].astype(str)).mean()
    assert agree > 0.95, agree
    with pytest.raises(KeyError, match="celltype_l2"):
        fm.transfer_labels(query, reference, model, label_key="celltype_l2")


def test_balanced_class_weights_match_sklearn_and_weight_the_loss(tiny_model_dir, pbmc_small):
    from sklearn.utils.class_weight import compute_class_weight

    from fm.tasks.annotation import balanced_class_weights

    labels = np.array([0, 0, 0, 1, IGNORE_INDEX, 2, 2])
    w = balanced_class_weights(labels, 4)  # class 3 has no training cell
    known = labels[labels != IGNORE_INDEX]
    np.testing.assert_allclose(w[:3], compute_class_weight("balanced", classes=np.arange(3), y=known), rtol=1e-6)
    assert w[3] == w.max() and w[known].mean() == pytest.approx(1.0), "mean 1 over the labelled training cells"

    model, _ = _classifier(tiny_model_dir)
    model.eval()
    y = np.arange(24) % 3
    y[:12] = 0  # class 0 common, 1 and 2 rare
    batch = _batch(tiny_model_dir, pbmc_small[:24], y)
    batch["labels"][0] = IGNORE_INDEX
    cw = torch.from_numpy(balanced_class_weights(batch["labels"].numpy(), 3))
    per_cell = torch.where(batch["labels"] == IGNORE_INDEX, 0.0, cw[batch["labels"].clamp(min=0)])
    out = model(**batch, label_weights=per_cell)
    expected = torch.nn.functional.cross_entropy(out.logits, batch["labels"], weight=cw, ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(out.loss, expected)
    assert not torch.allclose(out.loss, model(**batch).loss), "the weights change the loss"
    with pytest.raises(ValueError, match="class_weighting"):
        load_config(recipe_path(RECIPE), ["task.class_weighting=inverse"])


@pytest.mark.parametrize("weighting", ["balanced", "none"])
def test_finetune_class_weights_reach_the_batches(weighting, tiny_model_dir, pbmc_small, tmp_path, caplog,
                                                  monkeypatch):
    """run(): weights from the training split only, logged, and in every training and held-out batch;
    with epochs + early stopping the run stops on the held-out loss and says why."""
    import fm.tasks.annotation as annotation

    seen, real = {}, annotation.train_task

    def spy(model, tokenizer, train_cells, val_cells, collator, cfg, *args):
        seen.update(train=train_cells, val=val_cells, collator=collator)
        return real(model, tokenizer, train_cells, val_cells, collator, cfg, *args)

    monkeypatch.setattr(annotation, "train_task", spy)
    fm.finetune(tiny_model_dir, pbmc_small, task="annotation", output_dir=tmp_path / "ft",
                overrides={"task.class_weighting": weighting, "task.min_cells_per_class": 1, "train.epochs": 40,
                           "train.max_steps": 400, "train.batch_size": 32, "train.eval_every": 2,
                           "train.early_stopping_patience": 2, "train.progress": False, "train.save_every": 0,
                           "train.lr": 3e-2, "data.max_genes": 32, "data.val_fraction": 0.2})
    batch = seen["collator"]([seen["val"][i] for i in range(8)])
    if weighting == "none":
        assert "label_weights" not in batch and "class weights" not in caplog.text
        return
    y = seen["train"].targets["label"]
    expected = annotation.balanced_class_weights(y, int(y.max()) + 1)
    labels = batch["labels"].numpy()
    np.testing.assert_allclose(batch["label_weights"].numpy(), expected[labels], rtol=1e-6)
    assert "class weights (task.class_weighting=balanced, from 160 labelled training cells)" in caplog.text
    assert "early stopping at step" in caplog.text and "exporting the best held-out weights" in caplog.text
    assert "train.epochs=40: 200 steps (5.0 per epoch" in caplog.text
