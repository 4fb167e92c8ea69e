"""The streaming inference engine every public function (fm.embed, fm.annotate, fm.impute, …) runs on,
and the one writer of per-cell label outputs.

`run_batched` reads X in row chunks (backed AnnData works), tokenises with the model's own
tokenizer, chooses genes as at inference (deterministic: a cell's most expressed genes, its zero
genes from a hash of the cell, never from a training seed), runs `fn` on each padded batch in eval
mode, and restores the mode after. Memory grows with the output only.

Length bucketing: within a chunk, cells are batched in order of their token count (the collator's
`token_counts`, from indptr alone), so a batch pads to a length its cells nearly share (pbmc3k: 27 %
padding tokens unbucketed → 0.6 %); results are written back to the cells' own rows. A cell's
output does not depend on its batch beyond float rounding: on CPU, SDPA's kernels reduce over the
padded key length, so the same cell padded to another width differs in the last bits (≤ 1e-6
relative) — true before bucketing too (batch_size 64 vs 1). Outputs are bitwise deterministic for
a given input, chunk_size and batch_size.
"""
from __future__ import annotations

import logging
from typing import Callable

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

UNKNOWN = "unknown"
"""Label a cell gets when its top class score is below the threshold."""
UNKNOWN_WARN_SHARE = 0.2
"""write_labels warns when more than this share of the cells come out UNKNOWN."""
log = logging.getLogger("fm")


def backbone(model):
    """The ScFMModel inside any ScFMFor<Task> (or the model itself when it is the backbone)."""
    return getattr(model, model.base_model_prefix, model)


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def inference_collator(model, device=None):
    """The collator a model is used with at inference, built from its own config; widths rounded for
    `device` (default: the model's)."""
    from fm.data.collator import CellCollator, collator_settings, pad_multiple

    return CellCollator(**collator_settings(model.config), train=False,
                        pad_to_multiple_of=pad_multiple(device or model_device(model)))


def inference_precision(device: torch.device, model):
    """bf16 autocast for fp32 weights on a GPU with bf16 (tensor cores; outputs come back as float32), nothing
    elsewhere: on CPU inference stays fp32 (exact against imported checkpoints' references; see fm/precision.py
    for training). FM_INFERENCE_FP32=1 turns the GPU autocast off."""
    import contextlib
    import os

    from fm.precision import native_bf16

    fp32_weights = next(model.parameters()).dtype == torch.float32
    if device.type == "cuda" and fp32_weights and native_bf16(device) and not os.environ.get("FM_INFERENCE_FP32"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def input_tokenizer(model, layer: str | None = None, use_raw: bool = False, gene_key: str | None = None,
                    allow_non_counts: bool | None = None):
    """The tokenizer one call reads `adata` with: the model's `cell_tokenizer` restricted to its gene table, reading
    counts from adata.layers[layer] / adata.raw (use_raw) and gene names from var[gene_key] when given (a per-call
    copy: model.cell_tokenizer is never changed; None/False keep the tokenizer's saved settings)."""
    tokenizer = getattr(model, "cell_tokenizer", None)
    if tokenizer is None:
        raise ValueError("model has no cell_tokenizer: load it with fm.load(directory)")
    tokenizer = tokenizer.for_config(model.config)  # never feed the model genes its gene table lacks
    return tokenizer.with_input(layer=layer, use_raw=use_raw, gene_key=gene_key, allow_non_counts=allow_non_counts)


def run_batched(adata, model, fn: Callable[[object, dict], torch.Tensor], *, width: int, batch_size: int = 64,
                chunk_size: int = 4096, progress: bool = False, drop_empty: bool = False,
                desc: str = "", bucket: bool = True, layer: str | None = None, use_raw: bool = False,
                gene_key: str | None = None, allow_non_counts: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Stream `adata` through `model`: `fn(model, batch)` → (B, width) tensor per batch, row i of it
    belonging to the batch's i-th cell (any per-cell output of a fixed width: embeddings, class scores,
    per-gene predictions over a fixed gene list).

    Returns (out (n_obs, width) float32, kept (n_obs,) bool). drop_empty: cells without any
    vocabulary gene are skipped instead of being an error; their rows stay 0 and kept False.
    bucket: batch a chunk's cells by token count (ties in row order) instead of in row order.
    layer / use_raw / gene_key / allow_non_counts: where this call reads counts and gene names (see
    input_tokenizer); the model's tokenizer itself is never changed.
    """
    tokenizer = input_tokenizer(model, layer=layer, use_raw=use_raw, gene_key=gene_key,
                                allow_non_counts=allow_non_counts)
    device = model_device(model)
    collator = inference_collator(model, device)
    out = np.zeros((adata.n_obs, width), dtype=np.float32)
    keep = np.zeros(adata.n_obs, dtype=bool)
    was_training = model.training
    model.eval()
    bar = tqdm(total=adata.n_obs, disable=not progress, desc=desc)
    name_to_row = None
    try:
        with torch.inference_mode(), inference_precision(device, model):
            for part in tokenizer.iter_encoded(adata, chunk_size=chunk_size, drop_empty=drop_empty):
                rows = np.arange(len(part))
                if drop_empty:  # dropped cells leave holes: locate the survivors by name
                    name_to_row = name_to_row if name_to_row is not None else {n: i for i, n in enumerate(adata.obs_names)}
                    rows = np.array([name_to_row[n] for n in part.obs_names])
                else:
                    rows = rows + int(keep.sum())
                # cells of similar length batched together (stable: equal lengths keep row order)
                order = np.argsort(collator.token_counts(part), kind="stable") if bucket else np.arange(len(part))
                for lo in range(0, len(part), batch_size):
                    cells = order[lo:lo + batch_size]
                    batch = collator([part[i] for i in cells])
                    result = fn(model, {k: v.to(device) for k, v in batch.items()})
                    out[rows[cells[:len(result)]]] = result.float().cpu().numpy()
                keep[rows] = True
                bar.update(len(part))
    finally:
        bar.close()
        model.train(was_training)
    return out, keep


def cell_embeddings(adata, model, *, batch_size: int = 64, chunk_size: int = 4096, progress: bool = False,
                    drop_empty: bool = False, desc: str = "embed", **inputs) -> np.ndarray:
    """The backbone's cell embedding of every cell (n_obs, d_model) float32 (L2-normalised when the model's
    config.embedding_l2 says so, as for imported scGPT models); NaN rows for cells dropped by `drop_empty`.
    Writes nothing. inputs: run_batched's layer / use_raw / gene_key / allow_non_counts."""
    encoder = backbone(model)

    def embed(m, batch):
        cell = encoder(**batch).cell_embedding
        return torch.nn.functional.normalize(cell.float(), dim=-1) if model.config.embedding_l2 else cell

    out, keep = run_batched(adata, model, embed, width=model.config.d_model,
                            batch_size=batch_size, chunk_size=chunk_size, progress=progress, drop_empty=drop_empty,
                            desc=desc, **inputs)
    if drop_empty and not keep.all():
        out[~keep] = np.nan
    return out


def write_labels(adata, key: str, probabilities: np.ndarray, classes: list[str], threshold: float = 0.0) -> np.ndarray:
    """Write a per-cell classification into `adata` (the fields every label-producing function shares):

      obs[key]                     top class name, "unknown" where its score < threshold (categorical)
      obs[key + "_confidence"]     top class score (float32)
      obsm[key + "_probabilities"] cells × classes scores (float32)
      uns[key + "_classes"]        class names, the column order of the scores
    Returns the labels (object array).
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    best = probabilities.argmax(axis=1)
    confidence = probabilities[np.arange(len(probabilities)), best].astype(np.float32)
    labels = np.asarray(classes, dtype=object)[best]
    unsure = confidence < threshold
    labels[unsure] = UNKNOWN
    if len(labels) and unsure.mean() > UNKNOWN_WARN_SHARE:
        log.warning("%s: %d of %d cells (%.0f %%) are %r: their top-class probability is below the threshold %.2f "
                    "(median %.2f). The cells may be of types the classifier was not trained on, of another "
                    "species or panel, or not raw counts; a lower threshold (threshold=…, 0 = never unknown) "
                    "labels them anyway", key, int(unsure.sum()), len(labels), 100 * unsure.mean(), UNKNOWN,
                    threshold, float(np.median(confidence)))
    adata.obs[key] = pd.Categorical(labels, categories=list(classes) + ([UNKNOWN] if UNKNOWN not in classes else []))
    adata.obs[key + "_confidence"] = confidence
    adata.obsm[key + "_probabilities"] = probabilities
    adata.uns[key + "_classes"] = np.asarray(classes, dtype=object)
    return labels


__all__ = ["UNKNOWN", "backbone", "cell_embeddings", "inference_collator", "input_tokenizer", "inference_precision", "model_device", "run_batched",
           "write_labels"]
