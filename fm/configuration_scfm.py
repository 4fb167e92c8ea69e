"""ScFMConfig: the hyper-parameters of the scfm backbone and its heads (a Hugging Face config).

A classic keyword `__init__` (not v5 dataclass fields) so the same file works with
transformers 4.x and 5.x; every default is explained in one comment.
"""
from __future__ import annotations

from transformers import PretrainedConfig

from fm.value_encoding import VALUE_ENCODINGS, ValueEncoding, check_n_bins, get_value_encoding

POOLINGS = ("cls", "mean")


class ScFMConfig(PretrainedConfig):
    """Config of `ScFMModel` / `ScFMFor*`. Sequence = [<cls>, cond_1..cond_C, gene_1..gene_L]."""

    model_type = "scfm"
    # Standard names that generic tooling reads (e.g. accelerate's DeepSpeed "auto" bucket sizes
    # use `config.hidden_size`) map onto our short names.
    attribute_map = {
        "hidden_size": "d_model",
        "num_hidden_layers": "n_layers",
        "num_attention_heads": "n_heads",
        "intermediate_size": "d_ff",
    }

    def __init__(
        self,
        vocab_size: int = 136_000,  # gene vocab incl. special tokens; the tokenizer sets the real size
        n_bins: int = 51,  # value tokens 0..n_bins-1 are expression bins (0 = not expressed), as scGPT
        value_encoding: str = "bins",  # counts -> values: "bins" | "rank" | "continuous" (fm.value_encoding)
        d_model: int = 512,  # hidden size, scGPT's
        n_layers: int = 12,  # transformer blocks, scGPT's
        n_heads: int = 8,  # attention heads (head dim 64 at d_model 512)
        d_ff: int = 2048,  # MLP width, the usual 4 * d_model
        dropout: float = 0.1,  # embedding / residual dropout, BERT/scGPT default
        attention_dropout: float = 0.0,  # off: lets SDPA use its fastest kernels
        max_genes: int = 1200,  # gene tokens per cell, excluding the prefix (scGPT's 1200)
        condition_keys: list[str] | None = None,  # obs columns that become prefix tokens (batch, assay…)
        condition_vocab_sizes: list[int] | None = None,  # table size per key; id 0 = unknown/missing
        pooling: str = "cls",  # cell embedding = hidden state at <cls> ("cls") or mean over genes ("mean")
        generative_mask: bool = False,  # scGPT's mask: masked genes are seen only by themselves
        zero_fraction: float = 0.0,  # share of max_genes given to measured-but-unexpressed genes (bin 0)
        mvc: bool = True,  # add scGPT's masked-value-prediction-from-cell-embedding (MVC) loss
        layer_norm_eps: float = 1e-5,  # PyTorch's LayerNorm default
        initializer_range: float = 0.02,  # std of the normal init, BERT/GPT-2's
        pad_token_id: int = 0,  # gene-vocab ids of the special tokens, fixed by the tokenizer
        cls_token_id: int = 1,
        mask_token_id: int = 2,
        **kwargs,
    ):
        self.vocab_size = int(vocab_size)
        self.n_bins = int(n_bins)
        self.value_encoding = str(value_encoding)
        self.d_model = int(d_model)
        self.n_layers = int(n_layers)
        self.n_heads = int(n_heads)
        self.d_ff = int(d_ff)
        self.dropout = float(dropout)
        self.attention_dropout = float(attention_dropout)
        self.max_genes = int(max_genes)
        self.condition_keys = [str(k) for k in (condition_keys or [])]
        self.condition_vocab_sizes = [int(n) for n in (condition_vocab_sizes or [])]
        self.pooling = pooling
        self.generative_mask = bool(generative_mask)
        if not 0.0 <= zero_fraction < 1.0:
            raise ValueError(f"zero_fraction must be in [0, 1), got {zero_fraction}")
        self.zero_fraction = float(zero_fraction)
        self.mvc = bool(mvc)
        self.layer_norm_eps = float(layer_norm_eps)
        self.initializer_range = float(initializer_range)
        self.cls_token_id = int(cls_token_id)
        self.mask_token_id = int(mask_token_id)
        self._validate()
        super().__init__(pad_token_id=pad_token_id, **kwargs)

    def _validate(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if len(self.condition_keys) != len(self.condition_vocab_sizes):
            raise ValueError(
                f"condition_keys ({len(self.condition_keys)}: {self.condition_keys}) and condition_vocab_sizes "
                f"({len(self.condition_vocab_sizes)}: {self.condition_vocab_sizes}) must have the same length"
            )
        if len(set(self.condition_keys)) != len(self.condition_keys):
            raise ValueError(f"condition_keys has duplicates: {self.condition_keys}")
        if any(n < 1 for n in self.condition_vocab_sizes):
            raise ValueError(f"every condition vocab size must be >= 1 (id 0 = unknown), got {self.condition_vocab_sizes}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        check_n_bins(self.n_bins)
        if self.value_encoding not in VALUE_ENCODINGS:
            raise ValueError(f"value_encoding must be one of {sorted(VALUE_ENCODINGS)}, "
                             f"got {self.value_encoding!r}")
        for name in ("dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_genes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def encoding(self) -> ValueEncoding:
        """The value encoding the collator must use with this model (built from value_encoding, n_bins)."""
        return get_value_encoding(self.value_encoding, self.n_bins)

    @property
    def mask_value_id(self) -> int | float:
        """Value of a masked gene (the model must predict it); defined by the encoding."""
        return self.encoding.mask_value_id

    @property
    def pad_value_id(self) -> int | float:
        """Value at padding positions; defined by the encoding."""
        return self.encoding.pad_value_id

    @property
    def n_prefix(self) -> int:
        """Tokens the model prepends: <cls> + one per condition."""
        return 1 + len(self.condition_keys)


__all__ = ["ScFMConfig"]
