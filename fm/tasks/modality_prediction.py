"""Modality prediction, RNA → surface protein (CITE-seq): obsm[task.protein_key] → CLR targets →
ScFMForModalityPrediction fine-tuned by the one loop → export; fm.predict_protein applies it.

Targets: per-cell CLR of the ADT counts, exactly as the benchmark (fm/eval/tasks/modality_prediction.py;
both use fm.preprocessing.clr, and it imports `CONTROL_RE` from here): Seurat's CLR with margin = 2
(per cell; muon `prot.pp.clr(axis=1)`), log1p(counts / exp(mean log1p over *all* the cell's ADTs)). Isotype controls (names matching IgG/isotype/control)
enter that mean but are never a target: they measure background, not a protein of the cell.

Input rules:
- obsm[protein_key] a DataFrame (names = its columns, as scvi-tools / CITE-seq readers write it), or
  an array with names in uns["protein_names"]; an array without names is accepted with generated
  names protein_0… and a warning (scvi-tools does the same), since no isotype control can be found then.
- NaN or negative values are errors (raw, non-negative ADT counts expected; CLR/DSB values are not).
- Cells whose proteins are all zero have a defined CLR (every protein 0), but
  such a row almost always means a failed ADT capture or an RNA-only cell (totalVI reads it as
  "not measured"), so those cells are left out of fine-tuning, with a warning giving their count.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from fm.config import RunConfig, TaskConfig
from fm.data import LabeledCellCollator
from fm.heads.modality_prediction import ScFMForModalityPrediction
from fm.inference import run_batched
from fm.preprocessing import clr
from fm.tasks.common import (TaskCells, collator_kwargs, concat_targets, encode_with_targets, load_head,
                             load_task_cells, split_cells, train_task)
from fm.tokenizer import CellTokenizer
from fm.train import TrainResult

log = logging.getLogger("fm")

CONTROL_RE = re.compile(r"igg|isotype|control", re.IGNORECASE)
"""ADT names treated as isotype controls: in the CLR mean, never a target."""
NAMES_UNS_KEY = "protein_names"
"""uns key naming the columns of a protein array stored without names (scvi-tools' convention)."""


@dataclass
class ModalityPredictionConfig(TaskConfig):
    """task.name=modality_prediction: RNA → surface-protein (CLR) regression."""

    name: str = "modality_prediction"
    protein_key: str = "protein_counts"
    """obsm key of the surface-protein (ADT) counts to predict (CLR-normalised per cell)."""


def read_proteins(adata, key: str, source: str) -> tuple[np.ndarray, list[str]]:
    """obsm[key] as (cells × proteins float64 counts, names), checked (see the module docstring)."""
    if key not in adata.obsm:
        raise KeyError(f"{source}: obsm has no {key!r} to take protein counts from (obsm keys: {list(adata.obsm)}); "
                       "set task.protein_key to the obsm key holding the ADT counts")
    table = adata.obsm[key]
    if hasattr(table, "columns"):
        names, counts = [str(c) for c in table.columns], np.asarray(table.to_numpy(), dtype=np.float64)
    else:
        counts = np.asarray(table.toarray() if hasattr(table, "toarray") else table, dtype=np.float64)
        if NAMES_UNS_KEY in adata.uns and len(adata.uns[NAMES_UNS_KEY]) == counts.shape[1]:
            names = [str(n) for n in adata.uns[NAMES_UNS_KEY]]
        else:
            names = [f"protein_{i}" for i in range(counts.shape[1])]
            log.warning("%s: obsm[%r] is an array without protein names (no DataFrame columns, no uns[%r] of "
                        "matching length): naming them protein_0..protein_%d; isotype controls cannot be recognised",
                        source, key, NAMES_UNS_KEY, counts.shape[1] - 1)
    if counts.ndim != 2 or counts.shape[1] < 2:
        raise ValueError(f"{source}: obsm[{key!r}] has shape {counts.shape}; need cells × at least 2 proteins")
    bad = ~np.isfinite(counts)
    if bad.any():
        raise ValueError(f"{source}: obsm[{key!r}] has {int(bad.any(axis=1).sum())} cells with NaN/inf protein "
                         f"counts (proteins {sorted({names[j] for j in np.flatnonzero(bad.any(axis=0))})}); drop "
                         "those cells (adata[mask]) before fine-tuning")
    if counts.min() < 0:
        raise ValueError(f"{source}: obsm[{key!r}] has negative values ({int((counts < 0).sum())} entries); raw ADT "
                         "counts are expected (not CLR/DSB-normalised values): the targets are CLR-normalised here")
    return counts, names


def protein_targets(counts: np.ndarray, names: list[str]) -> tuple[np.ndarray, list[str], list[str]]:
    """CLR over all ADTs, then the isotype controls dropped: (targets, target names, control names)."""
    keep = [i for i, n in enumerate(names) if not CONTROL_RE.search(n)]
    if not keep:
        raise ValueError(f"every protein ({names}) looks like an isotype control: nothing to predict")
    return clr(counts)[:, keep].astype(np.float32), [names[i] for i in keep], [n for n in names if CONTROL_RE.search(n)]


def load_protein_cells(sources, tokenizer: CellTokenizer, key: str) -> tuple[TaskCells, list[str], list[str]]:
    """Tokenised cells with their CLR targets under "protein"; all-zero-protein cells removed.
    Every source must measure the same proteins (columns are aligned by name)."""
    names: list[str] = []

    def read(adata, source):
        counts, own = read_proteins(adata, key, source)
        if not names:
            names.extend(own)
        elif set(own) != set(names) or len(own) != len(names):
            raise ValueError(f"{source}: proteins {own} differ from the first file's {names}; fine-tune on files "
                             "measuring the same panel (or subset obsm[task.protein_key] to the shared columns)")
        counts = counts[:, [own.index(n) for n in names]]
        return {"counts": counts}

    cells, per_source = encode_with_targets(sources, tokenizer, read)
    counts = concat_targets(per_source)["counts"]
    targets, target_names, controls = protein_targets(counts, names)
    data = TaskCells(cells, {"protein": targets})
    empty = counts.sum(axis=1) == 0
    if empty.all():
        raise ValueError(f"every cell has zero counts in obsm[{key!r}]: nothing to learn from")
    if empty.any():
        log.warning("%d of %d cells have no protein counts at all (failed capture / not measured); they are left "
                    "out of fine-tuning", int(empty.sum()), len(empty))
        data = data.subset(np.flatnonzero(~empty))
    return data, target_names, controls


def build_protein_model(names: list[str], controls: list[str], train_targets: np.ndarray, cfg: RunConfig):
    """Backbone from model.init_from, a new protein head; names and the train cells' per-protein CLR
    mean/std (the head's standardisation) saved in config.json."""
    mean, std = train_targets.mean(axis=0), train_targets.std(axis=0)
    flat = [n for n, s in zip(names, std) if s < 1e-6]
    if flat:
        log.warning("proteins with a constant CLR over the training cells (predicted as that constant): %s", flat)
    std = np.where(std < 1e-6, 1.0, std)
    return load_head(ScFMForModalityPrediction, cfg, protein_names=list(names), isotype_controls=list(controls),
                     protein_mean=[float(v) for v in mean], protein_std=[float(v) for v in std],
                     protein_key=cfg.task.protein_key)


def run(cfg: RunConfig, resume: bool = False, adatas=None) -> TrainResult:
    """The whole `fm finetune` job for task.name=modality_prediction (files of data.paths, or `adatas`)."""
    accelerator, tokenizer, (data, names, controls) = load_task_cells(
        cfg, adatas, lambda sources, tokenizer: load_protein_cells(sources, tokenizer, cfg.task.protein_key))
    log.info("%d proteins to predict: %s%s", len(names), ", ".join(names),
             f" (isotype controls, in the CLR mean only: {', '.join(controls)})" if controls else "")
    train_cells, val_cells = split_cells(data, cfg.data.val_fraction, cfg.train.seed)
    model = build_protein_model(names, controls, train_cells.targets["protein"], cfg)
    collator = LabeledCellCollator(**collator_kwargs(model, cfg), targets={"protein": "labels"})
    result = train_task(model, tokenizer, train_cells, val_cells, collator, cfg, resume, accelerator)
    # one process only: a sharded (ZeRO-3) model cannot run forward on the main rank alone
    if val_cells is not None and not result.stopped and accelerator.num_processes == 1:
        r = heldout_pearson(accelerator.unwrap_model(result.model), val_cells, collator, cfg.train.batch_size)
        log.info("held-out per-protein Pearson %.4f on %d cells (%s)", float(np.mean(r)), len(val_cells),
                 ", ".join(f"{n} {v:.2f}" for n, v in zip(names, r)))
    return result


def heldout_pearson(model, data: TaskCells, collator, batch_size: int) -> np.ndarray:
    """Per-protein Pearson of predicted vs. target CLR over the held-out cells (0 where constant)."""
    import torch

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    preds = []
    with torch.inference_mode():
        for lo in range(0, len(data), batch_size):
            batch = collator([data[i] for i in range(lo, min(lo + batch_size, len(data)))])
            batch.pop("labels")
            preds.append(model(**{k: v.to(device) for k, v in batch.items()}).predictions.float().cpu().numpy())
    model.train(was_training)
    pred, true = np.concatenate(preds).astype(np.float64), data.targets["protein"].astype(np.float64)
    pred, true = pred - pred.mean(0), true - true.mean(0)
    den = np.sqrt((pred ** 2).sum(0) * (true ** 2).sum(0))
    return np.divide((pred * true).sum(0), den, out=np.zeros(den.shape), where=den > 1e-12)


def predict_protein(adata, model, key: str | None = None, batch_size: int = 64, chunk_size: int = 4096,
                    progress: bool = False, *, key_added: str | None = None, layer: str | None = None,
                    use_raw: bool = False, gene_key: str | None = None, allow_non_counts: bool | None = None,
                    copy: bool = False):
    """Predict each cell's surface proteins (CLR scale) with a fine-tuned protein head, into obsm[key].

    obsm[key] is a pandas DataFrame (index obs_names, columns = config.protein_names, float32) — the
    layout scvi-tools and CITE-seq readers use for obsm["protein_expression"], so names travel with the
    values through write_h5ad, and `adata.obsm[key]["CD4"]` works. Isotype controls are not predicted
    (model.config.isotype_controls lists them). Returns the DataFrame. Streams like fm.embed; X is never
    modified; deterministic; adata is written only at the end, so a failure leaves it as it was.

    scverse arguments (fm/scverse.py): counts from X, layers[layer] or .raw (use_raw); genes from var_names or
    var[gene_key]; key_added names the output (default "fm_protein"; `key` is its alias); copy=True returns a
    modified copy (copy=False returns the DataFrame); a view with copy=False is an error. Records
    adata.uns["fm"][key_added].
    """
    from fm.scverse import output_adata, record, start_call

    key, inputs = start_call(adata, copy, "fm.predict_protein", key_added, key, "fm_protein", layer, use_raw,
                             gene_key, allow_non_counts)
    if not hasattr(model, "protein_head"):
        raise ValueError(f"{type(model).__name__} has no protein head: load a model fine-tuned for modality "
                         "prediction (fm finetune recipes/finetune/modality_prediction.yaml …)")
    names = [str(n) for n in model.config.protein_names]
    out, _ = run_batched(adata, model, lambda m, batch: m(**batch).predictions, width=len(names), batch_size=batch_size,
                         chunk_size=chunk_size, progress=progress, desc="predict_protein", **inputs)
    frame = pd.DataFrame(out, index=pd.Index(adata.obs_names.copy()), columns=names)
    target = output_adata(adata, copy)
    target.obsm[key] = frame
    record(target, key, model, "fm.predict_protein", inputs)
    return target if copy else frame


__all__ = ["CONTROL_RE", "ModalityPredictionConfig", "build_protein_model", "clr", "heldout_pearson", "load_protein_cells", "predict_protein",
           "protein_targets", "read_proteins", "run"]
