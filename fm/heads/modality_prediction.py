"""Surface-protein prediction head (modality prediction, RNA → protein): ScFMForModalityPrediction.

Targets are per-cell CLR values of ADT counts (fm.tasks.modality_prediction.clr). The head regresses
them *standardised per protein* (z = (clr - mean) / std, the train cells' mean and std kept in the
config) and the model returns predictions back on the CLR scale. Why: proteins' CLR spreads differ
severalfold (CD56 vs CD8 on the 1k-PBMC CITE-seq file), so plain MSE would weigh the widest protein
about an order of magnitude more than the narrowest; z-scored MSE weighs every protein equally, like the benchmark's main
metric (per-protein Pearson), and a fresh head starts at the right scale (z = 0: each protein's mean).

Config fields (written by fm.tasks.modality_prediction, so an exported directory is self-describing):
  protein_names     the predicted proteins, the column order of every output;
  protein_mean/std  per-protein CLR mean and std of the training cells (default 0 / 1: no scaling);
  isotype_controls  ADTs that entered the CLR mean but are never predicted (IgG/isotype controls);
  protein_key       obsm key the targets came from.
Head input: the CLS cell embedding concatenated with the mean of the real genes' hidden states: it
scored better than the CLS token alone, and per-protein attention pooling over genes no better for
more code (seed-0 runs of eval/modality_prediction.yaml: eval/RESULTS.md, "Hyper-parameter selection").
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from fm.configuration_scfm import ScFMConfig
from fm.modeling_scfm import ScFMPreTrainedModel, build_backbone, output_flags, resolve_inputs
from fm.objectives import prepare_masks


@dataclass
class ScFMModalityPredictionOutput(ModelOutput):
    """loss: MSE over cells × proteins of the standardised CLR (when labels given); predictions (B, P)
    on the CLR scale; cell_embedding (B, D) from the backbone."""

    loss: torch.FloatTensor | None = None
    predictions: torch.FloatTensor | None = None
    cell_embedding: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


class ScFMProteinHead(nn.Module):
    """[CLS embedding ; mean of the real genes' hidden states] → dropout → Linear(2D, D) → GELU →
    dropout → Linear(D, P): standardised protein levels."""

    def __init__(self, config: ScFMConfig):
        super().__init__()
        self.dropout = nn.Dropout(config.dropout)
        self.dense = nn.Linear(2 * config.d_model, config.d_model)
        self.out = nn.Linear(config.d_model, len(config.protein_names))

    def forward(self, cell: torch.Tensor, genes: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        w = attention_mask.unsqueeze(-1).to(genes.dtype)
        pooled = (genes * w).sum(1) / w.sum(1).clamp(min=1.0)
        x = torch.cat([cell, pooled], dim=-1)
        return self.out(self.dropout(F.gelu(self.dense(self.dropout(x)))))


class ScFMForModalityPrediction(ScFMPreTrainedModel):
    """Backbone + MLP regression head: each cell's CLR surface-protein levels from its RNA."""

    def __init__(self, config: ScFMConfig):
        if not config.protein_names:
            raise ValueError("ScFMForModalityPrediction needs config.protein_names (the proteins to predict); "
                             "fine-tune with `fm finetune recipes/finetune/modality_prediction.yaml`, or set "
                             "config.protein_names and pass config= to from_pretrained")
        super().__init__(config)
        self.scfm = build_backbone(config)
        self.protein_head = ScFMProteinHead(config)
        self.post_init()

    def _scale(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-protein (mean, std) of the CLR targets as tensors on `like`'s device (config lists;
        not buffers, so the checkpoint's weights hold no copy that could disagree with config.json)."""
        n = len(self.config.protein_names)
        mean = self.config.protein_mean or [0.0] * n
        std = self.config.protein_std or [1.0] * n
        return (torch.as_tensor(mean, dtype=torch.float32, device=like.device),
                torch.as_tensor(std, dtype=torch.float32, device=like.device))

    def forward(
        self,
        gene_ids: torch.Tensor | None = None,
        values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        condition_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_dict: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: None = None,
    ) -> ScFMModalityPredictionOutput | tuple:
        """labels: (B, P) float CLR targets in config.protein_names order."""
        gene_ids, values = resolve_inputs(self.config, gene_ids, values, input_ids, inputs_embeds, attention_mask)
        return_dict = output_flags(self.config, None, None, return_dict)[2]
        attention_mask, _ = prepare_masks(self.config, gene_ids, values, attention_mask)
        out = self.scfm(gene_ids, values, attention_mask, condition_ids, output_attentions=output_attentions, output_hidden_states=output_hidden_states)
        z = self.protein_head(out.cell_embedding, out.gene_hidden_states, attention_mask).float()
        mean, std = self._scale(z)
        loss = None
        if labels is not None:
            loss = F.mse_loss(z, (labels.to(z.device).float() - mean) / std)
        result = ScFMModalityPredictionOutput(loss=loss, predictions=z * std + mean, cell_embedding=out.cell_embedding,
                                              hidden_states=out.hidden_states, attentions=out.attentions)
        return result if return_dict else result.to_tuple()


__all__ = ["ScFMForModalityPrediction", "ScFMProteinHead", "ScFMModalityPredictionOutput"]
