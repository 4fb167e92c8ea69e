"""`AutoTokenizer.from_pretrained(<scfm export>)`: scfm's CellTokenizer, not a text tokenizer.

A cell is tokenized from AnnData counts (genes → ids, counts → expression values), so no Hugging Face text
tokenizer applies; without this entry AutoTokenizer falls back to a generic backend and fails with an error
about sentencepiece. With scfm installed (fm.modeling_scfm registers this class for the "scfm" config) it returns
the export's CellTokenizer; in a process without scfm (the copy of this file in the export, loaded with
trust_remote_code=True) it raises an ImportError saying what to install and what to call instead.
Deliberately standalone: the export copies this file as it is.
"""
from __future__ import annotations

INSTALL_HINT = ("this is an scfm single-cell model: cells are tokenized from AnnData counts by scfm's CellTokenizer, "
                "not by a text tokenizer. Install scfm (pip install scfm) and use fm.load(path).cell_tokenizer "
                "or fm.embed(adata, fm.load(path)); AutoModel.from_pretrained(path, trust_remote_code=True) "
                "gives the network alone")


class ScFMAutoTokenizer:
    """What AutoTokenizer builds for an scfm export: `from_pretrained` returns fm.tokenizer.CellTokenizer."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        try:
            from fm.tokenizer import CellTokenizer
        except ImportError as e:  # the export's copy, in a process without scfm
            raise ImportError(f"{pretrained_model_name_or_path}: {INSTALL_HINT}") from e
        return CellTokenizer.from_pretrained(pretrained_model_name_or_path)

    @classmethod
    def register_for_auto_class(cls, auto_class: str = "AutoTokenizer") -> None:
        """Called by AutoTokenizer on remote-code classes; nothing to register."""


TOKENIZER_CONFIG = {"tokenizer_class": "ScFMAutoTokenizer",
                    "auto_map": {"AutoTokenizer": ["tokenization_scfm.ScFMAutoTokenizer", None]}}
"""The export's tokenizer_config.json: a real Hugging Face tokenizer config pointing at this class (our own
tokenizer files are scfm_vocab.json / cell_tokenizer.json, names no Hugging Face loader reads)."""


__all__ = ["INSTALL_HINT", "ScFMAutoTokenizer", "TOKENIZER_CONFIG"]
