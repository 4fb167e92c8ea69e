"""Imputation / denoising: fine-tune ScFMForImputation (`fm finetune`, task imputation)
and write every gene's predicted expression into AnnData (`fm.impute`).

Scale. Targets and predictions are log1p(count / library · 1e4), the library being the cell's total
count over ALL genes of its file (not only vocabulary genes), so values match scanpy's
normalize_total(1e4) + log1p of the same file. 'normalized' output is expm1 of that.

Objective (masked values, noise2self-style). Per cell, a random fraction data.mask_ratio of its
MEASURED genes (the file's vocabulary genes) is held out: the held-out expressed genes are removed
from the input — so the model sees them as zeros, exactly as it sees a dropout — and every held-out
gene is scored against its true value (0 for the unexpressed ones, so the model learns what is
off). Held-out genes are an unbiased sample of the cell's profile, so the loss estimates the MSE
over all genes; at most `max_targets` of each kind are scored, reweighted to keep it unbiased.
Nothing the model is scored on is in its input, so it cannot learn the identity.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fm.config import RunConfig, TaskConfig
from fm.data.collator import CellCollator, hashed_uniform
from fm.heads.imputation import ScFMForImputation
from fm.inference import model_device, run_batched
from fm.preprocessing import TARGET_SUM
from fm.tasks.common import (TaskCells, collator_kwargs, concat_targets, encode_with_targets, load_head,
                             load_task_cells, split_cells, train_task)
from fm.tokenizer import CellTokenizer
from fm.train import TrainResult

log = logging.getLogger("fm")

SCALES = ("log1p", "normalized")


@dataclass
class ImputationConfig(TaskConfig):
    """task.name=imputation: a gene-query decoder of every gene's expression."""

    name: str = "imputation"
    target_scale: str = "log1p"
    """Scale the imputation head predicts and fm.impute writes: 'log1p' (log1p of counts per 1e4) or 'normalized'."""

    def __post_init__(self):
        if self.target_scale not in SCALES:
            raise ValueError(f"task.target_scale must be 'log1p' or 'normalized', got {self.target_scale!r}")


def _pad(parts: list[np.ndarray], width: int, fill, dtype) -> np.ndarray:
    out = np.full((len(parts), width), fill, dtype=dtype)
    for i, p in enumerate(parts):
        out[i, :len(p)] = p
    return out


def _take(genes: np.ndarray, values: np.ndarray, u: np.ndarray, cap: int):
    """At most `cap` held-out genes (the smallest draws u: a uniform subset), each weighted
    n_held / n_taken so the weighted loss still estimates the mean over all held-out genes."""
    if len(genes) > cap:
        keep = np.argsort(u, kind="stable")[:cap]
        return genes[keep], values[keep], np.full(cap, len(genes) / cap, np.float32)
    return genes, values, np.ones(len(genes), np.float32)


@dataclass
class ImputationCollator(CellCollator):
    """Rows {gene_ids, counts, conditions, index, library[, panel]} → the cell with its held-out
    genes removed (chosen as at inference: most expressed genes, panel zeros) + the scored genes:
    target_gene_ids, labels (log1p-normalised truth), label_weights (B, K).

    Held-out genes depend only on (seed, epoch, cell index, gene), like every draw of CellCollator.
    Without a panel (rows lacking `panel`) only expressed genes can be held out and scored.
    """

    train: bool = False
    target_sum: float = TARGET_SUM
    max_targets: int = 0
    """Scored genes per cell and kind (expressed, unexpressed); 0 = max_genes."""

    def __post_init__(self):
        if self.train:
            raise ValueError("ImputationCollator holds genes out itself; the input is built as at inference "
                             "(train=False)")

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        cap = self.max_targets or self.max_genes
        visible, genes_out, values_out, weights_out = [], [], [], []
        for r in rows:
            genes, counts = np.asarray(r["gene_ids"], np.int64), np.asarray(r["counts"], np.float32)
            u = hashed_uniform(self.seed, self.epoch, np.full(len(genes), r["index"]), genes, salt=5)
            hide = u < self.mask_ratio
            if hide.all() and len(hide):
                hide[np.argmax(u)] = False  # keep one gene: a cell needs input to be embedded
            norm = self.target_sum / float(r["library"])
            parts = [_take(genes[hide], np.log1p(counts[hide] * norm).astype(np.float32), u[hide], cap)]
            panel = r.get("panel")
            if panel is not None:
                off = panel[~np.isin(panel, genes, assume_unique=True)].astype(np.int64)
                uz = hashed_uniform(self.seed, self.epoch, np.full(len(off), r["index"]), off, salt=6)
                held = uz < self.mask_ratio
                parts.append(_take(off[held], np.zeros(int(held.sum()), np.float32), uz[held], cap))
            genes_out.append(np.concatenate([p[0] for p in parts]))
            values_out.append(np.concatenate([p[1] for p in parts]))
            weights_out.append(np.concatenate([p[2] for p in parts]))
            visible.append({**r, "gene_ids": genes[~hide], "counts": counts[~hide]})
        batch = super().__call__(visible)
        width = max(max(len(g) for g in genes_out), 1)
        multiple = self.pad_to_multiple_of or 1
        width = -(-width // multiple) * multiple
        batch["target_gene_ids"] = torch.from_numpy(_pad(genes_out, width, self.pad_token_id, np.int64))
        batch["labels"] = torch.from_numpy(_pad(values_out, width, 0.0, np.float32))
        batch["label_weights"] = torch.from_numpy(_pad(weights_out, width, 0.0, np.float32))
        return batch


def _counts(adata, layer: str | None):
    if layer and layer not in adata.layers:
        raise KeyError(f"layer {layer!r} (the tokenizer's counts layer) missing; layers: {list(adata.layers)}")
    return adata.layers[layer] if layer else adata.X


def library_sizes(adata, layer: str | None = None, chunk_size: int = 4096) -> np.ndarray:
    """Total counts per cell over ALL genes (vocabulary or not), read in row chunks (backed works)."""
    matrix = _counts(adata, layer)
    return np.concatenate([np.asarray(matrix[lo:lo + chunk_size].sum(axis=1), dtype=np.float64).ravel()
                           for lo in range(0, adata.n_obs, chunk_size)] or [np.zeros(0)])


def build_imputer(cfg: RunConfig) -> ScFMForImputation:
    """Backbone from model.init_from, a new imputation head (query/W from the pretraining mvc_head when
    there is one); fm.impute's default scale (task.target_scale) and the target sum saved in config.json."""
    model = load_head(ScFMForImputation, cfg, target_scale=cfg.task.target_scale, target_sum=TARGET_SUM)
    init_query_from_mvc(model, cfg.model.init_from)
    return model


def init_query_from_mvc(model: ScFMForImputation, directory: str | Path) -> bool:
    """Copy the pretraining mvc_head's query and W (same shapes, same role: gene query · cell; W times
    √D for the head's 1/√D) into the new head, so fine-tuning starts from a decoder that already
    reads the cell embedding (chosen on seed-0 runs of eval/imputation.yaml: eval/RESULTS.md, "Hyper-parameter
    selection"). Skipped (False)
    for checkpoints without one, or that already hold an imputation head."""
    from safetensors import safe_open

    path = Path(directory) / "model.safetensors"
    if not path.is_file():
        return False
    with safe_open(str(path), framework="pt") as f:
        names = set(f.keys())
        wanted = {"query.weight", "query.bias", "W.weight"}
        if any(n.startswith("impute_head.") for n in names) or not {f"mvc_head.{k}" for k in wanted} <= names:
            return False
        params = dict(model.impute_head.named_parameters())
        with torch.no_grad():
            for k in wanted:
                params[k].copy_(f.get_tensor(f"mvc_head.{k}"))
            params["W.weight"].mul_(1.0 / model.impute_head.scale)
    log.info("imputation head: query and W initialised from the pretrained mvc_head")
    return True


def run(cfg: RunConfig, resume: bool = False, adatas=None) -> TrainResult:
    """The whole `fm finetune` job for task.name=imputation (files of data.paths, or `adatas`)."""
    accelerator, tokenizer, (cells, per_source) = load_task_cells(
        cfg, adatas, lambda sources, tokenizer: encode_with_targets(
            sources, tokenizer, lambda adata, source: {"library": library_sizes(adata, tokenizer.layer)}))
    data = TaskCells(cells, concat_targets(per_source))
    train_cells, val_cells = split_cells(data, cfg.data.val_fraction, cfg.train.seed)
    model = build_imputer(cfg)
    collator = ImputationCollator(**collator_kwargs(model, cfg), mask_ratio=cfg.data.mask_ratio)
    return train_task(model, tokenizer, train_cells, val_cells, collator, cfg, resume, accelerator)


def _observed_log1p(adata, layer: str | None, columns: np.ndarray, chunk_size: int,
                    target_sum: float = TARGET_SUM, matrix=None) -> np.ndarray:
    """log1p(count / library · target_sum) of the given columns (library over all genes), read in row chunks
    (of `matrix` when given, else of X / layers[layer])."""
    matrix = _counts(adata, layer) if matrix is None else matrix
    out = np.empty((adata.n_obs, len(columns)), np.float32)
    for lo in range(0, adata.n_obs, chunk_size):
        chunk = matrix[lo:lo + chunk_size]
        lib = np.asarray(chunk.sum(axis=1), dtype=np.float64).reshape(-1, 1)
        part = chunk[:, columns]
        part = np.asarray(part.toarray() if hasattr(part, "toarray") else part, dtype=np.float64)
        out[lo:lo + len(lib)] = np.log1p(part / np.maximum(lib, 1e-12) * target_sum)
    return out


def impute(adata, model, scale: str | None = None, key: str | None = None, batch_size: int = 64,
           chunk_size: int = 4096, progress: bool = False, *, key_added: str | None = None, layer: str | None = None,
           use_raw: bool = False, gene_key: str | None = None, allow_non_counts: bool | None = None,
           copy: bool = False):
    """Denoised / imputed expression of every gene of `adata` from a model fine-tuned for imputation.

    Writes, and returns the matrix of:
      layers[key]  cells × genes float32: the model's prediction for every gene in the vocabulary
                   (zeros included); genes outside the vocabulary keep their observed value
      var[key]     bool: True where the column is the model's prediction, False where observed
      uns[key]     {"scale", "target_sum", "n_imputed_genes"}
    scale: 'log1p' (log1p of counts per 1e4, library = the cell's total over all its genes) or
    'normalized' (counts per 1e4, = expm1 of log1p); None = the model's config.target_scale.
    Predictions are clipped at 0 (true values are never negative). Streams X in row chunks and
    batches (gene queries computed once); deterministic; X is never modified and adata is written
    only at the end. Memory: the layer is dense, n_obs × n_vars × 4 bytes (100k cells × 20k genes =
    8 GB), about twice that at the peak when some genes are outside the vocabulary.

    scverse arguments (fm/scverse.py): counts from X, layers[layer] or .raw (use_raw: adata.raw must have
    adata's genes, as the output layer is over adata's columns); genes from var_names or var[gene_key];
    key_added names the output (default "fm_imputed"; `key` is its alias); copy=True returns a modified copy
    (copy=False returns the matrix); a view with copy=False is an error. Records adata.uns["fm"][key_added].
    """
    from fm.inference import input_tokenizer
    from fm.scverse import output_adata, record, start_call

    key, inputs = start_call(adata, copy, "fm.impute", key_added, key, "fm_imputed", layer, use_raw,
                             gene_key, allow_non_counts)
    if use_raw and adata.raw is not None and not adata.raw.var_names.equals(adata.var_names):
        raise ValueError(f"fm.impute: use_raw=True needs adata.raw with adata's genes (the imputed layer is over "
                         f"adata's {adata.n_vars} columns; raw has {adata.raw.n_vars}). Put the counts in a layer "
                         "(adata.layers['counts'] = adata.raw[:, adata.var_names].X) and pass layer='counts'.")
    if not isinstance(getattr(model, "impute_head", None), torch.nn.Module):
        raise ValueError(f"{type(model).__name__} has no imputation head: load a model fine-tuned for imputation "
                         "(fm finetune recipes/finetune/imputation.yaml model.init_from=<pretrained model> …)")
    scale = scale or model.config.target_scale
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES} (or None for the model's default), got {scale!r}")
    if getattr(model, "cell_tokenizer", None) is None:
        raise ValueError("model has no cell_tokenizer: load it with fm.load(directory)")
    tokenizer: CellTokenizer = input_tokenizer(model, **inputs)
    ids = tokenizer.match_genes(adata).vocab_ids  # errors (with examples) when too few genes match
    known = ids >= 0
    if not known.any():
        raise ValueError(f"none of the {adata.n_vars} genes of adata is in the model's vocabulary (e.g. "
                         f"{list(adata.var_names[:5])}); nothing can be imputed. Point the tokenizer's gene_key at "
                         "a var column of gene symbols or Ensembl IDs")
    target_sum = float(model.config.target_sum)
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        keys, bias = model.gene_keys(torch.as_tensor(ids[known], dtype=torch.long, device=model_device(model)))
        keys, bias = keys.float(), bias.float()
    model.train(was_training)

    def predict(m, batch):
        return torch.addmm(bias, m.scfm(**batch).cell_embedding.float(), keys.T).clamp_(min=0)

    pred, _ = run_batched(adata, model, predict, width=int(known.sum()), batch_size=batch_size, chunk_size=chunk_size,
                          progress=progress, desc="impute", **inputs)
    if known.all():
        out = pred
    else:
        out = np.empty((adata.n_obs, adata.n_vars), np.float32)
        out[:, known] = pred
        del pred
        out[:, ~known] = _observed_log1p(adata, tokenizer.layer, np.flatnonzero(~known), chunk_size, target_sum,
                                         matrix=tokenizer._source(adata)[2])
    if scale == "normalized":
        np.expm1(out, out=out)
    target = output_adata(adata, copy)
    target.layers[key] = out
    target.var[key] = known
    target.uns[key] = {"scale": scale, "target_sum": target_sum, "n_imputed_genes": int(known.sum())}
    record(target, key, model, "fm.impute", {**inputs, "scale": scale})
    return target if copy else out


__all__ = ["ImputationCollator", "ImputationConfig", "SCALES", "TARGET_SUM", "build_imputer", "impute", "init_query_from_mvc",
           "library_sizes", "run"]
