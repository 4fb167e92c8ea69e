"""Cell-type annotation: obs[label_key] → ScFMForAnnotation fine-tuned by the one loop → export;
fm.annotate applies it, fm.transfer_labels annotates zero-shot (kNN vote in embedding space).

Labels: the classes are the sorted distinct non-missing values of obs[label_key] over all files
(classes with fewer than task.min_cells_per_class cells are dropped). Cells without a usable label
stay in the data but get IGNORE_INDEX, so the loss skips them; their count is logged.

Class weighting (task.class_weighting, default balanced): plain cross-entropy let a few-cell class
(pbmc3k's DC, Platelet) be ignored — F1 0 — because it hardly moves the mean loss. Each labelled cell
is weighted by its class's sklearn-style balanced weight, computed on the training split only and
logged; the held-out loss (early stopping's default signal) is weighted alike, so it tracks a
balanced error like macro-F1. The weights travel as a per-cell target (`label_weights` in the batch),
not inside the model: the export holds no trace of them.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from fm.config import RunConfig, TaskConfig
from fm.data import LabeledCellCollator
from fm.heads import IGNORE_INDEX
from fm.heads.annotation import ScFMForAnnotation
from fm.inference import cell_embeddings, run_batched, write_labels
from fm.tasks.common import (TaskCells, collator_kwargs, concat_targets, encode_with_targets, load_head,
                             load_task_cells, split_cells, train_task)
from fm.tokenizer import CellTokenizer
from fm.train import TrainResult

log = logging.getLogger("fm")


@dataclass
class AnnotationConfig(TaskConfig):
    """task.name=annotation: a classifier of obs[label_key]."""

    name: str = "annotation"
    label_key: str = "cell_type"
    """obs column holding each cell's label; missing values (NaN/empty) are left out of the loss."""
    min_cells_per_class: int = 1
    """Classes with fewer labelled cells than this are treated as missing labels (and reported)."""
    unknown_threshold: float = 0.5
    """fm.annotate calls a cell 'unknown' when its top class probability is below this (saved in the model)."""
    class_weighting: str = "balanced"
    """Loss weight per class: 'balanced' (∝ 1 / its training-split frequency, sklearn's class_weight='balanced':
    mean 1 over training cells; logged) or 'none' (plain cross-entropy: rare classes can be ignored)."""

    def __post_init__(self):
        if self.class_weighting not in ("balanced", "none"):
            raise ValueError(f"task.class_weighting must be 'balanced' or 'none', got {self.class_weighting!r}")
        if self.min_cells_per_class < 1:
            raise ValueError(f"task.min_cells_per_class must be >= 1, got {self.min_cells_per_class}")
        if not 0.0 <= self.unknown_threshold <= 1.0:
            raise ValueError(f"task.unknown_threshold must be in [0, 1], got {self.unknown_threshold}")


def read_labels(obs: pd.DataFrame, label_key: str, source: str) -> np.ndarray:
    """obs[label_key] as an object array of str, None where missing (NaN, None, empty/blank)."""
    if label_key not in obs.columns:
        raise KeyError(f"{source}: no obs column {label_key!r} to take cell labels from (obs has "
                       f"{list(obs.columns)}); set task.label_key to the column holding the cell types")
    column = obs[label_key]
    missing = column.isna().to_numpy()
    values = column.astype(object).to_numpy()
    out = np.array([None if m or not str(v).strip() else str(v) for v, m in zip(values, missing)], dtype=object)
    return out


def encode_classes(names: np.ndarray, min_cells: int, label_key: str) -> tuple[np.ndarray, list[str]]:
    """Label names (None = missing) → (int labels with IGNORE_INDEX, class names); errors when < 2 classes."""
    known = names[names != None]  # noqa: E711 (elementwise on an object array)
    classes, counts = np.unique(known.astype(str), return_counts=True) if known.size else (np.array([]), np.array([]))
    rare = classes[counts < min_cells]
    if rare.size:
        log.warning("task.min_cells_per_class=%d: %d class(es) with fewer cells are left out of the loss: %s",
                    min_cells, rare.size, ", ".join(f"{c} ({n})" for c, n in zip(classes, counts) if n < min_cells))
    classes = [str(c) for c in classes[counts >= min_cells]]
    if len(classes) < 2:
        raise ValueError(f"obs[{label_key!r}] has {len(classes)} usable class(es) {classes} — a classifier needs at "
                         "least 2. Set task.label_key to a column with several cell types, add cells of other "
                         "types, or lower task.min_cells_per_class")
    index = {c: i for i, c in enumerate(classes)}
    labels = np.array([index.get(n, IGNORE_INDEX) if n is not None else IGNORE_INDEX for n in names], dtype=np.int64)
    n_missing = int((names == None).sum())  # noqa: E711
    n_ignored = int((labels == IGNORE_INDEX).sum())
    if n_ignored:
        log.warning("%d of %d cells have no usable obs[%r] label (%d missing/empty, %d in dropped classes); they "
                    "are ignored in the loss", n_ignored, len(labels), label_key, n_missing, n_ignored - n_missing)
    return labels, classes


def load_labeled_cells(sources, tokenizer: CellTokenizer, label_key: str,
                       min_cells: int) -> tuple[TaskCells, list[str]]:
    """Tokenise every (AnnData, source) pair (the checkpoint's tokenizer) and read its labels, cells aligned."""
    cells, per_source = encode_with_targets(
        sources, tokenizer, lambda adata, source: {"name": read_labels(adata.obs, label_key, source)})
    labels, classes = encode_classes(concat_targets(per_source)["name"], min_cells, label_key)
    return TaskCells(cells, {"label": labels}), classes


def balanced_class_weights(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """sklearn's class_weight='balanced' over the labelled cells: w_c = n / (K · n_c), K = classes present,
    so the mean weight over those cells is 1. A class with no cell here (all its cells held out) gets the
    largest weight (it is at least that rare)."""
    known = labels[labels != IGNORE_INDEX]
    counts = np.bincount(known, minlength=n_classes)
    present = counts > 0
    weights = np.ones(n_classes, dtype=np.float64)
    weights[present] = len(known) / (present.sum() * counts[present])
    weights[~present] = weights[present].max() if present.any() else 1.0
    return weights.astype(np.float32)


def add_class_weights(train_cells: TaskCells, val_cells: TaskCells | None, classes: list[str],
                      weighting: str) -> dict[str, str]:
    """task.class_weighting: weights from the training split, logged, set as each cell's `label_weight`
    target (train and held-out cells alike). Returns the collator's targets mapping."""
    if weighting == "none":
        return {"label": "labels"}
    labels = train_cells.targets["label"]
    weights = balanced_class_weights(labels, len(classes))
    counts = np.bincount(labels[labels != IGNORE_INDEX], minlength=len(classes))
    log.info("class weights (task.class_weighting=%s, from %d labelled training cells): %s", weighting,
             int(counts.sum()), ", ".join(f"{c} {w:.3g} (n={n})" for c, w, n in zip(classes, weights, counts)))
    if (counts == 0).any():
        log.warning("class(es) with no training cell (all held out): %s", [c for c, n in zip(classes, counts) if not n])
    for part in (train_cells, val_cells):
        if part is not None:
            y = part.targets["label"]
            part.targets["label_weight"] = np.where(y == IGNORE_INDEX, 0.0, weights[np.clip(y, 0, None)]).astype(np.float32)
    return {"label": "labels", "label_weight": "label_weights"}


def build_classifier(classes: list[str], cfg: RunConfig) -> ScFMForAnnotation:
    """Backbone from model.init_from, a new classifier head; class names and fm.annotate's defaults
    (unknown_threshold, label_key) saved in config.json."""
    return load_head(ScFMForAnnotation, cfg, num_labels=len(classes), id2label=dict(enumerate(classes)),
                     label2id={c: i for i, c in enumerate(classes)}, unknown_threshold=cfg.task.unknown_threshold,
                     label_key=cfg.task.label_key)


def run(cfg: RunConfig, resume: bool = False, adatas=None) -> TrainResult:
    """The whole `fm finetune` job for task.name=annotation (files of data.paths, or `adatas`)."""
    accelerator, tokenizer, (data, classes) = load_task_cells(
        cfg, adatas, lambda sources, tokenizer: load_labeled_cells(sources, tokenizer, cfg.task.label_key,
                                                                   cfg.task.min_cells_per_class))
    train_cells, val_cells = split_cells(data, cfg.data.val_fraction, cfg.train.seed)
    model = build_classifier(classes, cfg)
    counts = np.bincount(data.targets["label"][data.targets["label"] >= 0], minlength=len(classes))
    log.info("%d classes: %s", len(classes), ", ".join(f"{c} ({n})" for c, n in zip(classes, counts)))
    targets = add_class_weights(train_cells, val_cells, classes, cfg.task.class_weighting)
    collator = LabeledCellCollator(**collator_kwargs(model, cfg), targets=targets)
    result = train_task(model, tokenizer, train_cells, val_cells, collator, cfg, resume, accelerator)
    # one process only: a sharded (ZeRO-3) model cannot run forward on the main rank alone
    if val_cells is not None and not result.stopped and accelerator.num_processes == 1:
        scores = heldout_scores(accelerator.unwrap_model(result.model), val_cells, collator, cfg.train.batch_size)
        log.info("held-out accuracy %.4f, macro-F1 %.4f on %d labelled cells", scores["accuracy"],
                 scores["macro_f1"], scores["n"])
        result.heldout.update(scores)
    return result


def heldout_scores(model, data: TaskCells, collator, batch_size: int) -> dict[str, float]:
    """Top-1 accuracy and macro-F1 (over the classes present in these cells) of the labelled held-out
    cells (no unknown threshold), and their count `n`. numpy only: the core install has no sklearn."""
    import torch
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    truth, preds = [], []
    with torch.inference_mode():
        for lo in range(0, len(data), batch_size):
            batch = collator([data[i] for i in range(lo, min(lo + batch_size, len(data)))])
            labels = batch.pop("labels")
            batch.pop("label_weights", None)
            pred = model(**{k: v.to(device) for k, v in batch.items()}).logits.argmax(-1).cpu()
            known = labels != IGNORE_INDEX
            truth.append(labels[known].numpy())
            preds.append(pred[known].numpy())
    model.train(was_training)
    y, p = (np.concatenate(truth), np.concatenate(preds)) if truth else (np.array([], int), np.array([], int))
    if not len(y):
        return {"accuracy": float("nan"), "macro_f1": float("nan"), "n": 0}
    f1 = []
    for c in np.unique(y):
        tp, fp, fn = np.sum((p == c) & (y == c)), np.sum((p == c) & (y != c)), np.sum((p != c) & (y == c))
        f1.append(2 * tp / max(2 * tp + fp + fn, 1))
    return {"accuracy": float(np.mean(y == p)), "macro_f1": float(np.mean(f1)), "n": int(len(y))}


def transfer_labels(query, reference, model, label_key: str = "cell_type", k: int = 15, key: str | None = None,
                    threshold: float = 0.0, batch_size: int = 64, progress: bool = False, *,
                    key_added: str | None = None, layer: str | None = None,
                    use_raw: bool = False, gene_key: str | None = None, allow_non_counts: bool | None = None,
                    copy: bool = False):
    """Zero-shot annotation: each query cell takes the similarity-weighted vote of its k nearest
    reference cells (cosine, in the model's embedding space) — no fine-tuning, any checkpoint.

    Writes the same fields as fm.annotate (obs[key], obs[key + "_confidence"] = winning vote share,
    obsm[key + "_probabilities"] = vote shares, uns[key + "_classes"]); cells whose share is below
    `threshold` are "unknown". Reference cells without a label are left out. Neither AnnData's X
    changes and the reference is not written to. Exact search in torch, chunked over query cells
    (no scikit-learn needed: the core install has none).

    scverse arguments (fm/scverse.py): layer / use_raw / gene_key / allow_non_counts apply to both AnnData;
    key_added names the output (default "fm_cell_type"; `key` is its alias); copy=True returns a modified copy
    of the query (copy=False returns the labels); a query view with copy=False is an error. Records
    query.uns["fm"][key_added].
    """
    import torch

    from fm.scverse import output_adata, record, start_call

    key, inputs = start_call(query, copy, "fm.transfer_labels", key_added, key, "fm_cell_type", layer, use_raw,
                             gene_key, allow_non_counts)

    names = read_labels(reference.obs, label_key, "reference")
    known = np.flatnonzero(names != None)  # noqa: E711
    classes = sorted(set(names[known].astype(str)))
    if len(classes) < 1:
        raise ValueError(f"reference obs[{label_key!r}] has no labels to transfer")
    if not 1 <= k:
        raise ValueError(f"k must be >= 1, got {k}")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")

    def embed(adata, desc):
        out = cell_embeddings(adata, model, batch_size=batch_size, progress=progress, desc=desc, **inputs)
        return torch.nn.functional.normalize(torch.from_numpy(out), dim=1)
    ref = embed(reference, "reference")[known]
    qry = embed(query, "query")
    target = torch.tensor([classes.index(str(n)) for n in names[known]])
    k = min(k, len(known))
    probs = np.zeros((query.n_obs, len(classes)), dtype=np.float32)
    for lo in range(0, query.n_obs, 4096):
        sim, idx = (qry[lo:lo + 4096] @ ref.T).topk(k, dim=1)
        votes = torch.zeros(len(sim), len(classes)).scatter_add_(1, target[idx], sim.clamp(min=0) + 1e-6)
        probs[lo:lo + len(sim)] = (votes / votes.sum(1, keepdim=True)).numpy()
    target = output_adata(query, copy)
    labels = write_labels(target, key, probs, classes, threshold)
    record(target, key, model, "fm.transfer_labels", {**inputs, "label_key": label_key, "k": k, "threshold": threshold})
    return target if copy else labels


def annotate(adata, model, key: str | None = None, threshold: float | None = None, batch_size: int = 64,
             chunk_size: int = 4096, progress: bool = False, *, key_added: str | None = None, layer: str | None = None,
             use_raw: bool = False, gene_key: str | None = None, allow_non_counts: bool | None = None,
             copy: bool = False):
    """Predict each cell's class with a fine-tuned classifier (`fm finetune`, task annotation).

    Writes, and returns the labels of:
      obs[key]                     predicted class name, "unknown" where confidence < threshold
      obs[key + "_confidence"]     top class probability (float32)
      obsm[key + "_probabilities"] cells × classes softmax probabilities (float32)
      uns[key + "_classes"]        class names, the column order of the probabilities
    threshold None = the model's `config.unknown_threshold` (task.unknown_threshold at fine-tuning);
    0 never says "unknown". Streams like fm.embed; X is never modified; deterministic.
    adata is written only at the end, so a failure leaves it as it was.

    scverse arguments (fm/scverse.py): counts from X, layers[layer] or .raw (use_raw); genes from var_names or
    var[gene_key]; key_added names the output (default "fm_cell_type"; `key` is its alias); copy=True returns a
    modified copy (copy=False returns the labels); a view with copy=False is an error. Records
    adata.uns["fm"][key_added].
    """
    import torch

    from fm.scverse import output_adata, record, start_call

    key, inputs = start_call(adata, copy, "fm.annotate", key_added, key, "fm_cell_type", layer, use_raw,
                             gene_key, allow_non_counts)
    if not hasattr(model, "classifier_head"):
        raise ValueError(f"{type(model).__name__} has no classifier head: load a model fine-tuned for annotation "
                         "(fm finetune recipes/finetune/annotation.yaml …)")
    id2label = model.config.id2label or {}
    classes = [str(id2label[i]) for i in range(len(id2label))]
    threshold = float(model.config.unknown_threshold if threshold is None else threshold)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    probs, _ = run_batched(adata, model, lambda m, batch: torch.softmax(m(**batch).logits.float(), dim=-1),
                           width=len(classes), batch_size=batch_size, chunk_size=chunk_size, progress=progress,
                           desc="annotate", **inputs)
    target = output_adata(adata, copy)
    labels = write_labels(target, key, probs, classes, threshold)
    record(target, key, model, "fm.annotate", {**inputs, "threshold": threshold})
    return target if copy else labels


__all__ = ["AnnotationConfig", "annotate", "build_classifier", "add_class_weights", "balanced_class_weights", "encode_classes", "heldout_scores", "load_labeled_cells", "read_labels", "run",
           "transfer_labels"]
