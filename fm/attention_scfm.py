"""Attention, MLP and transformer block of the scfm backbone (fm/modeling_scfm.py builds ScFMModel on them).

The attention has two implementations, chosen per call from `config._attn_implementation` (what transformers'
`attn_implementation=` / `set_attn_implementation` set): "sdpa" (default, `F.scaled_dot_product_attention`,
also on the packed fast paths below) and "eager" (explicit softmax(QK^T/√d), the reference that can return the
attention weights; `output_attentions=True` uses it for that call, as transformers models do).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from .configuration_scfm import ScFMConfig


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
                    dropout_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T / √d) v with a bool mask (True = may attend) → (output, weights (B, H, T, T)).

    Softmax in float32 (as SDPA's math kernel accumulates), so eager and sdpa agree to ~1e-6 in float32. A fully
    masked row never happens here (prefix tokens are always visible), so no NaN guard is needed."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    weights = F.dropout(weights, p=dropout_p) if dropout_p > 0.0 else weights
    return torch.matmul(weights, v), weights


class ScFMAttention(nn.Module):
    """Bidirectional multi-head self-attention: "sdpa" (`F.scaled_dot_product_attention`) or "eager"."""

    def __init__(self, config: ScFMConfig):
        super().__init__()
        self.config = config  # shared with the model: read `_attn_implementation` at call time (set_attn_implementation)
        self.n_heads = config.n_heads
        self.attention_dropout = config.attention_dropout
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)  # fused q, k, v projection
        self.out = nn.Linear(config.d_model, config.d_model)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None, index: torch.Tensor | None = None,
                shape: tuple[int, int] | None = None, lengths: list[int] | None = None,
                output_attentions: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: (B, T, D), or (N, D) real tokens only with `index` (their flat positions in B·T) and shape (B, T):
        the projections then run on real tokens only and just the attention sees the padded layout; with
        `lengths` (tokens per cell, in order) the attention runs cell by cell on the packed tokens instead.
        Returns (output, attention weights (B, H, T, T) when output_attentions, else None). The packed forms are
        sdpa-only: ScFMModel takes the padded (B, T, D) path for eager attention and for output_attentions."""
        qkv = self.qkv(x)
        p = self.attention_dropout if self.training else 0.0
        if lengths is not None:  # CPU: one unmasked SDPA per cell, no padded layout at all (2-2.3x faster at
            N, D = qkv.shape[0], qkv.shape[-1] // 3  # Kang's lengths, batch 32; eval/perf/RESULTS.md)
            q, k, v = qkv.view(N, 3, self.n_heads, D // self.n_heads).permute(1, 2, 0, 3)  # 3 x (H, N, D/H)
            y = torch.cat([F.scaled_dot_product_attention(a[None], b[None], c[None], dropout_p=p)[0]
                           for a, b, c in zip(q.split(lengths, 1), k.split(lengths, 1), v.split(lengths, 1))], 1)
            return self.out(y.transpose(0, 1).reshape(N, D)), None
        if index is None:
            B, T = x.shape[:2]
        else:  # scatter the real tokens' q, k, v into (B·T, 3D) zeros: padded keys are masked, padded queries dropped
            B, T = shape
            qkv = qkv.new_zeros(B * T, qkv.shape[-1]).index_copy_(0, index, qkv)
        D = qkv.shape[-1] // 3
        # (B, T, 3D) -> 3 x (B, H, T, D/H)
        q, k, v = qkv.view(B, T, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        # attn_mask: bool, True = may attend; (B, 1, 1, T) key padding or (B, 1, T, T) generative
        weights = None
        if output_attentions or self.config._attn_implementation == "eager":
            y, weights = eager_attention(q, k, v, attn_mask, p)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)
        y = y.transpose(1, 2).reshape(B, T, D)
        if index is not None:
            y = y.view(B * T, D).index_select(0, index)
        return self.out(y), (weights if output_attentions else None)


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
                shape: tuple[int, int] | None = None, lengths: list[int] | None = None,
                output_attentions: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: (B, T, D), or (N, D) packed real tokens with `index` and `shape`, or `lengths` (see ScFMAttention):
        every op but the attention is per token, so it runs on real tokens only. Returns (x, attention weights)."""
        if not self.norm_first:
            a, weights = self.attn(x, attn_mask, index, shape, lengths, output_attentions)
            x = self.ln1(x + self.dropout(a))
            return self.ln2(x + self.dropout(self.mlp(x))), weights
        a, weights = self.attn(self.ln1(x), attn_mask, index, shape, lengths, output_attentions)
        x = x + self.dropout(a)
        return x + self.dropout(self.mlp(self.ln2(x))), weights


__all__ = ["ScFMAttention", "ScFMBlock", "ScFMMLP", "eager_attention"]
