"""LoRA fine-tuning (task.lora): low-rank adapters on the backbone's attention and MLP projections, the task
head trained in full, everything else frozen — through PEFT's own classes, so the result is an ordinary
PeftModel that the one training loop (fm/train.py) trains, checkpoints and resumes like any nn.Module.

Export (task.lora_merge): merged (default) — the adapters are folded into the weights
(`merge_and_unload`) and an ordinary model directory is written, which fm.load reads unchanged; or
unmerged — adapter_config.json + adapter_model.safetensors (adapters + head), the fine-tuned config.json,
the tokenizer files and BASE_FILE (absolute path of model.init_from + sha256 of its config.json), which
fm.load rebuilds as base + adapter (`load_adapter`).

Targets are a regex anchored at the backbone (`^scfm\\.`), so a head's own layer of the same short name
(`classifier_head.out` vs `scfm.layers.0.attn.out`) can never be wrapped. Using PEFT directly:

    from peft import LoraConfig, get_peft_model
    import fm, fm.lora
    model = fm.load("runs/annot/model")                       # or any ScFMFor<Task>
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16,
        target_modules=fm.lora.default_target_modules(model),
        modules_to_save=fm.lora.head_modules(model)))         # the head trains in full and is saved

task_type="SEQ_CLS" (PEFT's sequence-classification wrapper, which calls forward(input_ids=…)) works on
ScFMForAnnotation when the forward accepts `input_ids` as an alias of `gene_ids`; PEFT adds
"classifier"/"score" to modules_to_save, which are not our names: pass modules_to_save=["classifier_head"].
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import re
from pathlib import Path

log = logging.getLogger("fm")

INSTALL_HINT = "pip install 'scfm[lora]'"
BASE_FILE = "scfm_lora_base.json"
"""In an unmerged adapter directory: {"base_model": absolute path, "base_config_sha256": …} (fm.load checks both)."""
ADAPTER_CONFIG = "adapter_config.json"
DEFAULT_TARGETS = {
    "scfm": ("attn.qkv", "attn.out", "mlp.fc", "mlp.proj"),
    "bert": ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
             "intermediate.dense", "output.dense"),
}
"""Per backbone (config.backbone): the short names (module-path suffixes) of the attention and MLP projections."""


def require_peft():
    """The peft module, or an ImportError saying how to install it (it is an optional extra)."""
    try:
        import peft
    except ImportError as e:
        raise ImportError(f"LoRA fine-tuning (task.lora) needs the peft package: {INSTALL_HINT}") from e
    return peft


def enabled(settings) -> bool:
    """task.lora is on when its rank is a positive number (r=0 or null = off)."""
    return settings is not None and bool(settings.r)


def _backbone_kind(model) -> str:
    return "bert" if getattr(model.config, "backbone", "scfm") == "bert" else "scfm"


def target_regex(model, names=None) -> str:
    """A PEFT target_modules regex matching the backbone modules whose path ends with one of `names`
    (default: the backbone's attention + MLP projections), anchored at the backbone prefix."""
    names = list(names or DEFAULT_TARGETS[_backbone_kind(model)])
    prefix = re.escape(model.base_model_prefix)
    alternatives = "|".join(re.escape(n.strip(".")) for n in names)
    return rf"^{prefix}\.(?:.*\.)?(?:{alternatives})$"


def default_target_modules(model) -> str:
    """The default LoRA targets of an scfm model (ScFMFor<Task>, scfm or BERT backbone) as a PEFT regex:
    its attention and MLP projections only — never the embeddings, norms or task head."""
    return target_regex(model)


def head_modules(model, extra: tuple[str, ...] = ()) -> list[str]:
    """Module names trained in full next to the adapters (PEFT modules_to_save): every top-level child but
    the backbone (the task heads: classifier_head, gep_head, …) plus `extra` (e.g. a condition table the
    task adds to the backbone)."""
    heads = [name for name, child in model.named_children() if name != model.base_model_prefix and child is not None
             and any(True for _ in child.parameters())]
    return heads + [e.rstrip(".") for e in extra]


def resolve_targets(model, names=None) -> tuple[str, list[str]]:
    """(regex, the full module paths it matches); an error when nothing matches or a match is not a layer
    PEFT can adapt (nn.Linear / nn.Embedding)."""
    import torch

    regex = target_regex(model, names)
    matched = [(n, m) for n, m in model.named_modules() if re.fullmatch(regex, n)]
    if not matched:
        raise ValueError(f"task.lora.target_modules={list(names or [])}: no module of the backbone "
                         f"'{model.base_model_prefix}' ends with these names (defaults: "
                         f"{list(DEFAULT_TARGETS[_backbone_kind(model)])})")
    bad = [n for n, m in matched if not isinstance(m, (torch.nn.Linear, torch.nn.Embedding))]
    if bad:
        raise ValueError(f"task.lora.target_modules: {bad[:3]} are not Linear/Embedding layers LoRA can adapt")
    return regex, [n for n, _ in matched]


def apply_lora(model, settings, extra_trainable: tuple[str, ...] = ()):
    """Wrap `model` (an ScFMFor<Task> with its head) in a PeftModel: LoRA on the targeted backbone projections,
    the head modules (and `extra_trainable`) trained in full and saved with the adapter, the rest frozen."""
    peft = require_peft()
    regex, matched = resolve_targets(model, settings.target_modules)
    config = peft.LoraConfig(r=int(settings.r), lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                             target_modules=regex, modules_to_save=head_modules(model, extra_trainable),
                             bias="none")
    model = peft.get_peft_model(model, config)
    n_train, n_all = (sum(p.numel() for p in model.parameters() if p.requires_grad),
                      sum(p.numel() for p in model.parameters()))
    log.info("LoRA r=%d alpha=%g dropout=%g on %d backbone modules (%s); trained in full: %s; trainable "
             "parameters %d of %d (%.2f%%)", config.r, config.lora_alpha, config.lora_dropout, len(matched),
             regex, config.modules_to_save, n_train, n_all, 100 * n_train / max(n_all, 1))
    return model


def is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def merged_copy(model, state_dict=None):
    """An ordinary model with the adapters folded in (a copy: `model` keeps training / predicting as before)."""
    model = copy.deepcopy(model)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    return model.merge_and_unload()


def config_sha256(directory: str | Path) -> str:
    return hashlib.sha256((Path(directory) / "config.json").read_bytes()).hexdigest()


def lora_export(export, tokenizer, base: str | Path, merge: bool = True):
    """Wrap an exporter for train() (fm.pretrain.export_pretrained): a PeftModel is merged first and exported by
    `export` (merge), or written as an adapter directory on `base` (model.init_from)."""
    def export_lora(model, state_dict, directory: Path) -> None:
        if not is_peft(model):
            return export(model, state_dict, directory)
        if merge:
            merged = merged_copy(model, state_dict)
            return export(merged, merged.state_dict(), directory)
        save_adapter(model, state_dict, directory, tokenizer, base)
    return export_lora


def save_adapter(model, state_dict, directory: Path, tokenizer, base: str | Path) -> None:
    """adapter_config.json + adapter_model.safetensors (adapters + head), config.json of the fine-tuned model,
    tokenizer files, and BASE_FILE pointing at the (absolute) base model with its config hash."""
    from fm.paths import remove_stale_temp_files, respect_umask

    directory = Path(directory)
    base = Path(base).resolve()
    if directory.is_dir():
        remove_stale_temp_files(directory)
    model = copy.deepcopy(model)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    model.peft_config["default"].base_model_name_or_path = str(base)
    model.save_pretrained(directory, safe_serialization=True)
    inner = model.get_base_model()
    config = copy.deepcopy(inner.config)
    config.architectures = [type(inner).__name__]
    config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / BASE_FILE).write_text(json.dumps({"base_model": str(base),
                                                   "base_config_sha256": config_sha256(base)}, indent=1))
    respect_umask(directory)  # safetensors writes 0600 through a temp file
    log.info("saved the LoRA adapter (not merged) to %s; base model %s", directory, base)


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def load_adapter(path: str | Path, merge: bool = True):
    """Rebuild base model + adapter from an unmerged export: the head class and its config from `path`, the
    backbone from the recorded base model, the adapters and head from adapter_model.safetensors. Returns the
    merged ordinary model (merge=True) or the PeftModel."""
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    from fm.api import architecture_class

    peft = require_peft()
    path = Path(path)
    info = json.loads((path / BASE_FILE).read_text()) if (path / BASE_FILE).is_file() else {}
    base = Path(info.get("base_model") or peft.PeftConfig.from_pretrained(path).base_model_name_or_path or "")
    if not (base / "config.json").is_file():
        raise FileNotFoundError(f"{path}: a LoRA adapter on the base model {base}, which is not there (no "
                                "config.json); restore that directory, or re-export the fine-tune merged "
                                "(task.lora_merge=true)")
    if info.get("base_config_sha256") and info["base_config_sha256"] != config_sha256(base):
        raise ValueError(f"{path}: the base model {base} is not the one the adapter was trained on (its "
                         "config.json changed since); restore the original base model")
    config = AutoConfig.from_pretrained(path)
    cls = architecture_class((config.architectures or [""])[0])
    if cls is None:
        raise ValueError(f"{path}: unknown architecture {config.architectures}")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the head is "missing" from the base: it comes with the adapter
    try:
        model = cls.from_pretrained(base, config=config, use_safetensors=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    model = peft.PeftModel.from_pretrained(model, path)
    return model.merge_and_unload() if merge else model


__all__ = ["DEFAULT_TARGETS", "apply_lora", "default_target_modules", "enabled", "head_modules", "is_adapter_dir",
           "load_adapter", "lora_export", "merged_copy", "require_peft", "resolve_targets", "target_regex"]
