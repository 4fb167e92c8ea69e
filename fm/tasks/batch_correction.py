"""Batch correction: obs[batch_key] → ScFMForBatchCorrection fine-tuned by the one loop → fm.integrate.

Integration is unsupervised: the fine-tuning sees every cell to be integrated with its batch label
and nothing else (no cell types). The batch becomes a condition token — the checkpoint's
tokenizer gets task.batch_key appended to its condition keys, with the batches of the fine-tuning
data as categories (id 0 = unknown), and the model a new condition table for it
(scfm.embeddings.conditions.<i>, the one backbone tensor the pretrained weights lack). A
checkpoint that already has conditions keeps them. The objective (reconstruction + adversarial
batch discriminator + elastic cell similarity) is documented in fm/heads/batch_correction.py.

fm.integrate(adata, model) then writes the fine-tuned model's cell embeddings to
obsm["X_fm_integrated"]; batches it was not fine-tuned on use the unknown batch token (the
tokenizer warns), which training keeps meaningful by replacing a share (task.batch_dropout) of
the training cells' batch tokens with it.
"""
from __future__ import annotations

import copy as _copy

import logging
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from fm.config import RunConfig, TaskConfig
from fm.data.collator import CellCollator, hashed_uniform
from fm.heads import IGNORE_INDEX
from fm.heads.batch_correction import ScFMForBatchCorrection
from fm.inference import cell_embeddings
from fm.tasks.common import (TaskCells, collator_kwargs, encode_with_targets, load_head, load_task_cells,
                             split_cells, train_task)
from fm.tokenizer import UNKNOWN_CONDITION, CellTokenizer
from fm.train import TrainResult

log = logging.getLogger("fm")

NEW_TABLE = "scfm.embeddings.conditions.{}."
"""Weights of the batch condition table the task adds (absent from the pretrained checkpoint)."""


@dataclass
class BatchCorrectionConfig(TaskConfig):
    """task.name=batch_correction: scGPT's integration objective with the batch as a condition token."""

    name: str = "batch_correction"
    batch_key: str = "batch"
    """obs column naming each cell's batch (a condition token and the discriminator's target)."""
    dar_weight: float = 1.0
    """Weight of the adversarial batch terms: discriminator cross-entropy + the backbone's confusion loss
    (scGPT's DAR with a confusion target instead of gradient reversal: fm/heads/batch_correction.py says why)."""
    adversary: str = "confusion"
    """'confusion' (discriminator vs a uniform-prediction target; stops at chance) or 'reversal' (scGPT's
    gradient-reversal layer, for comparison: fm/heads/batch_correction.py)."""
    ecs_weight: float = 10.0
    """Weight of the elastic cell-similarity loss (scGPT's ECS); 0 disables it."""
    ecs_threshold: float = 0.8
    """ECS pushes cell-embedding cosine similarities below this and pulls those above it up (scGPT's 0.8)."""
    batch_dropout: float = 0.1
    """Share of training cells whose batch token is the unknown token, which fm.integrate gives unseen batches."""

    def __post_init__(self):
        if not 0.0 <= self.batch_dropout < 1.0:
            raise ValueError(f"task.batch_dropout must be in [0, 1), got {self.batch_dropout}")
        if self.adversary not in ("confusion", "reversal"):
            raise ValueError(f"task.adversary must be 'confusion' or 'reversal', got {self.adversary!r}")
        for name in ("dar_weight", "ecs_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"task.{name} must be >= 0, got {getattr(self, name)}")


def read_batches(obs: pd.DataFrame, batch_key: str, source: str) -> pd.Series:
    """obs[batch_key] as strings; a missing column or missing values are errors that say what to do."""
    if batch_key not in obs.columns:
        raise KeyError(f"{source}: no obs column {batch_key!r} to take batches from (obs has {list(obs.columns)}); "
                       "set task.batch_key (fm.integrate: batch_key=) to the column naming each cell's batch")
    column = obs[batch_key]
    missing = column.isna().to_numpy() | (column.astype(str).str.strip() == "").to_numpy()
    if missing.any():
        raise ValueError(f"{source}: obs[{batch_key!r}] is missing for {int(missing.sum())} of {len(obs)} cells "
                         f"(e.g. {obs.index[missing][:3].tolist()}); give them a batch name or drop those cells")
    return column.astype(str)


@dataclass
class BatchCorrectionCollator(CellCollator):
    """Pretraining-style masked batches plus `batch_labels` (B,) = the true batch index of each cell.

    The batch token (column `batch_column` of condition_ids) is replaced by the unknown token (0)
    for a `batch_dropout` share of cells, drawn from a hash of (seed, epoch, cell) like every other
    random choice of the collators, so fm.integrate's unknown token for unseen batches is trained.
    batch_labels keep the true batch (IGNORE_INDEX where unknown) for the discriminator and MVC.
    """

    batch_column: int = 0
    batch_dropout: float = 0.1

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = super().__call__(rows)
        ids = batch["condition_ids"][:, self.batch_column]
        batch["batch_labels"] = torch.where(ids > 0, ids - 1, torch.full_like(ids, IGNORE_INDEX))
        if self.train and self.batch_dropout > 0:
            index = np.array([r["index"] for r in rows], dtype=np.int64)
            drop = hashed_uniform(self.seed, self.epoch, index, np.zeros_like(index), salt=5) < self.batch_dropout
            batch["condition_ids"] = batch["condition_ids"].clone()
            batch["condition_ids"][torch.from_numpy(drop), self.batch_column] = 0
        return batch


def add_batch_condition(tokenizer: CellTokenizer, batches: list[str], batch_key: str) -> int:
    """Make batch_key a condition of `tokenizer` with `batches` as categories; returns its column.

    Only the batch key is fitted: the checkpoint's own conditions keep their categories (their
    tables are pretrained weights of fixed size). A checkpoint that already conditions on
    batch_key (re-fine-tuning an integrated model) keeps its table, so every batch must be known to it.
    """
    if batch_key in tokenizer.condition_keys:
        known = tokenizer.condition_categories.get(batch_key, [UNKNOWN_CONDITION])
        new = sorted(set(batches) - set(known))
        if new:
            raise ValueError(f"the checkpoint already has a {batch_key!r} condition (batches {known[1:]}) and cannot "
                             f"learn new ones {new[:5]}; fine-tune from the pretrained checkpoint instead")
        return tokenizer.condition_keys.index(batch_key)
    tokenizer.condition_keys.append(batch_key)
    tokenizer.condition_categories[batch_key] = [UNKNOWN_CONDITION] + sorted(set(batches))
    return len(tokenizer.condition_keys) - 1


def load_batch_cells(sources, tokenizer: CellTokenizer, batch_key: str) -> tuple[TaskCells, int]:
    """Check every source's batch column (before any tokenising), fit the batch condition, encode."""
    batches = [read_batches(adata.obs, batch_key, source) for adata, source in sources]
    names = sorted(set().union(*(set(b.unique()) for b in batches)))
    if len(names) < 2:
        where = ", ".join(source for _, source in sources)
        raise ValueError(f"{where}: obs[{batch_key!r}] holds a single batch {names} — nothing to correct. Set "
                         "task.batch_key to the column that tells the batches apart, or add cells of other batches")
    column = add_batch_condition(tokenizer, names, batch_key)
    cells, _ = encode_with_targets(sources, tokenizer)
    counts = pd.Series(np.concatenate([b.to_numpy() for b in batches])).value_counts().sort_index()
    log.info("%d batches in obs[%r]: %s", len(names), batch_key, ", ".join(f"{b} ({n})" for b, n in counts.items()))
    return TaskCells(cells), column


def build_integration_model(tokenizer: CellTokenizer, cfg: RunConfig, column: int) -> ScFMForBatchCorrection:
    """Backbone of model.init_from with the batch condition table added; heads (and loss weights,
    batch_key for fm.integrate) in config.json."""
    from transformers import AutoConfig

    pretrained = AutoConfig.from_pretrained(cfg.model.init_from)
    sizes = tokenizer.condition_vocab_sizes()
    new = () if column < len(pretrained.condition_keys) else (NEW_TABLE.format(column),)
    return load_head(ScFMForBatchCorrection, cfg, new_backbone_keys=new, condition_keys=list(tokenizer.condition_keys),
                     condition_vocab_sizes=sizes, batch_key=cfg.task.batch_key, num_batches=sizes[column] - 1,
                     dar_weight=cfg.task.dar_weight, adversary=cfg.task.adversary, ecs_weight=cfg.task.ecs_weight,
                     ecs_threshold=cfg.task.ecs_threshold)


def run(cfg: RunConfig, resume: bool = False, adatas=None) -> TrainResult:
    """The whole `fm finetune` job for task.name=batch_correction (files of data.paths, or `adatas`)."""
    accelerator, tokenizer, (data, column) = load_task_cells(
        cfg, adatas, lambda sources, tokenizer: load_batch_cells(sources, tokenizer, cfg.task.batch_key))
    train_cells, val_cells = split_cells(data, cfg.data.val_fraction, cfg.train.seed)
    model = build_integration_model(tokenizer, cfg, column)
    collator = BatchCorrectionCollator(mask_ratio=cfg.data.mask_ratio, train=True, batch_column=column,
                                        batch_dropout=cfg.task.batch_dropout, **collator_kwargs(model, cfg))
    return train_task(model, tokenizer, train_cells, val_cells, collator, cfg, resume, accelerator)


# ----------------------------------------------------------------------------- fm.integrate

@contextmanager
def _batch_column_named(model, batch_key: str):
    """Let the model's tokenizer read the batch from obs[batch_key] (renamed for the call, restored after)."""
    tokenizer = model.cell_tokenizer
    trained = model.config.batch_key
    if batch_key == trained:
        yield
        return
    renamed = _copy.copy(tokenizer)  # every other setting (gene table, imported gene names) kept
    renamed.condition_keys = [batch_key if k == trained else k for k in tokenizer.condition_keys]
    renamed.condition_categories = {(batch_key if k == trained else k): v
                                    for k, v in tokenizer.condition_categories.items()}
    model.cell_tokenizer = renamed
    try:
        yield
    finally:
        model.cell_tokenizer = tokenizer


def integrate(adata, model, batch_key: str | None = None, key: str | None = None, batch_size: int = 64,
              chunk_size: int = 4096, progress: bool = False, drop_empty: bool = False, *,
              key_added: str | None = None, layer: str | None = None, use_raw: bool = False,
              gene_key: str | None = None, allow_non_counts: bool | None = None, copy: bool = False):
    """Batch-corrected cell embeddings (cells × d_model, float32) into `adata.obsm[key]`, and returned.

    model: fm.load of a checkpoint fine-tuned for batch_correction (`fm finetune
    recipes/finetune/batch_correction.yaml …` or fm.finetune(…, task="batch_correction")).
    batch_key: obs column of the batches (default: the column the model was fine-tuned with);
    batches the model has not seen use its unknown batch token (logged). A plain pretrained
    checkpoint has no batch correction: its zero-shot embedding (fm.embed) is written instead, with
    a warning, so a foundation model's zero-shot integration stays one call away.
    Also writes uns[key] = {"params": {"batch_key", "fine_tuned"}}. Streams like fm.embed; X is
    never modified; deterministic; adata is written only at the end (a failure leaves it as it was).
    drop_empty: cells without any vocabulary gene get NaN rows instead of an error.

    scverse arguments (fm/scverse.py): counts from X, layers[layer] or .raw (use_raw); genes from var_names or
    var[gene_key]; key_added names the output (default "X_fm_integrated"; `key` is its alias); copy=True returns
    a modified copy (copy=False returns the embedding); a view with copy=False is an error. Records
    adata.uns["fm"][key_added].
    """
    from fm.scverse import output_adata, record, start_call

    key, inputs = start_call(adata, copy, "fm.integrate", key_added, key, "X_fm_integrated", layer, use_raw,
                             gene_key, allow_non_counts)
    fine_tuned = isinstance(model, ScFMForBatchCorrection)
    renamed = nullcontext()
    if fine_tuned:
        batch_key = batch_key or model.config.batch_key
        read_batches(adata.obs, batch_key, "adata")
        renamed = _batch_column_named(model, batch_key)
    else:
        log.warning("%s is not fine-tuned for batch correction: writing its zero-shot cell embedding to obsm[%r] "
                    "(batch_key unused). Fine-tune first: fm finetune recipes/finetune/batch_correction.yaml "
                    "model.init_from=<checkpoint>", type(model).__name__, key)
    with renamed:
        out = cell_embeddings(adata, model, batch_size=batch_size, chunk_size=chunk_size, progress=progress,
                              drop_empty=drop_empty, desc="integrate", **inputs)
    target = output_adata(adata, copy)
    target.obsm[key] = out
    target.uns[key] = {"params": {"batch_key": batch_key if fine_tuned else None, "fine_tuned": fine_tuned}}
    record(target, key, model, "fm.integrate", {**inputs, "batch_key": batch_key if fine_tuned else None,
                                                "drop_empty": drop_empty})
    return target if copy else out


__all__ = ["BatchCorrectionCollator", "BatchCorrectionConfig", "add_batch_condition", "build_integration_model", "integrate",
           "load_batch_cells", "read_batches", "run"]
