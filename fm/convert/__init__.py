"""Import the field's checkpoints as scfm models: scGPT (`args.json` + `vocab.json` + `best_model.pt`) and
Geneformer (a Hugging Face BertForMaskedLM directory + its token and median dictionaries).

`fm.load(path)` calls `load_foreign` when `path` is not an scfm export, so a released checkpoint works as it
lies; `fm convert` writes the same model as an scfm export (config.json + model.safetensors + tokenizer files)
that fine-tuning, `fm eval --model` and transformers' Auto classes read like our own.
"""
from __future__ import annotations

import json
from pathlib import Path

FORMATS = ("scgpt", "geneformer")


def detect_format(path: str | Path) -> str | None:
    """'scgpt', 'geneformer' or None (an scfm export, or nothing we recognise)."""
    from fm.convert.scgpt import is_scgpt_dir

    path = Path(path)
    if is_scgpt_dir(path):
        return "scgpt"
    for model_dir in (path, path / "model"):
        config = model_dir / "config.json"
        if config.is_file():
            try:
                model_type = json.loads(config.read_text()).get("model_type")
            except (json.JSONDecodeError, UnicodeDecodeError):
                return None
            if model_type == "bert":
                return "geneformer"
    return None


def load_foreign(path: str | Path, fmt: str | None = None, dictionaries: str | Path | None = None):
    """(model, tokenizer, report) of a scGPT or Geneformer checkpoint, converted in memory."""
    path = Path(path)
    fmt = fmt or detect_format(path)
    if fmt == "scgpt":
        from fm.convert.scgpt import load_scgpt

        return load_scgpt(path)
    if fmt == "geneformer":
        from fm.convert.geneformer import load_geneformer

        return load_geneformer(path, dictionaries)
    raise ValueError(f"{path}: not a scGPT checkpoint (args.json + vocab.json + best_model.pt) nor a Geneformer "
                     "one (a BERT config.json, in the directory or its model/); formats: " + ", ".join(FORMATS))


def convert(fmt: str, src: str | Path, out: str | Path, dictionaries: str | Path | None = None) -> Path:
    """`fm convert FORMAT SRC OUT`: write the checkpoint at SRC as an scfm export at OUT."""
    if fmt == "scgpt":
        from fm.convert.scgpt import convert_scgpt

        return convert_scgpt(src, out)
    if fmt == "geneformer":
        from fm.convert.geneformer import convert_geneformer

        return convert_geneformer(src, out, dictionaries)
    raise ValueError(f"unknown checkpoint format {fmt!r}; known: {', '.join(FORMATS)}")


__all__ = ["FORMATS", "convert", "detect_format", "load_foreign"]
