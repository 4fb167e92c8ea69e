"""The losses, masks and decoders of the cell-embedding and per-token objectives, shared by pretraining
(ScFMForMaskedExpression) and the task heads (fm/heads): they read only the config and tensors, never the
backbone, so a head imports them without the model classes."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_scfm import ScFMConfig


def masked_mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean squared error: sum(w · (pred - target)²) / sum(w), computed in pred's dtype.

    `weights` is a bool mask (the scored positions) or per-position float weights (0 = not scored).
    0 (still in the graph) when nothing is scored, so a batch without targets trains nothing.
    The one masked loss of every head (GEP, MVC, imputation).
    """
    w = weights.to(pred.dtype)
    return ((pred - target.to(pred.dtype)) ** 2 * w).sum() / w.sum().clamp(min=1.0)


def prepare_masks(config: ScFMConfig, gene_ids: torch.Tensor, values: torch.Tensor,
                  attention_mask: torch.Tensor | None = None, masked_positions: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(attention_mask, masked_positions) as bool (B, L): real gene tokens (default gene_ids != pad) and
    the masked ones among them (default values == mask_value_id). Every head takes its masks from here."""
    if attention_mask is None:
        attention_mask = gene_ids != config.pad_token_id
    attention_mask = attention_mask.bool()
    if masked_positions is None:
        masked_positions = values == config.mask_value_id
    return attention_mask, masked_positions.bool() & attention_mask


class ScFMExpressionHead(nn.Sequential):
    """GEP decoder on each gene's hidden state → its expression on the scale of config.encoding.target(labels):
    Linear(D, D) → GELU → Linear(D, 1), or scGPT's ExprDecoder (config.expression_decoder="scgpt": two
    Linear(D, D) → LeakyReLU layers, then Linear(D, 1)). A Sequential, so the keys stay `0.*` / `2.*` (/ `4.*`)."""

    def __init__(self, config: ScFMConfig):
        d = config.d_model
        if config.expression_decoder == "scgpt":
            super().__init__(nn.Linear(d, d), nn.LeakyReLU(), nn.Linear(d, d), nn.LeakyReLU(), nn.Linear(d, 1))
        else:
            super().__init__(nn.Linear(d, d), nn.GELU(), nn.Linear(d, 1))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return super().forward(hidden).squeeze(-1)


class ScFMMVCHead(nn.Module):
    """scGPT's MVC "inner product" decoder: expression of gene g predicted from the cell embedding
    alone, as (W q_g) . cell with query q_g = sigmoid(Linear(gene embedding of g))."""

    def __init__(self, config: ScFMConfig):
        super().__init__()
        self.query = nn.Linear(config.d_model, config.d_model)
        self.W = nn.Linear(config.d_model, config.d_model, bias=False)

    def forward(self, gene_emb: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
        q = torch.sigmoid(self.query(gene_emb))  # (B, L, D)
        return (self.W(q) * cell.unsqueeze(1)).sum(-1)  # (B, L)


class ScFMWholeCellHead(nn.Module):
    """Whole-cell expression decoder (BMFM-RNA's WCED): the log-normalised expression of any gene g from the
    cell embedding alone, as proj(cell) · query(e_g) + bias(e_g). The gene side reads the model's own gene
    table, so genes that are expressed together get similar rows."""

    def __init__(self, config: ScFMConfig):
        super().__init__()
        self.cell = nn.Sequential(nn.Linear(config.d_model, config.d_model), nn.GELU(),
                                  nn.Linear(config.d_model, config.d_model))
        self.query = nn.Linear(config.d_model, config.d_model)
        self.bias = nn.Linear(config.d_model, 1)

    def forward(self, gene_emb: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
        """gene_emb (K, D), cell (B, D) → (B, K)."""
        return self.cell(cell) @ self.query(gene_emb).T + self.bias(gene_emb).squeeze(-1)


def view_contrastive_loss(z: torch.Tensor, view_of: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE (SimCLR's NT-Xent) over a batch of views: each row's positives are the other views of its cell
    (same `view_of`), every other row is a negative. z (N, E) is L2-normalised here."""
    z = F.normalize(z.float(), dim=-1)
    logits = z @ z.T / temperature
    same = view_of[:, None] == view_of[None, :]
    eye = torch.eye(len(z), dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(eye, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positives = same & ~eye
    return -(log_prob.masked_fill(~positives, 0.0).sum(1) / positives.sum(1).clamp(min=1)).mean()


__all__ = ["ScFMExpressionHead", "ScFMMVCHead", "ScFMWholeCellHead", "masked_mse", "prepare_masks",
           "view_contrastive_loss"]
