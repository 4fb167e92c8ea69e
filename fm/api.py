"""Zero-shot use from Python: load a checkpoint, embed an AnnData (streamed, deterministic)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, PreTrainedModel

from fm import modeling_scfm
from fm.data.collator import CellCollator
from fm.tokenizer import CellTokenizer


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
    cls = getattr(modeling_scfm, arch, None)
    if cls is None:
        raise ValueError(f"{path}: unknown architecture {arch!r}")
    model = cls.from_pretrained(path, use_safetensors=True)
    model.cell_tokenizer = CellTokenizer.from_pretrained(path)
    model.eval()
    return model.to(device) if device is not None else model


def _backbone(model):
    return getattr(model, model.base_model_prefix, model)


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def embed(adata, model, batch_size: int = 64, key: str = "X_fm", chunk_size: int = 4096,
          progress: bool = False, drop_empty: bool = False) -> np.ndarray:
    """Cell embeddings (cells × d_model, float32) into `adata.obsm[key]`, and returned.

    Reads X in row chunks (backed AnnData works) and runs the model in batches, so memory grows
    with the output only. Genes outside the vocabulary are ignored (the match is logged); a cell
    keeps its `max_genes` most expressed genes. Deterministic: same input and model, same output.
    adata is written only at the end, so a failure leaves it as it was.
    """
    tokenizer: CellTokenizer = getattr(model, "cell_tokenizer", None)
    if tokenizer is None:
        raise ValueError("model has no cell_tokenizer: load it with fm.load(directory)")
    backbone = _backbone(model)
    config = backbone.config
    collator = CellCollator(n_bins=config.n_bins, max_genes=config.max_genes, train=False,
                            pad_token_id=config.pad_token_id, zero_fraction=getattr(config, "zero_fraction", 0.0))
    out = np.zeros((adata.n_obs, config.d_model), dtype=np.float32)
    keep = np.zeros(adata.n_obs, dtype=bool)
    was_training = model.training
    model.eval()
    device = _device(model)
    bar = tqdm(total=adata.n_obs, disable=not progress, desc="embed")
    name_to_row = None
    for part in tokenizer.iter_encoded(adata, chunk_size=chunk_size, drop_empty=drop_empty):
        rows = np.arange(len(part))
        if drop_empty:  # dropped cells leave holes: locate the survivors by name
            name_to_row = name_to_row if name_to_row is not None else {n: i for i, n in enumerate(adata.obs_names)}
            rows = np.array([name_to_row[n] for n in part.obs_names])
        else:
            rows = rows + int(keep.sum())
        for lo in range(0, len(part), batch_size):
            batch = collator([part[i] for i in range(lo, min(lo + batch_size, len(part)))])
            batch = {k: v.to(device) for k, v in batch.items()}
            emb = backbone(**batch).cell_embedding
            out[rows[lo:lo + len(emb)]] = emb.float().cpu().numpy()
        keep[rows] = True
        bar.update(len(part))
    bar.close()
    model.train(was_training)
    if drop_empty and not keep.all():
        out[~keep] = np.nan
    adata.obsm[key] = out
    return out
