"""scfm model, transformers-style, bottom-up: embeddings -> attention -> block -> PreTrainedModel
-> ScFMModel (backbone) -> ScFMForMaskedExpression (pretraining heads + loss).

A cell is a SET of genes, so there is no positional embedding; the model prepends its own prefix
[<cls>, cond_1..cond_C] to the gene tokens. Shapes: B cells, L gene tokens, P = n_prefix,
T = P + L, D = d_model, H heads of size D/H.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoTokenizer, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .attention_scfm import ScFMBlock
from .configuration_scfm import ScFMConfig
from .embeddings_scfm import ScFMContinuousValueEncoder, ScFMEmbeddings, build_gene_index
from .objectives import (ScFMExpressionHead, ScFMMVCHead, ScFMWholeCellHead, masked_mse, prepare_masks,
                         view_contrastive_loss)

# ---------------------------------------------------------------------------------------------
# PreTrainedModel


class ScFMPreTrainedModel(PreTrainedModel):
    config_class = ScFMConfig
    base_model_prefix = "scfm"  # every ScFMFor* holds its backbone as `self.scfm`
    main_input_name = "gene_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True  # default attention: F.scaled_dot_product_attention; "eager" too (fm/attention_scfm.py)
    _no_split_modules = ["ScFMBlock"]  # device_map keeps a block (its residual stream) on one device
    # Task heads live in attributes named `*_head`; loading the bare backbone from a head
    # checkpoint (AutoModel.from_pretrained) drops those keys on purpose, so they are not reported.
    _keys_to_ignore_on_load_unexpected = [r"^\w+_head\."]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """BERT/GPT-2 init: N(0, initializer_range) weights, zero biases, identity LayerNorms.

        `transformers.initialization` functions skip tensors already loaded from a checkpoint.
        """
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
            # the padding gene row stays zero (nn.Embedding also never updates it)
            if module.padding_idx is not None and not getattr(module.weight, "_is_hf_initialized", False):
                init.zeros_(module.weight[module.padding_idx])
        elif isinstance(module, ScFMEmbeddings) and module.gene_index is not None:
            # a non-persistent buffer: from_pretrained leaves it uninitialised (meta → empty); rebuild it
            init.copy_(module.gene_index, build_gene_index(module.config))
        elif isinstance(module, (nn.LayerNorm, nn.BatchNorm1d)):  # BatchNorm: task heads' input scaling
            init.ones_(module.weight)
            init.zeros_(module.bias)
            if isinstance(module, nn.BatchNorm1d):
                init.zeros_(module.running_mean)
                init.ones_(module.running_var)
                init.zeros_(module.num_batches_tracked)


# ---------------------------------------------------------------------------------------------
# Backbone


def build_backbone(config: ScFMConfig) -> ScFMPreTrainedModel:
    """The backbone a config describes: ScFMModel, or ScFMBertModel for an imported BERT (config.backbone "bert").
    Every head builds its `self.scfm` here."""
    if config.backbone == "bert":
        from .modeling_bert import ScFMBertModel  # modeling_bert imports this module

        return ScFMBertModel(config)
    return ScFMModel(config)


def _bert_variant(cls, config):
    """The BERT-backbone class to build instead of `cls` (AutoModel / AutoModelForMaskedLM map model_type "scfm"
    to ScFMModel / ScFMForMaskedExpression, whatever the backbone), or None."""
    if not isinstance(config, ScFMConfig) or config.backbone != "bert":
        return None
    from . import modeling_bert

    return {ScFMModel: modeling_bert.ScFMBertModel,
            ScFMForMaskedExpression: modeling_bert.ScFMBertForMaskedLM}.get(cls)


class _BackboneDispatch:
    """from_pretrained / from_config of the scfm-backbone classes build the BERT twin for a "bert" config."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        config = kwargs.get("config")
        if not isinstance(config, ScFMConfig) and cls in (ScFMModel, ScFMForMaskedExpression):
            try:
                config = ScFMConfig.from_pretrained(pretrained_model_name_or_path)
            except (OSError, ValueError):
                config = None
        other = _bert_variant(cls, config)
        if other is not None:
            if not isinstance(kwargs.get("config"), ScFMConfig):
                kwargs["config"] = config
            return other.from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    @classmethod
    def _from_config(cls, config, **kwargs):
        other = _bert_variant(cls, config)
        return other._from_config(config, **kwargs) if other is not None else super()._from_config(config, **kwargs)




def resolve_inputs(config: ScFMConfig, gene_ids: torch.Tensor | None, values: torch.Tensor | None,
                   input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                   attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(gene_ids, values) of a forward call, whatever generic tooling passed.

    `input_ids` is an alias of `gene_ids` (PEFT's SEQ_CLS wrapper and pipelines pass input_ids=…);
    `inputs_embeds` is refused (a token's embedding is built inside from its gene AND its value). Without
    `values` every real gene gets the encoding's <mask> value ("expression unknown": the value the model learned
    to read at masked positions in pretraining) and padding the <pad> value, so a model called with only its main
    input runs and gives a cell embedding of the gene set alone; pass real values for meaningful expression."""
    if inputs_embeds is not None:
        raise ValueError("scfm models take gene_ids and values, not inputs_embeds: a token's embedding is the sum "
                         "of its gene's and its value's embeddings, built inside the model (ScFMEmbeddings)")
    if gene_ids is None:
        gene_ids = input_ids
    elif input_ids is not None and input_ids is not gene_ids:
        raise ValueError("pass gene_ids or its alias input_ids, not both")
    if gene_ids is None:
        raise ValueError("gene_ids (or its alias input_ids) is required: (B, L) gene vocabulary ids")
    if values is None:
        real = gene_ids != config.pad_token_id if attention_mask is None else attention_mask.bool()
        dtype = torch.long if config.encoding.discrete else torch.float32
        values = torch.where(real, torch.tensor(config.mask_value_id, dtype=dtype, device=gene_ids.device),
                             torch.tensor(config.pad_value_id, dtype=dtype, device=gene_ids.device))
    return gene_ids, values


def output_flags(config: ScFMConfig, output_attentions: bool | None, output_hidden_states: bool | None,
                 return_dict: bool | None) -> tuple[bool, bool, bool]:
    """The call's flags, each defaulting to the config's (transformers' convention)."""
    return (config.output_attentions if output_attentions is None else bool(output_attentions),
            config.output_hidden_states if output_hidden_states is None else bool(output_hidden_states),
            config.return_dict if return_dict is None else bool(return_dict))


@dataclass
class ScFMModelOutput(ModelOutput):
    """last_hidden_state (B, P+L, D) after the final LayerNorm; cell_embedding (B, D);
    gene_hidden_states (B, L, D) = last_hidden_state without the prefix; with output_hidden_states,
    hidden_states: n_layers + 1 tensors (B, P+L, D), the embeddings' output first and last_hidden_state last
    (zeros at padding, like last_hidden_state); with output_attentions, attentions: n_layers (B, H, T, T)."""

    last_hidden_state: torch.FloatTensor | None = None
    cell_embedding: torch.FloatTensor | None = None
    gene_hidden_states: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


class ScFMModel(_BackboneDispatch, ScFMPreTrainedModel):
    """Backbone: embeddings -> n_layers Pre-LN blocks -> final LayerNorm -> cell embedding."""

    def __init__(self, config: ScFMConfig):
        super().__init__(config)
        self.embeddings = ScFMEmbeddings(config)
        self.layers = nn.ModuleList(ScFMBlock(config) for _ in range(config.n_layers))
        # Post-LN blocks end in a LayerNorm already
        self.norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps) if config.norm_first else nn.Identity()
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.gene

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings.gene = value

    def _attention_mask(self, key_real, masked_positions, drop_full: bool = True):
        """Bool SDPA mask (True = may attend) over the T = P + L tokens (key_real (B, T): real tokens), or None
        when every key is visible and drop_full (lets SDPA pick its flash kernel; a data-dependent branch, so
        not when compiling). Prefix tokens are real and never masked, so every query row keeps at least P
        visible keys: no fully masked row, no NaN. Built once per forward."""
        B, T = key_real.shape
        P = self.config.n_prefix
        if self.config.generative_mask and masked_positions is not None:
            # scGPT's generative mask: a masked gene is visible only to itself
            key_masked = torch.cat([masked_positions.new_zeros(B, P), masked_positions.bool()], dim=1)
            key_masked &= key_real
            eye = torch.eye(T, dtype=torch.bool, device=key_real.device)
            allowed = key_real[:, None, :] & (~key_masked[:, None, :] | eye)  # (B, T, T): [b, q, k]
            return allowed[:, None]  # (B, 1, T, T)
        if drop_full and bool(key_real.all()):
            return None
        return key_real[:, None, None, :]  # (B, 1, 1, T)

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
        """gene_ids: (B, L) long, values: (B, L) long ids or float (continuous encoding), gene tokens
        only (padding = pad_token_id / pad_value_id; None: see resolve_inputs);
        attention_mask: (B, L), 1 = real gene (default gene_ids != pad); condition_ids: (B, C) long;
        masked_positions: (B, L) bool, only read for the generative attention mask; input_ids: alias of gene_ids."""
        gene_ids, values = resolve_inputs(self.config, gene_ids, values, input_ids, inputs_embeds, attention_mask)
        output_attentions, output_hidden_states, return_dict = output_flags(
            self.config, output_attentions, output_hidden_states, return_dict)
        if attention_mask is None:
            attention_mask = gene_ids != self.config.pad_token_id
        attention_mask = attention_mask.bool()
        P = self.config.n_prefix

        x = self.embeddings(gene_ids, values, condition_ids)  # (B, T, D)
        B, T, D = x.shape
        key_real = torch.cat([attention_mask.new_ones(B, P), attention_mask], dim=1)  # (B, T)
        # Padding does no work: with padded cells the blocks run on the N real tokens packed as (N, D) (index =
        # their flat positions). On CPU the attention then runs per cell on them (`lengths`); elsewhere (GPU
        # kernels want one big call) and with the generative mask it sees the padded (B, T) layout. Padded
        # positions of last_hidden_state come out as zeros. The packing is data-dependent (a sync, a
        # data-sized tensor), so torch.compile / torch.export, eager attention and output_attentions take the
        # padded (B, T, D) path with the key-padding mask instead, and zero the padded positions to match.
        compiling = torch.compiler.is_compiling()
        padded = compiling or output_attentions or self.config._attn_implementation == "eager"
        index = None if padded or bool(key_real.all()) else key_real.view(-1).nonzero().squeeze(1)
        per_cell = index is not None and x.device.type == "cpu" and not (
            self.config.generative_mask and masked_positions is not None)
        lengths = key_real.sum(1).tolist() if per_cell else None
        mask = None if per_cell else self._attention_mask(key_real, masked_positions, drop_full=not compiling)
        if index is not None:
            def unpack(h):  # packed (N, D) → padded (B, T, D), zeros at padding
                return h.new_zeros(B * T, D).index_copy(0, index, h).view(B, T, D)
            x = x.reshape(B * T, D).index_select(0, index)
        elif padded:
            def unpack(h):
                return h.masked_fill(~key_real[..., None], 0.0)
        else:  # no padding
            def unpack(h):
                return h
        hidden_states = [unpack(x)] if output_hidden_states else None
        attentions = [] if output_attentions else None
        for layer in self.layers:
            # positional args: required by gradient checkpointing
            x, weights = layer(x, mask, index, (B, T), lengths, output_attentions)
            if output_hidden_states:
                hidden_states.append(unpack(x))
            if output_attentions:
                attentions.append(weights)
        x = unpack(self.norm(x))
        if output_hidden_states:  # the last entry is the final (normed) output, as GPT-2's
            hidden_states[-1] = x

        genes = x[:, P:]  # (B, L, D)
        if self.config.pooling == "cls":
            cell = x[:, 0]
        else:  # mean over real gene tokens (a cell with no gene gets the zero vector)
            w = attention_mask.unsqueeze(-1).to(x.dtype)
            cell = (genes * w).sum(1) / w.sum(1).clamp(min=1.0)
        out = ScFMModelOutput(last_hidden_state=x, cell_embedding=cell, gene_hidden_states=genes,
                              hidden_states=tuple(hidden_states) if output_hidden_states else None,
                              attentions=tuple(attentions) if output_attentions else None)
        return out if return_dict else out.to_tuple()


# ---------------------------------------------------------------------------------------------
# Masked expression modelling (pretraining): GEP + MVC heads


@dataclass
class ScFMMaskedExpressionOutput(ModelOutput):
    """loss = gep_loss + mvc_loss (when labels given); expression / mvc_expression (B, L) are
    predictions of config.encoding.target(labels): labels / (n_bins - 1), on the [0, 1] scale,
    for the discrete encodings; the log1p-normalised value itself for "continuous"."""

    loss: torch.FloatTensor | None = None
    gep_loss: torch.FloatTensor | None = None
    mvc_loss: torch.FloatTensor | None = None
    wced_loss: torch.FloatTensor | None = None
    contrastive_loss: torch.FloatTensor | None = None
    expression: torch.FloatTensor | None = None
    mvc_expression: torch.FloatTensor | None = None
    cell_embedding: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


class ScFMForMaskedExpression(_BackboneDispatch, ScFMPreTrainedModel):
    """Backbone + GEP head (expression from each gene's hidden state) + optional MVC head.

    Targets come from the value encoding (`config.encoding.target`): the true bins/levels scaled
    to [0, 1] (labels / (n_bins - 1)), so the MSE starts at O(0.1) whatever n_bins is and both
    losses are on the same scale; for "continuous" the true log1p-normalised values.
    """

    def __init__(self, config: ScFMConfig):
        super().__init__(config)
        self.scfm = ScFMModel(config)
        self.gep_head = ScFMExpressionHead(config)
        self.mvc_head = ScFMMVCHead(config) if config.mvc else None
        self.wced_head = ScFMWholeCellHead(config) if config.wced_genes else None
        # SimCLR's projection: the loss shapes proj(cell), the embedding below it keeps more of the cell
        self.contrastive_head = (nn.Sequential(nn.Linear(config.d_model, config.d_model), nn.GELU(),
                                               nn.Linear(config.d_model, config.d_model))
                                 if config.contrastive_weight else None)
        self.post_init()

    def forward(
        self,
        gene_ids: torch.Tensor | None = None,
        values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        condition_ids: torch.Tensor | None = None,
        masked_positions: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        decode_gene_ids: torch.Tensor | None = None,
        decode_targets: torch.Tensor | None = None,
        decode_weights: torch.Tensor | None = None,
        view_of: torch.Tensor | None = None,
        return_dict: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: None = None,
    ) -> ScFMMaskedExpressionOutput | tuple:
        """labels: (B, L) true value of every gene token; masked_positions: (B, L) bool, the
        positions scored by the loss (default: values == mask_value_id); decode_gene_ids (K,),
        decode_targets / decode_weights (B, K): the whole-cell decoding targets (CellCollator.decode_genes)."""
        gene_ids, values = resolve_inputs(self.config, gene_ids, values, input_ids, inputs_embeds, attention_mask)
        return_dict = output_flags(self.config, None, None, return_dict)[2]
        attention_mask, masked_positions = prepare_masks(self.config, gene_ids, values, attention_mask,
                                                         masked_positions)
        out = self.scfm(gene_ids, values, attention_mask, condition_ids, masked_positions,
                        output_attentions=output_attentions, output_hidden_states=output_hidden_states)
        expression = self.gep_head(out.gene_hidden_states)  # (B, L)
        mvc_expression = None
        if self.mvc_head is not None:
            mvc_expression = self.mvc_head(self.scfm.embeddings.embed_genes(gene_ids), out.cell_embedding)

        loss = gep_loss = mvc_loss = None
        if labels is not None:
            target = self.config.encoding.target(labels.to(expression.dtype))
            gep_loss = masked_mse(expression, target, masked_positions)
            loss = self.config.gep_weight * gep_loss
            if mvc_expression is not None:
                mvc_loss = masked_mse(mvc_expression, target, masked_positions)
                loss = loss + mvc_loss
        wced_loss = None
        if self.wced_head is not None and decode_gene_ids is not None and decode_targets is not None:
            decoded = self.wced_head(self.scfm.embeddings.embed_genes(decode_gene_ids), out.cell_embedding)
            wced_loss = masked_mse(decoded, decode_targets, decode_weights)
            loss = self.config.wced_weight * wced_loss if loss is None else loss + self.config.wced_weight * wced_loss
        contrastive_loss = None
        if self.contrastive_head is not None and view_of is not None:
            contrastive_loss = view_contrastive_loss(self.contrastive_head(out.cell_embedding), view_of,
                                                     self.config.contrastive_temperature)
            weighted = self.config.contrastive_weight * contrastive_loss
            loss = weighted if loss is None else loss + weighted

        result = ScFMMaskedExpressionOutput(
            loss=loss,
            gep_loss=gep_loss,
            mvc_loss=mvc_loss,
            wced_loss=wced_loss,
            contrastive_loss=contrastive_loss,
            expression=expression,
            mvc_expression=mvc_expression,
            cell_embedding=out.cell_embedding,
            last_hidden_state=out.last_hidden_state,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
        )
        return result if return_dict else result.to_tuple()


# ---------------------------------------------------------------------------------------------
# Auto classes


def register_auto_classes() -> None:
    """Make AutoConfig / AutoModel / AutoModelForMaskedLM resolve model_type "scfm"
    (idempotent: `exist_ok=True` so re-imports and reloads do not raise). An export's remote-code copy of this
    file, loaded with trust_remote_code in a process where scfm is imported, leaves scfm's registration alone."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    current = getattr(CONFIG_MAPPING, "_extra_content", {}).get("scfm")
    if current is not None and current.__module__.startswith("fm.") and not ScFMConfig.__module__.startswith("fm."):
        return
    AutoConfig.register("scfm", ScFMConfig, exist_ok=True)
    AutoModel.register(ScFMConfig, ScFMModel, exist_ok=True)
    AutoModelForMaskedLM.register(ScFMConfig, ScFMForMaskedExpression, exist_ok=True)
    try:  # AutoTokenizer → the CellTokenizer (not in an export's remote-code copy of this file)
        from .tokenization_scfm import ScFMAutoTokenizer
    except ImportError:
        return
    AutoTokenizer.register(ScFMConfig, tokenizer_class=ScFMAutoTokenizer, exist_ok=True)


register_auto_classes()

__all__ = [
    "ScFMConfig",
    "ScFMContinuousValueEncoder",
    "ScFMPreTrainedModel",
    "ScFMModel",
    "ScFMModelOutput",
    "ScFMForMaskedExpression",
    "ScFMMaskedExpressionOutput",
    "build_backbone",
    "output_flags",
    "register_auto_classes",
    "resolve_inputs",
]
