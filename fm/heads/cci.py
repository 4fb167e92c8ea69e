"""Spatial niche head (NCEM-style cell–cell communication): ScFMForCCI.

A receiver cell's expression is predicted from WHO is around it, never from its own measurement:
  prediction(receiver) = base[type] + MLP([type embedding, niche embedding, niche composition])
- base[type]: the mean (log-normalised) profile of the receiver's type — NCEM's type-only model;
  fm.tasks.cci starts it at the training data's type means, so training fits the niche residual.
- niche embedding: the backbone's cell embedding of the niche pseudobulk, i.e. the summed raw
  counts of the receiver's k spatial neighbours tokenised like one cell. One backbone pass per
  receiver (not k), so a fine-tuning step costs what an annotation step costs, and the backbone
  can be fine-tuned end to end (or frozen: task.freeze_backbone).
- niche composition: the fraction of each cell type among the k neighbours (NCEM's input).
The receiver's own tokens are not an input on purpose: they hold the very genes being predicted,
so the model would copy them and attribute nothing to the niche.

Sender→receiver effects come from ablation: the prediction with the full niche minus the
prediction with every sender of one type removed (fm.tasks.cci). `config.niche_genes` names the
predicted genes (the columns of `predictions`), `config.id2label` the cell types.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from fm.configuration_scfm import ScFMConfig
from fm.modeling_scfm import ScFMPreTrainedModel, build_backbone, output_flags, resolve_inputs


@dataclass
class ScFMCCIOutput(ModelOutput):
    """loss: mean squared error over genes and receivers (when labels given); predictions (B, G):
    log1p(counts/1e4) of config.niche_genes; niche_embedding (B, D): the niche pseudobulk's embedding."""

    loss: torch.FloatTensor | None = None
    predictions: torch.FloatTensor | None = None
    niche_embedding: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


class ScFMNicheHead(nn.Module):
    """base[type] + MLP([type embedding, niche embedding, composition projection]) → G genes."""

    def __init__(self, config: ScFMConfig):
        super().__init__()
        n_types, n_genes, d = config.num_labels, len(config.niche_genes), config.d_model
        self.base = nn.Embedding(n_types, n_genes)
        self.type_embedding = nn.Embedding(n_types, d)
        self.composition = nn.Linear(n_types, d)
        self.dropout = nn.Dropout(config.dropout)
        self.dense = nn.Linear(3 * d, d)
        self.out = nn.Linear(d, n_genes)

    def forward(self, niche: torch.Tensor, receiver_types: torch.Tensor, composition: torch.Tensor) -> torch.Tensor:
        """niche (B, D), receiver_types (B,) long, composition (B, T) fractions → (B, G)."""
        x = torch.cat([self.type_embedding(receiver_types), niche, self.composition(composition)], dim=-1)
        return self.base(receiver_types) + self.out(self.dropout(F.gelu(self.dense(self.dropout(x)))))


class ScFMForCCI(ScFMPreTrainedModel):
    """Backbone on the niche pseudobulk + ScFMNicheHead: a receiver's expression from its spatial niche."""

    def __init__(self, config: ScFMConfig):
        super().__init__(config)
        if not config.niche_genes or config.num_labels < 1:
            raise ValueError("ScFMForCCI needs config.niche_genes (predicted genes) and id2label "
                             "(cell types); fine-tune one with `fm finetune recipes/finetune/cci.yaml`")
        self.scfm = build_backbone(config)
        self.niche_head = ScFMNicheHead(config)
        self.post_init()

    def forward(
        self,
        gene_ids: torch.Tensor | None = None,
        values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        condition_ids: torch.Tensor | None = None,
        receiver_types: torch.Tensor | None = None,
        niche_composition: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_dict: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: None = None,
    ) -> ScFMCCIOutput | tuple:
        """gene_ids/values/attention_mask: tokens of each receiver's niche pseudobulk; receiver_types (B,)
        long; niche_composition (B, T) float; labels (B, G) float: the receivers' log-normalised expression."""
        gene_ids, values = resolve_inputs(self.config, gene_ids, values, input_ids, inputs_embeds, attention_mask)
        return_dict = output_flags(self.config, None, None, return_dict)[2]
        if receiver_types is None or niche_composition is None:
            raise ValueError("ScFMForCCI.forward needs receiver_types and niche_composition")
        out = self.scfm(gene_ids, values, attention_mask, condition_ids, output_attentions=output_attentions, output_hidden_states=output_hidden_states)
        niche = out.cell_embedding
        predictions = self.niche_head(niche, receiver_types.long(), niche_composition.to(niche.dtype))
        loss = None
        if labels is not None:
            loss = F.mse_loss(predictions.float(), labels.to(predictions.device).float())
        result = ScFMCCIOutput(loss=loss, predictions=predictions, niche_embedding=niche,
                               hidden_states=out.hidden_states, attentions=out.attentions)
        return result if return_dict else result.to_tuple()


__all__ = ["ScFMForCCI", "ScFMCCIOutput", "ScFMNicheHead"]
