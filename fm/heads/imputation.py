"""Expression imputation / denoising head: ScFMForImputation.

The expression of ANY vocabulary gene is predicted from the cell embedding alone, by querying the
gene's embedding (scGPT's MVC decoder): pred(g, cell) = (W q_g) · cell / √D + b(q_g), q_g = sigmoid(
query(e_g)). The 1/√D (as in attention) keeps an Adam step on W from moving every prediction by
O(1) (the cell embedding is LayerNorm output, |cell| ≈ √D): unscaled, even lr 1e-3 diverged on a
fixed batch. Nothing in the head is a per-gene parameter (the bias, too, is a function of the gene
embedding), so every gene of the vocabulary can be queried — also genes the cell's input did not
contain, which is what imputation needs — and the gene queries of a whole gene set are computed
once (`gene_keys`) and reused for every batch at inference.

Targets are log1p(count / library size · 1e4) (see fm.tasks.imputation for how the library size and
the scored genes are chosen); the loss is a weighted MSE over the scored (held-out) genes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.utils import ModelOutput

from fm.configuration_scfm import ScFMConfig
from fm.modeling_scfm import ScFMPreTrainedModel, build_backbone, output_flags, resolve_inputs
from fm.objectives import masked_mse


@dataclass
class ScFMImputationOutput(ModelOutput):
    """loss: weighted MSE over the scored genes (when labels given); predictions (B, K): the
    predicted log1p-normalised expression of target_gene_ids; cell_embedding (B, D)."""

    loss: torch.FloatTensor | None = None
    predictions: torch.FloatTensor | None = None
    cell_embedding: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


class ScFMImputationHead(nn.Module):
    """MVC-style gene query. `query` and `W` have the shapes of the pretraining mvc_head, so they can
    start from it (fm.tasks.imputation does when the checkpoint has one, W times √D); `bias` is new."""

    def __init__(self, config: ScFMConfig):
        super().__init__()
        self.query = nn.Linear(config.d_model, config.d_model)
        self.W = nn.Linear(config.d_model, config.d_model, bias=False)
        self.bias = nn.Linear(config.d_model, 1)
        self.scale = config.d_model ** -0.5

    def gene_keys(self, gene_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(…, D) gene embeddings → keys (…, D, the 1/√D folded in) and biases (…): pred = keys · cell + bias."""
        q = torch.sigmoid(self.query(gene_emb))
        return self.W(q) * self.scale, self.bias(q).squeeze(-1)

    def forward(self, gene_emb: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
        """gene_emb (B, K, D), cell (B, D) → (B, K) predictions."""
        keys, bias = self.gene_keys(gene_emb)
        return (keys * cell.unsqueeze(1)).sum(-1) + bias


class ScFMForImputation(ScFMPreTrainedModel):
    """Backbone + gene-query decoder on the cell embedding: expression of any vocabulary gene.

    config.target_scale ('log1p' | 'normalized') is the scale fm.impute writes by default; the
    model itself always predicts log1p(count / library · config.target_sum).
    """

    def __init__(self, config: ScFMConfig):
        super().__init__(config)
        self.scfm = build_backbone(config)
        self.impute_head = ScFMImputationHead(config)
        self.post_init()

    def gene_keys(self, gene_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and biases of vocabulary genes (any shape of ids); the embedding lookup goes through
        the module's forward (ZeRO-3 gathers the sharded table only there)."""
        return self.impute_head.gene_keys(self.scfm.embeddings.embed_genes(gene_ids))

    def forward(
        self,
        gene_ids: torch.Tensor | None = None,
        values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        condition_ids: torch.Tensor | None = None,
        target_gene_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        label_weights: torch.Tensor | None = None,
        return_dict: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: None = None,
    ) -> ScFMImputationOutput | tuple:
        """target_gene_ids (B, K) long: genes to predict (padding = pad_token_id); labels (B, K) float:
        their true log1p-normalised expression; label_weights (B, K): each position's weight in the
        MSE (0 = padding; default: 1 where target_gene_ids is not padding)."""
        gene_ids, values = resolve_inputs(self.config, gene_ids, values, input_ids, inputs_embeds, attention_mask)
        return_dict = output_flags(self.config, None, None, return_dict)[2]
        out = self.scfm(gene_ids, values, attention_mask, condition_ids, output_attentions=output_attentions, output_hidden_states=output_hidden_states)
        predictions = loss = None
        if target_gene_ids is not None:
            predictions = self.impute_head(self.scfm.embeddings.embed_genes(target_gene_ids), out.cell_embedding)
            if labels is not None:
                if label_weights is None:
                    label_weights = target_gene_ids != self.config.pad_token_id
                loss = masked_mse(predictions.float(), labels.to(predictions.device), label_weights.to(predictions.device))
        result = ScFMImputationOutput(loss=loss, predictions=predictions, cell_embedding=out.cell_embedding,
                                      hidden_states=out.hidden_states, attentions=out.attentions)
        return result if return_dict else result.to_tuple()


__all__ = ["ScFMForImputation", "ScFMImputationHead", "ScFMImputationOutput"]
