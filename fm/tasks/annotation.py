"""Cell-type annotation: obs[label_key] → ScFMForCellClassification fine-tuned by the one loop → export.

Labels: the classes are the sorted distinct non-missing values of obs[label_key] over all files
(classes with fewer than task.min_cells_per_class cells are dropped). Cells without a usable label
stay in the data but get IGNORE_INDEX, so the loss skips them; their count is logged.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fm.config import RunConfig
from fm.data import LabeledCellCollator, find_h5ad_files, open_anndata
from fm.heads import IGNORE_INDEX, ScFMForCellClassification
from fm.pretrain import export_pretrained
from fm.tokenizer import CellTokenizer, EncodedCells
from fm.train import TrainResult, make_accelerator, train

log = logging.getLogger("fm")


@dataclass
class LabeledCells:
    """EncodedCells rows plus an integer "label" per cell (IGNORE_INDEX = no label)."""

    cells: EncodedCells
    labels: np.ndarray  # int64 (n_cells,)

    def __len__(self) -> int:
        return len(self.cells)

    def __getitem__(self, i: int) -> dict:
        row = self.cells[i]
        row["label"] = int(self.labels[i])
        return row

    def subset(self, rows: np.ndarray) -> "LabeledCells":
        from fm.tokenizer import subset_cells
        return LabeledCells(subset_cells(self.cells, rows), self.labels[rows])


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


def load_labeled_cells(paths: list[Path], tokenizer: CellTokenizer, label_key: str,
                       min_cells: int) -> tuple[LabeledCells, list[str]]:
    """Tokenise every file (the checkpoint's tokenizer) and read its labels, cells aligned."""
    files = find_h5ad_files(paths)
    parts, names = [], []
    for f in files:
        adata = open_anndata(f)
        names.append(read_labels(adata.obs, label_key, str(f)))  # before the (slow) encoding: fail fast
        parts.append(tokenizer.encode(adata, source=str(f)))
        if adata.isbacked:
            adata.file.close()
    labels, classes = encode_classes(np.concatenate(names), min_cells, label_key)
    return LabeledCells(EncodedCells.concat(parts), labels), classes


def split(data: LabeledCells, val_fraction: float, seed: int) -> tuple[LabeledCells, LabeledCells | None]:
    """A fixed (seed) held-out fraction of cells, as pretraining's split_cells."""
    n_val = int(round(len(data) * val_fraction))
    if n_val == 0:
        return data, None
    order = np.random.default_rng(seed).permutation(len(data))
    return data.subset(np.sort(order[n_val:])), data.subset(np.sort(order[:n_val]))


def build_classifier(init_from: str, classes: list[str], cfg: RunConfig) -> ScFMForCellClassification:
    """Backbone from the checkpoint, a new classifier head; checks nothing but the head is new."""
    import torch
    torch.manual_seed(cfg.train.seed)  # same seed, same head init
    model, info = ScFMForCellClassification.from_pretrained(
        init_from, num_labels=len(classes), id2label=dict(enumerate(classes)),
        label2id={c: i for i, c in enumerate(classes)}, max_genes=cfg.data.max_genes, output_loading_info=True)
    # saved in config.json beside id2label: fm.annotate's defaults come from the model
    model.config.unknown_threshold = cfg.task.unknown_threshold
    model.config.label_key = cfg.task.label_key
    backbone_missing = [k for k in info["missing_keys"] if not k.startswith("classifier_head.")]
    if backbone_missing:
        raise ValueError(f"{init_from}: not an scfm checkpoint with a full backbone; missing {backbone_missing[:5]}")
    log.info("initialised from %s; new head: %d tensors", init_from, len(info["missing_keys"]))
    return model


def run_annotation(cfg: RunConfig, resume: bool = False) -> TrainResult:
    """The whole `fm finetune` job for task.name=annotation."""
    if not cfg.model.init_from:
        raise ValueError("fine-tuning needs a pretrained model: pass model.init_from=<exported model directory>")
    if not cfg.data.paths:
        raise ValueError("data.paths is empty: name the labelled .h5ad files")
    out = Path(cfg.train.output_dir)
    accelerator = make_accelerator(cfg.train)
    tokenizer = CellTokenizer.from_pretrained(cfg.model.init_from)
    data, classes = load_labeled_cells(cfg.data.resolved_paths(), tokenizer, cfg.task.label_key,
                                       cfg.task.min_cells_per_class)
    train_cells, val_cells = split(data, cfg.data.val_fraction, cfg.train.seed)
    model = build_classifier(cfg.model.init_from, classes, cfg)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / "config.yaml")
        counts = np.bincount(data.labels[data.labels >= 0], minlength=len(classes))
        log.info("%d training cells, %d held out; %d classes: %s", len(train_cells),
                 0 if val_cells is None else len(val_cells), len(classes),
                 ", ".join(f"{c} ({n})" for c, n in zip(classes, counts)))
    collator = LabeledCellCollator(n_bins=model.config.n_bins, max_genes=cfg.data.max_genes,
                                   seed=cfg.train.seed, pad_token_id=model.config.pad_token_id,
                                   zero_fraction=model.config.zero_fraction)
    result = train(model, train_cells, collator, cfg.train, eval_dataset=val_cells,
                   export=export_pretrained(tokenizer), resume=resume, accelerator=accelerator,
                   num_workers=cfg.data.num_workers)
    # one process only: a sharded (ZeRO-3) model cannot run forward on the main rank alone
    if val_cells is not None and not result.stopped and accelerator.num_processes == 1:
        accuracy, n = heldout_accuracy(accelerator.unwrap_model(result.model), val_cells, collator, cfg.train.batch_size)
        log.info("held-out accuracy %.4f on %d labelled cells", accuracy, n)
    return result


def heldout_accuracy(model, data: LabeledCells, collator, batch_size: int) -> tuple[float, int]:
    """Top-1 accuracy over the labelled held-out cells (no unknown threshold), and their count."""
    import torch
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = total = 0
    with torch.inference_mode():
        for lo in range(0, len(data), batch_size):
            batch = collator([data[i] for i in range(lo, min(lo + batch_size, len(data)))])
            labels = batch.pop("labels")
            pred = model(**{k: v.to(device) for k, v in batch.items()}).logits.argmax(-1).cpu()
            known = labels != IGNORE_INDEX
            correct += int((pred[known] == labels[known]).sum())
            total += int(known.sum())
    model.train(was_training)
    return (correct / total if total else float("nan")), total


__all__ = ["LabeledCells", "build_classifier", "heldout_accuracy", "encode_classes", "load_labeled_cells", "read_labels",
           "run_annotation", "split"]
