"""One exported model directory, whoever writes it (pretraining, fine-tuning, fm convert, eval controls, bench):
weights + config.json (with `auto_map`), the CellTokenizer's files, the model code and a model card (README.md).

`auto_map` and the flat model code (fm/remote_code.py) let `AutoModel.from_pretrained(dir, trust_remote_code=True)`
load the directory where scfm is not installed; `fm.load(dir)` keeps using the installed package.
"""
from __future__ import annotations

import logging
from pathlib import Path

from fm.remote_code import write_model_code

log = logging.getLogger("fm")


def _registered(config_class: type) -> dict[str, type]:
    """{Auto class name: model class} registered for our config (modeling_scfm and the heads register at import)."""
    from transformers.models.auto import modeling_auto

    out = {}
    for name in sorted(dir(modeling_auto)):
        mapping = getattr(getattr(modeling_auto, name), "_model_mapping", None) if name.startswith("AutoModel") else None
        if mapping is None:
            continue
        try:
            out[name] = mapping[config_class]
        except KeyError:
            continue
    return out


def auto_classes(model) -> dict[str, type]:
    """{Auto class name: class} for the exported model: AutoConfig, AutoModel (the backbone, or the model itself
    when no Auto class of its kind exists) and every Auto class whose registered class builds this model."""
    from fm.modeling_scfm import ScFMModel, _bert_variant

    cls = type(model)
    builds = lambda registered: registered is cls or _bert_variant(registered, model.config) is cls  # noqa: E731
    found = {name: registered for name, registered in _registered(type(model.config)).items() if builds(registered)}
    out = {"AutoConfig": type(model.config), "AutoModel": ScFMModel, **found}
    if not found:  # a head with no Auto class of its kind (imputation, cci …): AutoModel gives the whole model
        out["AutoModel"] = cls
    return out


def write_auto_code(model, directory: str | Path) -> dict[str, str]:
    """Write the model code into `directory` and set `model.config.auto_map` to it (before save_pretrained)."""
    classes = auto_classes(model)
    foreign = {key: c for key, c in classes.items() if not c.__module__.startswith("fm.")}
    if foreign:  # a plugin's head (a task registered from outside fm): its code is not ours to copy; the backbone is
        log.info("%s: no remote code for %s (defined outside scfm): AutoModel with trust_remote_code loads the "
                 "backbone; fm.load loads the whole model where its task is registered", directory,
                 sorted({c.__qualname__ for c in foreign.values()}))
        from fm.modeling_scfm import ScFMModel

        classes = {key: c for key, c in classes.items() if key not in foreign}
        classes.setdefault("AutoModel", ScFMModel)
    refs = write_model_code(list(dict.fromkeys(classes.values())), directory)
    model.config.auto_map = {key: refs[c.__name__] for key, c in classes.items()}
    return model.config.auto_map


def save_export(model, tokenizer, directory: str | Path, state_dict=None, source: str | None = None,
                run_dir: str | Path | None = None) -> Path:
    """Write a complete export directory; `source` says where the weights came from when not trained here
    (a converted checkpoint, a random-init control), `run_dir` where the run's config.yaml / eval results are."""
    from fm.model_card import write_model_card

    from fm.paths import remove_stale_temp_files, respect_umask

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if stale := remove_stale_temp_files(directory):  # safetensors' temp file of an interrupted earlier export
        log.info("removed %d temporary file(s) an interrupted export left in %s", len(stale), directory)
    write_auto_code(model, directory)
    model.save_pretrained(directory, state_dict=state_dict, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    write_model_card(directory, model, source=source, run_dir=run_dir)
    respect_umask(directory)  # safetensors writes 0600 through a temp file
    return directory


__all__ = ["auto_classes", "save_export", "write_auto_code"]
