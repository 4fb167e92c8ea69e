"""scfm: pretrain, fine-tune and use single-cell foundation models.

    import fm
    model = fm.load("runs/demo/model")
    fm.embed(adata, model)          # → adata.obsm["X_fm"]
"""
from fm.api import embed, load
from fm.configuration_scfm import ScFMConfig
from fm.modeling_scfm import ScFMForMaskedExpression, ScFMModel  # importing registers the Auto classes
from fm.tokenizer import CellTokenizer
from fm.vocab import GeneVocab

__version__ = "0.1.0"
__all__ = ["CellTokenizer", "GeneVocab", "ScFMConfig", "ScFMForMaskedExpression", "ScFMModel", "embed", "load"]
