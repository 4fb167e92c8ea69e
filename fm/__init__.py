"""scfm: pretrain, fine-tune and use single-cell foundation models.

    import fm
    model = fm.load("runs/demo/model")
    fm.embed(adata, model)          # → adata.obsm["X_fm"]
    clf = fm.load("runs/annotation/model")   # fm finetune recipes/finetune/annotation.yaml …
    fm.annotate(adata, clf)         # → adata.obs["fm_cell_type"], obs["fm_cell_type_confidence"], …
    clf = fm.finetune("runs/demo/model", reference, task="annotation", output_dir="runs/annot")
"""
from fm.api import annotate, embed, load
from fm.configuration_scfm import ScFMConfig
from fm.heads import ScFMForCellClassification  # importing registers the head Auto classes
from fm.modeling_scfm import ScFMForMaskedExpression, ScFMModel  # importing registers the Auto classes
from fm.tasks import finetune
from fm.tokenizer import CellTokenizer
from fm.vocab import GeneVocab

__version__ = "0.1.0"

_TASK_API = {"impute": "fm.tasks.imputation", "integrate": "fm.tasks.batch_correction",
             "predict_protein": "fm.tasks.modality_prediction", "interactions": "fm.tasks.cci",
             "transfer_labels": "fm.tasks.annotation"}
"""Task functions, imported on first use (fm.impute → fm.tasks.imputation.impute)."""


def __getattr__(name: str):
    if name in _TASK_API:
        import importlib

        return getattr(importlib.import_module(_TASK_API[name]), name)
    raise AttributeError(f"module 'fm' has no attribute {name!r}")


__all__ = ["CellTokenizer", "GeneVocab", "ScFMConfig", "ScFMForCellClassification", "ScFMForMaskedExpression",
           "ScFMModel", "annotate", "embed", "finetune", "impute", "integrate", "interactions", "load",
           "predict_protein", "transfer_labels"]
