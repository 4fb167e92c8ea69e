"""scfm model, transformers-style, bottom-up: embeddings -> attention -> block -> PreTrainedModel
-> ScFMModel (backbone) -> ScFMForMaskedExpression (pretraining heads + loss).

A cell is a SET of genes, so there is no positional embedding; the model prepends its own prefix
[<cls>, cond_1..cond_C] to the gene tokens. Shapes: B cells, L gene tokens, P = n_prefix,
T = P + L, D = d_model, H heads of size D/H.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from .configuration_scfm import ScFMConfig
from .embeddings_scfm import ScFMContinuousValueEncoder, ScFMEmbeddings, build_gene_index
from .objectives import (ScFMExpressionHead, ScFMMVCHead, ScFMWholeCellHead, masked_mse, prepare_masks,
                         view_contrastive_loss)

# ---------------------------------------------------------------------------------------------
# Attention, MLP, block


class ScFMAttention(nn.Module):
    """Bidirectional multi-head self-attention through `F.scaled_dot_product_attention`."""

    def __init__(self, config: ScFMConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.attention_dropout = config.attention_dropout
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)  # fused q, k, v projection
        self.out = nn.Linear(config.d_model, config.d_model)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None, index: torch.Tensor | None = None,
                shape: tuple[int, int] | None = None, lengths: list[int] | None = None) -> torch.Tensor:
        """x: (B, T, D), or (N, D) real tokens only with `index` (their flat positions in B·T) and shape (B, T):
        the projections then run on real tokens only and just the attention sees the padded layout; with
        `lengths` (tokens per cell, in order) the attention runs cell by cell on the packed tokens instead."""
        qkv = self.qkv(x)
        if lengths is not None:  # CPU: one unmasked SDPA per cell, no padded layout at all (2-2.3x faster at
            N, D = qkv.shape[0], qkv.shape[-1] // 3  # Kang's lengths, batch 32; eval/perf/RESULTS.md)
            q, k, v = qkv.view(N, 3, self.n_heads, D // self.n_heads).permute(1, 2, 0, 3)  # 3 x (H, N, D/H)
            p = self.attention_dropout if self.training else 0.0
            y = torch.cat([F.scaled_dot_product_attention(a[None], b[None], c[None], dropout_p=p)[0]
                           for a, b, c in zip(q.split(lengths, 1), k.split(lengths, 1), v.split(lengths, 1))], 1)
            return self.out(y.transpose(0, 1).reshape(N, D))
        if index is None:
            B, T = x.shape[:2]
        else:  # scatter the real tokens' q, k, v into (B·T, 3D) zeros: padded keys are masked, padded queries dropped
            B, T = shape
            qkv = qkv.new_zeros(B * T, qkv.shape[-1]).index_copy_(0, index, qkv)
        D = qkv.shape[-1] // 3
        # (B, T, 3D) -> 3 x (B, H, T, D/H)
        q, k, v = qkv.view(B, T, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        # attn_mask: bool, True = may attend; (B, 1, 1, T) key padding or (B, 1, T, T) generative
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.attention_dropout if self.training else 0.0
        )
        y = y.transpose(1, 2).reshape(B, T, D)
        if index is not None:
            y = y.view(B * T, D).index_select(0, index)
        return self.out(y)


class ScFMMLP(nn.Module):
    def __init__(self, config: ScFMConfig):
        super().__init__()
        self.fc = nn.Linear(config.d_model, config.d_ff)
        self.proj = nn.Linear(config.d_ff, config.d_model)
        self.act = F.relu if config.activation == "relu" else F.gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.act(self.fc(x)))


class ScFMBlock(GradientCheckpointingLayer):
    """Pre-LN transformer block (config.norm_first; False: Post-LN, PyTorch's TransformerEncoderLayer default
    and scGPT's, x = ln1(x + attn(x)); x = ln2(x + mlp(x))). Subclassing GradientCheckpointingLayer makes
    `model.gradient_checkpointing_enable()` recompute this block's forward in the backward pass
    (the hidden state must be passed positionally for that)."""

    def __init__(self, config: ScFMConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.attn = ScFMAttention(config)
        self.ln2 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.mlp = ScFMMLP(config)
        self.dropout = nn.Dropout(config.dropout)
        self.norm_first = config.norm_first

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, index: torch.Tensor | None = None,
                shape: tuple[int, int] | None = None, lengths: list[int] | None = None) -> torch.Tensor:
        """x: (B, T, D), or (N, D) packed real tokens with `index` and `shape`, or `lengths` (see ScFMAttention):
        every op but the attention is per token, so it runs on real tokens only."""
        if not self.norm_first:
            x = self.ln1(x + self.dropout(self.attn(x, attn_mask, index, shape, lengths)))
            return self.ln2(x + self.dropout(self.mlp(x)))
        x = x + self.dropout(self.attn(self.ln1(x), attn_mask, index, shape, lengths))
        return x + self.dropout(self.mlp(self.ln2(x)))


# ---------------------------------------------------------------------------------------------
# PreTrainedModel


class ScFMPreTrainedModel(PreTrainedModel):
    config_class = ScFMConfig
    base_model_prefix = "scfm"  # every ScFMFor* holds its backbone as `self.scfm`
    main_input_name = "gene_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True  # attention always goes through F.scaled_dot_product_attention
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




@dataclass
class ScFMModelOutput(ModelOutput):
    """last_hidden_state (B, P+L, D) after the final LayerNorm; cell_embedding (B, D);
    gene_hidden_states (B, L, D) = last_hidden_state without the prefix."""

    last_hidden_state: torch.FloatTensor | None = None
    cell_embedding: torch.FloatTensor | None = None
    gene_hidden_states: torch.FloatTensor | None = None


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

    def _attention_mask(self, key_real, masked_positions):
        """Bool SDPA mask (True = may attend) over the T = P + L tokens (key_real (B, T): real tokens), or None
        when every key is visible (lets SDPA pick its flash kernel). Prefix tokens are real and never masked, so
        every query row keeps at least P visible keys: no fully masked row, no NaN. Built once per forward."""
        B, T = key_real.shape
        P = self.config.n_prefix
        if self.config.generative_mask and masked_positions is not None:
            # scGPT's generative mask: a masked gene is visible only to itself
            key_masked = torch.cat([masked_positions.new_zeros(B, P), masked_positions.bool()], dim=1)
            key_masked &= key_real
            eye = torch.eye(T, dtype=torch.bool, device=key_real.device)
            allowed = key_real[:, None, :] & (~key_masked[:, None, :] | eye)  # (B, T, T): [b, q, k]
            return allowed[:, None]  # (B, 1, T, T)
        if bool(key_real.all()):
            return None
        return key_real[:, None, None, :]  # (B, 1, 1, T)

    def forward(
        self,
        gene_ids: torch.Tensor,
        values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        condition_ids: torch.Tensor | None = None,
        masked_positions: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> ScFMModelOutput | tuple:
        """gene_ids: (B, L) long, values: (B, L) long ids or float (continuous encoding), gene tokens
        only (padding = pad_token_id / pad_value_id);
        attention_mask: (B, L), 1 = real gene (default gene_ids != pad); condition_ids: (B, C) long;
        masked_positions: (B, L) bool, only read for the generative attention mask."""
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
        # positions of last_hidden_state come out as zeros.
        index = None if bool(key_real.all()) else key_real.view(-1).nonzero().squeeze(1)
        per_cell = index is not None and x.device.type == "cpu" and not (
            self.config.generative_mask and masked_positions is not None)
        lengths = key_real.sum(1).tolist() if per_cell else None
        mask = None if per_cell else self._attention_mask(key_real, masked_positions)
        if index is not None:
            x = x.reshape(B * T, D).index_select(0, index)
        for layer in self.layers:
            x = layer(x, mask, index, (B, T), lengths)  # positional args: required by gradient checkpointing
        x = self.norm(x)
        if index is not None:
            x = x.new_zeros(B * T, D).index_copy(0, index, x).view(B, T, D)

        genes = x[:, P:]  # (B, L, D)
        if self.config.pooling == "cls":
            cell = x[:, 0]
        else:  # mean over real gene tokens (a cell with no gene gets the zero vector)
            w = attention_mask.unsqueeze(-1).to(x.dtype)
            cell = (genes * w).sum(1) / w.sum(1).clamp(min=1.0)
        out = ScFMModelOutput(last_hidden_state=x, cell_embedding=cell, gene_hidden_states=genes)
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
        gene_ids: torch.Tensor,
        values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        condition_ids: torch.Tensor | None = None,
        masked_positions: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        decode_gene_ids: torch.Tensor | None = None,
        decode_targets: torch.Tensor | None = None,
        decode_weights: torch.Tensor | None = None,
        view_of: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> ScFMMaskedExpressionOutput | tuple:
        """labels: (B, L) true value of every gene token; masked_positions: (B, L) bool, the
        positions scored by the loss (default: values == mask_value_id); decode_gene_ids (K,),
        decode_targets / decode_weights (B, K): the whole-cell decoding targets (CellCollator.decode_genes)."""
        attention_mask, masked_positions = prepare_masks(self.config, gene_ids, values, attention_mask,
                                                         masked_positions)
        out = self.scfm(gene_ids, values, attention_mask, condition_ids, masked_positions)
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
        )
        return result if return_dict else result.to_tuple()


# ---------------------------------------------------------------------------------------------
# Auto classes


def register_auto_classes() -> None:
    """Make AutoConfig / AutoModel / AutoModelForMaskedLM resolve model_type "scfm"
    (idempotent: `exist_ok=True` so re-imports and reloads do not raise)."""
    AutoConfig.register("scfm", ScFMConfig, exist_ok=True)
    AutoModel.register(ScFMConfig, ScFMModel, exist_ok=True)
    AutoModelForMaskedLM.register(ScFMConfig, ScFMForMaskedExpression, exist_ok=True)


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
    "register_auto_classes",
]
