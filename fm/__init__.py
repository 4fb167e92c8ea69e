"""scfm: pretrain, fine-tune and use single-cell foundation models.

    import fm
    model = fm.load("runs/demo/model")
    fm.embed(adata, model)          # → adata.obsm["X_fm"]
    clf = fm.load("runs/annotation/model")   # fm finetune recipes/finetune/annotation.yaml …
    fm.annotate(adata, clf)         # → adata.obs["fm_cell_type"], obs["fm_cell_type_confidence"], …
"""
from fm.api import annotate, embed, load
from fm.configuration_scfm import ScFMConfig
from fm.heads import ScFMForCellClassification  # importing registers the head Auto classes
from fm.modeling_scfm import ScFMForMaskedExpression, ScFMModel  # importing registers the Auto classes
from fm.tokenizer import CellTokenizer
from fm.vocab import GeneVocab

__version__ = "0.1.0"
__all__ = ["CellTokenizer", "GeneVocab", "ScFMConfig", "ScFMForCellClassification", "ScFMForMaskedExpression",
           "ScFMModel", "annotate", "embed", "load"]
