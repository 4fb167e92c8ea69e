"""Use from Python: load a checkpoint, embed an AnnData (streamed, deterministic).

Task functions (fm.annotate, fm.impute, …) live next to their task in fm/tasks/<task>.py; all of
them, and fm.embed, run on the engine in fm/inference.py.
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, PreTrainedModel

from fm import modeling_bert, modeling_scfm
from fm.inference import cell_embeddings
from fm.tasks import registry
from fm.tokenizer import CellTokenizer

BACKBONES = {**{name: getattr(modeling_scfm, name) for name in ("ScFMModel", "ScFMForMaskedExpression")},
             **{name: getattr(modeling_bert, name) for name in ("ScFMBertModel", "ScFMBertForMaskedLM")}}
"""config.architectures[0] → class for the backbones (scfm's, an imported BERT's) and their pretraining models;
task heads: the task registry."""


def architecture_class(name: str) -> type | None:
    """The model class fm.load builds for config.architectures[0] == name (None: unknown)."""
    if name in BACKBONES:
        return BACKBONES[name]
    task = registry.task_for_head(name)
    return task.load("head") if task is not None else None


def load(path: str | Path, device: str | torch.device | None = None) -> PreTrainedModel:
    """Load an exported checkpoint directory (config.json, model.safetensors, tokenizer files), or a scGPT /
    Geneformer checkpoint as it was released (converted in memory: fm.convert), or an unmerged LoRA fine-tune
    (adapter_config.json; rebuilt on its recorded base model and merged: fm.lora.load_adapter).

    Returns the model in eval mode with its CellTokenizer attached as `model.cell_tokenizer`.
    Only safetensors weights (and, for imports, PyTorch files read with weights_only=True) are read.
    """
    path = Path(path)
    from fm import lora
    from fm.convert import detect_format, load_foreign

    if lora.is_adapter_dir(path):  # an unmerged LoRA fine-tune (task.lora_merge=false): base + adapter, merged
        model = lora.load_adapter(path)
        model.cell_tokenizer = CellTokenizer.from_pretrained(path)
        model.eval()
        return model.to(device) if device is not None else model
    fmt = detect_format(path) if path.is_dir() else None
    if fmt is not None:
        model, tokenizer, _ = load_foreign(path, fmt)
        model.cell_tokenizer = tokenizer
        model.eval()
        return model.to(device) if device is not None else model
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json — pass the exported model directory "
                                "(e.g. runs/<name>/model), not the run or checkpoint directory")
    config = AutoConfig.from_pretrained(path)
    arch = (config.architectures or ["ScFMModel"])[0]
    cls = architecture_class(arch)
    if cls is None:
        known = [*BACKBONES, *(t.head_name for t in registry.TASKS.values())]
        raise ValueError(f"{path}: unknown architecture {arch!r} (known: {', '.join(sorted(known))})")
    model = cls.from_pretrained(path, use_safetensors=True)
    model.cell_tokenizer = CellTokenizer.from_pretrained(path)
    model.eval()
    return model.to(device) if device is not None else model


def embed(adata, model, batch_size: int = 64, key: str | None = None, chunk_size: int = 4096,
          progress: bool = False, drop_empty: bool = False, *, key_added: str | None = None,
          layer: str | None = None, use_raw: bool = False, gene_key: str | None = None,
          allow_non_counts: bool | None = None, copy: bool = False):
    """Cell embeddings (cells × d_model, float32) into `adata.obsm[key_added]` (default "X_fm"), and returned.

    Reads the counts in row chunks (backed AnnData works) and runs the model in batches, so memory grows
    with the output only. Genes outside the vocabulary are ignored (the match is logged); a cell
    keeps its `max_genes` most expressed genes. Deterministic: same input and model, same output.
    adata is written only at the end, so a failure leaves it as it was.

    scverse arguments (fm/scverse.py): counts from X, adata.layers[layer] or adata.raw (use_raw=True); gene
    names from var_names or var[gene_key]; allow_non_counts=True bins non-integer values as they are;
    key_added names the obsm key (`key` is its alias); copy=True returns a modified copy and leaves adata
    untouched (copy=False returns the embedding). A view with copy=False is an error. Records
    adata.uns["fm"][key_added] (model, its hash, scfm version, settings).
    """
    from fm.scverse import output_adata, record, start_call

    key, inputs = start_call(adata, copy, "fm.embed", key_added, key, "X_fm", layer, use_raw,
                             gene_key, allow_non_counts)
    out = cell_embeddings(adata, model, batch_size=batch_size, chunk_size=chunk_size, progress=progress,
                          drop_empty=drop_empty, desc="embed", **inputs)
    target = output_adata(adata, copy)
    target.obsm[key] = out
    record(target, key, model, "fm.embed", {**inputs, "drop_empty": drop_empty, "batch_size": batch_size})
    return target if copy else out


__all__ = ["architecture_class", "embed", "load"]
