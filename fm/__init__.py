"""scfm: pretrain, fine-tune and use single-cell foundation models.

    import fm
    model = fm.load("runs/demo/model")
    fm.embed(adata, model)          # → adata.obsm["X_fm"]
    clf = fm.finetune("runs/demo/model", reference, task="annotation", output_dir="runs/annot")
    fm.annotate(adata, clf)         # → adata.obs["fm_cell_type"], obs["fm_cell_type_confidence"], …

Everything is exported lazily (PEP 562): `import fm.binning` or `import fm.vocab` costs no torch,
transformers or accelerate import. The task functions (annotate, impute, integrate, …) come from the
task registry (fm.tasks.registry), so a registered task's functions appear here too.
"""
from __future__ import annotations

import importlib
import sys

__version__ = "0.1.0"

_EXPORTS = {
    "load": "fm.api", "embed": "fm.api",
    "finetune": "fm.tasks",
    "ScFMConfig": "fm.configuration_scfm",
    "ScFMModel": "fm.modeling_scfm", "ScFMForMaskedExpression": "fm.modeling_scfm",
    "CellTokenizer": "fm.tokenizer", "GeneVocab": "fm.vocab",
}
"""Public name → module defining it (imported on first use)."""


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    else:
        from fm.tasks import registry

        value = registry.inference_function(name)
        if value is None:
            task = registry.task_for_head(name)
            value = task.load("head") if task is not None and name == task.head_name else None
        if value is None:
            raise AttributeError(f"module 'fm' has no attribute {name!r}")
    return value


def register_auto_classes() -> None:
    """Make transformers' AutoConfig / AutoModel / AutoModelForMaskedLM / AutoModelForSequenceClassification
    resolve model_type "scfm" (importing the model files registers them; idempotent)."""
    importlib.import_module("fm.modeling_scfm")
    importlib.import_module("fm.heads.annotation")


if "transformers" in sys.modules:  # already paid for: register now, so AutoModel works right after `import fm`
    register_auto_classes()


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def _public_names() -> list[str]:
    from fm.tasks import registry

    return sorted(["register_auto_classes", *_EXPORTS, *registry.inference_names(), *(t.head_name for t in registry.TASKS.values())])


__all__ = _public_names()
