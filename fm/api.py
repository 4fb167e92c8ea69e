"""Use from Python: load a checkpoint, embed or annotate an AnnData (streamed, deterministic)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, PreTrainedModel

from fm import modeling_scfm
from fm.heads import HEAD_MODULES, head_class
from fm.data.collator import CellCollator
from fm.tokenizer import CellTokenizer


BACKBONES = {name: getattr(modeling_scfm, name) for name in ("ScFMModel", "ScFMForMaskedExpression")}
"""config.architectures[0] → class for the backbone and the pretraining model; task heads: HEAD_MODULES."""


def architecture_class(name: str) -> type | None:
    """The model class fm.load builds for config.architectures[0] == name (None: unknown)."""
    return BACKBONES.get(name) or head_class(name)


def load(path: str | Path, device: str | torch.device | None = None) -> PreTrainedModel:
    """Load an exported checkpoint directory (config.json, model.safetensors, tokenizer files).

    Returns the model in eval mode with its CellTokenizer attached as `model.cell_tokenizer`.
    Only safetensors weights are read; nothing is unpickled.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json — pass the exported model directory "
                                "(e.g. runs/<name>/model), not the run or checkpoint directory")
    config = AutoConfig.from_pretrained(path)
    arch = (config.architectures or ["ScFMModel"])[0]
    cls = architecture_class(arch)
    if cls is None:
        raise ValueError(f"{path}: unknown architecture {arch!r} (known: {', '.join(sorted([*BACKBONES, *HEAD_MODULES]))})")
    model = cls.from_pretrained(path, use_safetensors=True)
    model.cell_tokenizer = CellTokenizer.from_pretrained(path)
    model.eval()
    return model.to(device) if device is not None else model


def _backbone(model):
    return getattr(model, model.base_model_prefix, model)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _run_batched(adata, model, fn, width: int, batch_size: int, chunk_size: int, progress: bool,
                 drop_empty: bool, desc: str) -> tuple[np.ndarray, np.ndarray]:
    """Stream `adata` through `model` in batches: `fn(model, batch)` → (B, width) tensor per batch.

    The shared engine of embed / annotate: reads X in row chunks (backed AnnData works), tokenises
    with the model's own tokenizer, chooses genes as at inference (deterministic), runs in eval
    mode and restores the mode after. Returns (out (n_obs, width) float32, kept (n_obs,) bool);
    rows of cells dropped by `drop_empty` stay 0 and kept False.
    """
    tokenizer: CellTokenizer = getattr(model, "cell_tokenizer", None)
    if tokenizer is None:
        raise ValueError("model has no cell_tokenizer: load it with fm.load(directory)")
    config = model.config
    collator = CellCollator(n_bins=config.n_bins, value_encoding=config.value_encoding,
                            max_genes=config.max_genes, train=False,
                            pad_token_id=config.pad_token_id, zero_fraction=getattr(config, "zero_fraction", 0.0))
    out = np.zeros((adata.n_obs, width), dtype=np.float32)
    keep = np.zeros(adata.n_obs, dtype=bool)
    was_training = model.training
    model.eval()
    device = _device(model)
    bar = tqdm(total=adata.n_obs, disable=not progress, desc=desc)
    name_to_row = None
    try:
        with torch.inference_mode():
            for part in tokenizer.iter_encoded(adata, chunk_size=chunk_size, drop_empty=drop_empty):
                rows = np.arange(len(part))
                if drop_empty:  # dropped cells leave holes: locate the survivors by name
                    name_to_row = name_to_row if name_to_row is not None else {n: i for i, n in enumerate(adata.obs_names)}
                    rows = np.array([name_to_row[n] for n in part.obs_names])
                else:
                    rows = rows + int(keep.sum())
                for lo in range(0, len(part), batch_size):
                    batch = collator([part[i] for i in range(lo, min(lo + batch_size, len(part)))])
                    result = fn(model, {k: v.to(device) for k, v in batch.items()})
                    out[rows[lo:lo + len(result)]] = result.float().cpu().numpy()
                keep[rows] = True
                bar.update(len(part))
    finally:
        bar.close()
        model.train(was_training)
    return out, keep


def embed(adata, model, batch_size: int = 64, key: str = "X_fm", chunk_size: int = 4096,
          progress: bool = False, drop_empty: bool = False) -> np.ndarray:
    """Cell embeddings (cells × d_model, float32) into `adata.obsm[key]`, and returned.

    Reads X in row chunks (backed AnnData works) and runs the model in batches, so memory grows
    with the output only. Genes outside the vocabulary are ignored (the match is logged); a cell
    keeps its `max_genes` most expressed genes. Deterministic: same input and model, same output.
    adata is written only at the end, so a failure leaves it as it was.
    """
    backbone = _backbone(model)
    out, keep = _run_batched(adata, model, lambda m, batch: backbone(**batch).cell_embedding,
                             model.config.d_model, batch_size, chunk_size, progress, drop_empty, "embed")
    if drop_empty and not keep.all():
        out[~keep] = np.nan
    adata.obsm[key] = out
    return out


UNKNOWN = "unknown"
"""Label fm.annotate gives a cell whose top class probability is below the threshold."""


def annotate(adata, model, key: str = "fm_cell_type", threshold: float | None = None, batch_size: int = 64,
             chunk_size: int = 4096, progress: bool = False) -> np.ndarray:
    """Predict each cell's class with a fine-tuned classifier (`fm finetune`, task annotation).

    Writes, and returns the labels of:
      obs[key]                     predicted class name, "unknown" where confidence < threshold
      obs[key + "_confidence"]     top class probability (float32)
      obsm[key + "_probabilities"] cells × classes softmax probabilities (float32)
      uns[key + "_classes"]        class names, the column order of the probabilities
    threshold None = the model's `config.unknown_threshold` (task.unknown_threshold at fine-tuning;
    0 if absent); 0 never says "unknown". Streams like fm.embed; X is never modified; deterministic.
    adata is written only at the end, so a failure leaves it as it was.
    """
    id2label = getattr(model.config, "id2label", None) or {}
    if not hasattr(model, "classifier_head"):
        raise ValueError(f"{type(model).__name__} has no classifier head: load a model fine-tuned for annotation "
                         "(fm finetune recipes/finetune/annotation.yaml …)")
    classes = [str(id2label[i]) for i in range(len(id2label))]
    if threshold is None:
        threshold = float(getattr(model.config, "unknown_threshold", 0.0) or 0.0)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    probs, _ = _run_batched(adata, model, lambda m, batch: torch.softmax(m(**batch).logits.float(), dim=-1),
                            len(classes), batch_size, chunk_size, progress, False, "annotate")
    best = probs.argmax(axis=1)
    confidence = probs[np.arange(len(probs)), best].astype(np.float32)
    labels = np.asarray(classes, dtype=object)[best]
    labels[confidence < threshold] = UNKNOWN
    categories = classes + ([UNKNOWN] if UNKNOWN not in classes else [])
    adata.obs[key] = pd.Categorical(labels, categories=categories)
    adata.obs[key + "_confidence"] = confidence
    adata.obsm[key + "_probabilities"] = probs
    adata.uns[key + "_classes"] = np.asarray(classes, dtype=object)
    return labels
