"""Token embeddings of the scfm model: gene rows (compact or full table, any row order), value encodings
(embedding table, scGPT's continuous MLP, or scaling), the <cls> and condition prefix. modeling_scfm.py builds
the backbone on them; kept apart so that file stays readable.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_scfm import ScFMConfig

# ---------------------------------------------------------------------------------------------
# Embeddings


class ScFMContinuousValueEncoder(nn.Module):
    """scGPT's ContinuousValueEncoder for float values: Linear(1, D) -> ReLU -> Linear(D, D) -> LayerNorm.

    Masked and padded positions carry the encoding's negative sentinels (mask_value_id = -1.0,
    pad_value_id = -2.0; real values are log1p >= 0) in the same `values` tensor, so the batch
    format is the discrete encodings'; those positions get a learned vector (`special`: row 0
    <mask>, row 1 <pad>) instead of the MLP of a meaningless number.

    With config.learned_value_sentinels False (scGPT), every value goes through the MLP, clamped only
    at config.value_max (scGPT's 512).
    """

    def __init__(self, config: ScFMConfig):
        super().__init__()
        self.mask_value, self.pad_value = config.mask_value_id, config.pad_value_id
        self.value_max = config.value_max
        self.fc1 = nn.Linear(1, config.d_model)
        self.fc2 = nn.Linear(config.d_model, config.d_model)
        self.norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.special = nn.Embedding(2, config.d_model) if config.learned_value_sentinels else None

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        if self.special is None:  # scGPT: the sentinels are numbers like any other
            x = values.clamp(max=self.value_max) if self.value_max is not None else values
            return self.norm(self.fc2(F.relu(self.fc1(x.unsqueeze(-1).to(self.fc1.weight.dtype)))))
        x = values.clamp(min=0, max=self.value_max).unsqueeze(-1).to(self.fc1.weight.dtype)  # (B, L, 1)
        h = self.norm(self.fc2(F.relu(self.fc1(x))))
        special = (values == self.mask_value) | (values == self.pad_value)
        learned = self.special((values == self.pad_value).long())  # through forward: ZeRO-3 gathers it
        return torch.where(special.unsqueeze(-1), learned.to(h.dtype), h)


class ScFMEmbeddings(nn.Module):
    """Token embeddings of [<cls>, conditions, genes]: gene + value embedding for gene tokens.

    Prefix tokens carry no expression value, so they get no value embedding: <cls> is the gene
    embedding of `cls_token_id`, a condition token is a row of its own table (id 0 = unknown).
    The value embedding follows config.value_encoding: a table of value ids for the discrete
    encodings (bins, rank), `ScFMContinuousValueEncoder` for "continuous".
    """

    def __init__(self, config: ScFMConfig):
        super().__init__()
        self.config = config
        if config.gene_table is None:  # full table (and every checkpoint from before compact tables): row = vocab id
            self.gene_index = None
            self.gene = nn.Embedding(config.vocab_size, config.d_model, padding_idx=config.pad_token_id)
        else:  # compact table: gene_index[vocab id] = its row. Non-persistent: config.gene_table is the one copy
            self.register_buffer("gene_index", build_gene_index(config), persistent=False)
            pad_row = config.gene_table.index(config.pad_token_id)
            self.gene = nn.Embedding(len(config.gene_table), config.d_model, padding_idx=pad_row)
        encoding = config.encoding
        if config.value_combine == "scale":  # scGPT's "scaling": the value number multiplies the gene vector
            self.value = None
        elif encoding.discrete:  # n_bins levels + <mask> value (n_bins) + <pad> value (n_bins + 1)
            self.value = nn.Embedding(encoding.n_tokens, config.d_model)
        else:
            self.value = ScFMContinuousValueEncoder(config)
        self.value_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps) if config.value_norm else None
        # one table per condition key, in config.condition_keys order (names conditions.0, .1, …)
        self.conditions = nn.ModuleList(nn.Embedding(n, config.d_model) for n in config.condition_vocab_sizes)
        self.gene_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps) if config.gene_norm else None
        self.norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps) if config.embedding_norm else None
        self.dropout = nn.Dropout(config.dropout)

    def embed_genes(self, gene_ids: torch.Tensor) -> torch.Tensor:
        """Gene vectors of vocabulary ids (any shape → shape + (D,)): the one way every head reads the gene table.

        A compact table first turns vocab ids into rows; an id without a row gets the (zero, never trained)
        padding row rather than an error, which would cost a device sync per step — the tokenizer drops such
        genes before they get here (CellTokenizer.gene_table). The lookup stays `self.gene(...)` (never
        `self.gene.weight[...]`): ZeRO-3 gathers the sharded table only inside the module's own forward.
        """
        if self.gene_index is not None:
            gene_ids = self.gene_index[gene_ids]
        rows = self.gene(gene_ids)
        return rows if self.gene_norm is None else self.gene_norm(rows)

    def forward(self, gene_ids: torch.Tensor, values: torch.Tensor, condition_ids: torch.Tensor | None):
        B = gene_ids.shape[0]
        tokens = self.embed_genes(torch.cat([gene_ids.new_full((B, 1), self.config.cls_token_id), gene_ids], 1))
        cls = tokens[:, :1]  # (B, 1, D)
        if self.config.cls_value:  # scGPT: <cls> is a gene token whose value is the pad value
            cls = self._with_values(cls, values.new_full((B, 1), self.config.pad_value_id))
        prefix = [cls]
        if self.conditions:
            if condition_ids is None:  # no conditions given = all unknown (id 0)
                condition_ids = gene_ids.new_zeros(B, len(self.conditions))
            if condition_ids.shape != (B, len(self.conditions)):
                raise ValueError(
                    f"condition_ids must be (B, {len(self.conditions)}) for {self.config.condition_keys}, "
                    f"got {tuple(condition_ids.shape)}"
                )
            prefix += [table(condition_ids[:, i : i + 1]) for i, table in enumerate(self.conditions)]
        genes = self._with_values(tokens[:, 1:], values)  # (B, L, D)
        x = torch.cat(prefix + [genes], dim=1)  # (B, T, D)
        return self.dropout(x if self.norm is None else self.norm(x))


    def _with_values(self, genes: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Gene vectors combined with their values: + value embedding, or × the value number ("scale")."""
        if self.value is None:
            return genes * values.unsqueeze(-1).to(genes.dtype)
        v = self.value(values)
        return genes + (v if self.value_norm is None else self.value_norm(v))


def build_gene_index(config: ScFMConfig) -> torch.Tensor:
    """(vocab_size,) long: row of each vocabulary id in the compact table config.gene_table, else the pad row."""
    table = torch.tensor(config.gene_table, dtype=torch.long)
    index = torch.full((config.vocab_size,), config.gene_table.index(config.pad_token_id), dtype=torch.long)
    index[table] = torch.arange(len(table))
    return index


__all__ = ["ScFMContinuousValueEncoder", "ScFMEmbeddings", "build_gene_index"]
