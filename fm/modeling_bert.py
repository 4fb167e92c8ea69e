"""A BERT backbone for imported Geneformer checkpoints: transformers' own `BertModel` (not re-implemented) behind
scfm's backbone interface, so every head, `fm.embed`, `fm.finetune` and `fm.annotate` run on it unchanged.

Inputs are scfm's: `gene_ids` (B, L) in our vocabulary, left-aligned in Geneformer's rank-value order (the
collator's `gene_medians` mode, fm/data/collator.py), padding = pad id. `ScFMBertModel` maps them to the
checkpoint's token rows through `gene_index` (config.gene_table = our id of each word-embedding row), adds
<cls> ... <eos> around each cell for V2 checkpoints (config.add_cls_eos), and pools the cell embedding as
Geneformer's EmbExtractor does: the hidden states of layer `config.embedding_layer` (its emb_layer: -1 the
penultimate, 0 the last), mean over the gene tokens ("mean", V1 and V2's "cell" mode; <cls>/<eos> excluded)
or the <cls> token ("cls", V2's default). Values are ignored: a Geneformer cell is its gene order.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import BertConfig, BertModel
from transformers import initialization as init
from transformers.models.bert.modeling_bert import BertOnlyMLMHead
from transformers.utils import ModelOutput

from .configuration_scfm import ScFMConfig
from .modeling_scfm import ScFMModelOutput, ScFMPreTrainedModel, build_gene_index, output_flags, resolve_inputs


def bert_config_of(config: ScFMConfig) -> BertConfig:
    """The checkpoint's BertConfig (config.bert_config) for the wrapped BertModel."""
    if config.backbone != "bert" or config.bert_config is None:
        raise ValueError(f"a BERT backbone needs config.backbone 'bert' and bert_config, got {config.backbone!r}")
    kwargs = {k: v for k, v in config.bert_config.items() if k not in ("architectures", "model_type", "transformers_version")}
    return BertConfig(**kwargs)


class _BertGeneEmbeddings:
    """What heads read from `backbone.embeddings` (the gene table and `embed_genes`), over BERT's word embeddings."""

    conditions = ()

    def __init__(self, model: "ScFMBertModel"):
        self._model = model

    @property
    def gene(self) -> nn.Embedding:
        return self._model.bert.embeddings.word_embeddings

    def embed_genes(self, gene_ids: torch.Tensor) -> torch.Tensor:
        """Word-embedding rows of vocabulary ids (input embeddings, before positions and LayerNorm)."""
        return self.gene(self._model.gene_index[gene_ids])


class ScFMBertModel(ScFMPreTrainedModel):
    """Backbone: transformers' BertModel (no pooler) over the checkpoint's token rows → ScFMModelOutput."""

    _no_split_modules = ["BertLayer"]

    def __init__(self, config: ScFMConfig):
        super().__init__(config)
        self.bert = BertModel(bert_config_of(config), add_pooling_layer=False)
        # vocab id → word-embedding row; non-persistent: config.gene_table is the one copy
        self.register_buffer("gene_index", build_gene_index(config), persistent=False)
        self.post_init()

    @property
    def embeddings(self) -> _BertGeneEmbeddings:
        return _BertGeneEmbeddings(self)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        # (the BertModel inside is a PreTrainedModel: transformers applies its own init, buffers included, to it)
        if module is self:  # a non-persistent buffer: from_pretrained leaves it uninitialised; rebuild it
            init.copy_(self.gene_index, build_gene_index(self.config))

    def get_input_embeddings(self) -> nn.Embedding:
        return self.bert.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.bert.embeddings.word_embeddings = value

    def _row(self, vocab_id: int) -> int:
        return self.config.gene_table.index(vocab_id)

    def bert_inputs(self, gene_ids: torch.Tensor, attention_mask: torch.Tensor | None):
        """(input_ids, attention_mask, gene_mask) of BERT: checkpoint token ids (B, T), 1 = real token, and the
        positions of genes (excludes <cls>/<eos>). Genes must be left-aligned (the collator's layout). T is the
        longest cell (+ <cls>/<eos>): the collator's padding to a multiple of 8 must not exceed BERT's positions."""
        if attention_mask is None:
            attention_mask = gene_ids != self.config.pad_token_id
        genes = attention_mask.bool()
        pad_row = self._row(self.config.pad_token_id)
        rows = torch.where(genes, self.gene_index[gene_ids], torch.full_like(gene_ids, pad_row))
        B = rows.shape[0]
        lengths = genes.sum(1)
        n = int(lengths.max()) if B else 0
        if not self.config.add_cls_eos:
            n = max(n, 1)
            return rows[:, :n], genes[:, :n].long(), genes[:, :n]
        ids = torch.cat([rows.new_full((B, 1), self._row(self.config.cls_token_id)), rows[:, :n],
                         rows.new_full((B, 1), pad_row)], 1)
        ids[torch.arange(B, device=ids.device), lengths + 1] = self._row(self.config.eoc_token_id)
        position = torch.arange(n + 2, device=ids.device)
        mask = position[None, :] < (lengths + 2)[:, None]
        gene_mask = (position[None, :] >= 1) & (position[None, :] <= lengths[:, None])
        return ids, mask.long(), gene_mask

    def forward(
        self,
        gene_ids: torch.Tensor | None = None,
        values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        condition_ids: torch.Tensor | None = None,
        masked_positions: torch.Tensor | None = None,
        return_dict: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: None = None,
    ) -> ScFMModelOutput | tuple:
        """gene_ids (B, L) vocab ids in Geneformer's order, left-aligned (input_ids: alias); values, condition_ids,
        masked_positions are accepted for the heads' common call and ignored (a Geneformer cell is its gene order).
        hidden_states / attentions are BertModel's, in BERT's layout (with <cls>/<eos> for V2, trimmed to the
        longest cell): passed through, attentions with BERT's own attn_implementation rules."""
        if gene_ids is None and input_ids is None and inputs_embeds is None:
            raise ValueError("gene_ids (or its alias input_ids) is required: (B, L) gene vocabulary ids")
        gene_ids = gene_ids if gene_ids is not None else input_ids
        if inputs_embeds is not None:
            resolve_inputs(self.config, gene_ids, values, input_ids, inputs_embeds)  # raises its clear error
        output_attentions, output_hidden_states, return_dict = output_flags(
            self.config, output_attentions, output_hidden_states, return_dict)
        ids, mask, gene_mask = self.bert_inputs(gene_ids, attention_mask)
        out = self.bert(input_ids=ids, attention_mask=mask, output_hidden_states=True,
                        output_attentions=output_attentions, return_dict=True)
        hidden = out.hidden_states[len(out.hidden_states) - 1 + self.config.embedding_layer]
        if self.config.pooling == "cls":
            cell = hidden[:, 0]
        else:  # mean over gene tokens (a cell with no gene gets the zero vector)
            w = gene_mask.unsqueeze(-1).to(hidden.dtype)
            cell = (hidden * w).sum(1) / w.sum(1).clamp(min=1.0)
        last = out.last_hidden_state
        genes = last[:, 1:-1] if self.config.add_cls_eos else last
        L = gene_ids.shape[1]  # back to the input's width: one hidden state per gene_ids position (0 at padding)
        genes = nn.functional.pad(genes, (0, 0, 0, L - genes.shape[1])) if genes.shape[1] < L else genes[:, :L]
        result = ScFMModelOutput(last_hidden_state=last, cell_embedding=cell, gene_hidden_states=genes,
                                 hidden_states=out.hidden_states if output_hidden_states else None,
                                 attentions=out.attentions if output_attentions else None)
        return result if return_dict else result.to_tuple()


@dataclass
class ScFMBertMaskedLMOutput(ModelOutput):
    """logits (B, T, vocab rows) over the checkpoint's tokens at every BERT position (with <cls>/<eos> for V2);
    loss: cross-entropy at positions whose `labels` (token rows, -100 = ignore) are given; cell_embedding (B, D)."""

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cell_embedding: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


class ScFMBertForMaskedLM(ScFMPreTrainedModel):
    """ScFMBertModel + BERT's MLM head (`BertOnlyMLMHead`, decoder tied to the word embeddings): a Geneformer
    checkpoint as it was pretrained. Its MLM input is gene *tokens*: masking replaces a token by <mask>, which
    scfm's collator (masking values) does not do, so scfm does not pretrain it; the logits serve checks."""

    _tied_weights_keys = {
        "mlm_head.predictions.decoder.weight": "scfm.bert.embeddings.word_embeddings.weight",
        "mlm_head.predictions.decoder.bias": "mlm_head.predictions.bias",
    }

    def __init__(self, config: ScFMConfig):
        super().__init__(config)
        self.scfm = ScFMBertModel(config)
        self.mlm_head = BertOnlyMLMHead(bert_config_of(config))
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if hasattr(module, "predictions") and hasattr(module.predictions, "bias"):
            init.zeros_(module.predictions.bias)

    def get_output_embeddings(self) -> nn.Linear:
        return self.mlm_head.predictions.decoder

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.mlm_head.predictions.decoder = value

    def forward(
        self,
        gene_ids: torch.Tensor | None = None,
        values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        condition_ids: torch.Tensor | None = None,
        masked_positions: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_dict: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: None = None,
    ) -> ScFMBertMaskedLMOutput | tuple:
        return_dict = output_flags(self.config, None, None, return_dict)[2]
        out = self.scfm(gene_ids, values, attention_mask, output_attentions=output_attentions,
                        output_hidden_states=output_hidden_states, input_ids=input_ids, inputs_embeds=inputs_embeds)
        logits = self.mlm_head(out.last_hidden_state)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten().long(), ignore_index=-100)
        result = ScFMBertMaskedLMOutput(loss=loss, logits=logits, cell_embedding=out.cell_embedding,
                                        last_hidden_state=out.last_hidden_state, hidden_states=out.hidden_states,
                                        attentions=out.attentions)
        return result if return_dict else result.to_tuple()


__all__ = ["ScFMBertForMaskedLM", "ScFMBertMaskedLMOutput", "ScFMBertModel", "bert_config_of"]
