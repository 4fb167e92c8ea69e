"""Cell classification head (annotation): ScFMForAnnotation.

The pattern every head in fm/heads/ follows:
- subclass ScFMPreTrainedModel, hold the backbone as `self.scfm = build_backbone(config)` (base_model_prefix; ScFMModel or an imported BERT),
  so `from_pretrained(<pretrained dir>, ...)` loads the backbone and creates only the head;
- name head modules `*_head`: loading the bare backbone (AutoModel) from a head checkpoint drops
  their keys silently, and a pretraining checkpoint's heads (gep_head, mvc_head) are dropped when
  a task head is initialised from it;
- forward(gene_ids, values, attention_mask, condition_ids, labels=None) → a ModelOutput with
  `.loss` when labels are given, so the one loop `fm.train.train` trains it unchanged;
- task metadata lives in the config (transformers conventions: num_labels, id2label, label2id),
  so an exported directory is self-describing and `fm.load` rebuilds it from config.architectures;
- declare every config field the head reads in ScFMConfig (default + one-line comment); never
  `getattr(config, name, default)`;
- outputs: `loss`, `logits` for classification, `predictions` for regression/expression; targets
  come in as `labels`; masks through modeling_scfm.prepare_masks, masked losses via masked_mse;
- register the class with the matching Auto class where one exists, and name it in the task's
  fm.tasks.registry entry (fm.load finds a head by config.architectures[0] there).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForSequenceClassification
from transformers.utils import ModelOutput

from fm.configuration_scfm import ScFMConfig
from fm.heads import IGNORE_INDEX
from fm.modeling_scfm import ScFMPreTrainedModel, build_backbone



@dataclass
class ScFMAnnotationOutput(ModelOutput):
    """loss: cross-entropy over labelled cells (when labels given; weighted mean with label_weights);
    logits (B, num_labels); cell_embedding (B, D) from the backbone."""

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cell_embedding: torch.FloatTensor | None = None


class ScFMClassificationHead(nn.Module):
    """BatchNorm → dropout → Linear(D, D) → GELU → dropout → Linear(D, num_labels) on the cell embedding.

    The BatchNorm standardises each embedding dimension over cells: a pretrained <cls> embedding
    has large per-dimension offsets and small spreads, which leaves a plain MLP badly conditioned (a
    head-only probe learned markedly faster with it; chosen on validation cells of the train split:
    eval/RESULTS.md, "Hyper-parameter selection"). Running statistics make inference deterministic
    and batch-independent.
    """

    def __init__(self, config: ScFMConfig):
        super().__init__()
        p = config.classifier_dropout
        self.norm = nn.BatchNorm1d(config.d_model)
        self.dropout = nn.Dropout(config.dropout if p is None else p)
        self.dense = nn.Linear(config.d_model, config.d_model)
        self.out = nn.Linear(config.d_model, config.num_labels)

    def forward(self, cell: torch.Tensor) -> torch.Tensor:
        return self.out(self.dropout(F.gelu(self.dense(self.dropout(self.norm(cell.float()))))))


class ScGPTClassificationHead(nn.Module):
    """scGPT's ClsDecoder (config.classifier="scgpt", for imported scGPT classifiers): (Linear(D, D) → ReLU →
    LayerNorm) × (classifier_layers - 1) → Linear(D, num_labels) on the cell embedding."""

    def __init__(self, config: ScFMConfig):
        super().__init__()
        d = config.d_model
        blocks = [[nn.Linear(d, d), nn.ReLU(), nn.LayerNorm(d, eps=config.layer_norm_eps)]
                  for _ in range(config.classifier_layers - 1)]
        self.layers = nn.Sequential(*[m for block in blocks for m in block])
        self.out = nn.Linear(d, config.num_labels)

    def forward(self, cell: torch.Tensor) -> torch.Tensor:
        return self.out(self.layers(cell))


class ScFMForAnnotation(ScFMPreTrainedModel):
    """Backbone + MLP head on the cell embedding: cell-type annotation (and any per-cell label).

    `config.num_labels`, `config.id2label`, `config.label2id` name the classes; labels equal to
    IGNORE_INDEX (-100) are cells with a missing label and do not count in the loss.
    """

    def __init__(self, config: ScFMConfig):
        super().__init__(config)
        self.scfm = build_backbone(config)
        head = ScGPTClassificationHead if config.classifier == "scgpt" else ScFMClassificationHead
        self.classifier_head = head(config)
        self.post_init()

    def forward(
        self,
        gene_ids: torch.Tensor,
        values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        condition_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        label_weights: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> ScFMAnnotationOutput | tuple:
        """labels: (B,) long class index per cell, IGNORE_INDEX for unlabelled cells. label_weights: (B,)
        each cell's weight in the loss (e.g. its class's balanced weight, task.class_weighting); the loss
        is then sum(w·ce) / sum(w) over labelled cells — torch's `cross_entropy(weight=…)` mean, per cell."""
        out = self.scfm(gene_ids, values, attention_mask, condition_ids)
        logits = self.classifier_head(out.cell_embedding)
        loss = None
        if labels is not None:
            labels = labels.to(logits.device).long()
            known = labels != IGNORE_INDEX
            if not bool(known.any()):  # a batch of unlabelled cells: zero loss, still in the graph
                loss = logits.float().sum() * 0.0
            elif label_weights is None:
                loss = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX)
            else:
                ce = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="none")
                w = label_weights.to(ce.device).float() * known
                loss = (ce * w).sum() / w.sum().clamp_min(1e-12)
        result = ScFMAnnotationOutput(loss=loss, logits=logits, cell_embedding=out.cell_embedding)
        return result if return_dict else result.to_tuple()


def register_head_auto_classes() -> None:
    """AutoModelForSequenceClassification resolves model_type "scfm" to ScFMForAnnotation."""
    AutoModelForSequenceClassification.register(ScFMConfig, ScFMForAnnotation, exist_ok=True)


register_head_auto_classes()

__all__ = ["IGNORE_INDEX", "ScFMAnnotationOutput", "ScFMClassificationHead", "ScGPTClassificationHead",
           "ScFMForAnnotation", "register_head_auto_classes"]
