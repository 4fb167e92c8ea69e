"""Cell classification head (annotation): ScFMForAnnotation.

The pattern every head in fm/heads/ follows:
- subclass ScFMPreTrainedModel, hold the backbone as `self.scfm = build_backbone(config)` (base_model_prefix; ScFMModel or an imported BERT),
  so `from_pretrained(<pretrained dir>, ...)` loads the backbone and creates only the head;
- name head modules `*_head`: loading the bare backbone (AutoModel) from a head checkpoint drops
  their keys silently, and a pretraining checkpoint's heads (gep_head, mvc_head) are dropped when
  a task head is initialised from it;
- forward(gene_ids, values, attention_mask, condition_ids, labels=None) → a ModelOutput with
  `.loss` when labels are given, so the one loop `fm.train.train` trains it unchanged; also the
  transformers contract (tests/test_hf_contract.py): return_dict / output_attentions / output_hidden_states
  (None = the config's; `hidden_states` / `attentions` fields passed on from the backbone), input_ids as an
  alias of gene_ids and values optional (modeling_scfm.resolve_inputs), every op dtype-clean (bf16 weights);
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
from fm.modeling_scfm import ScFMPreTrainedModel, build_backbone, output_flags, resolve_inputs



@dataclass
class ScFMAnnotationOutput(ModelOutput):
    """loss (when labels given; weighted mean over cells with label_weights): cross-entropy over labelled cells,
    or BCE / MSE for config.problem_type multi_label_classification / regression; logits (B, num_labels);
    cell_embedding (B, D) from the backbone; hidden_states / attentions as ScFMModelOutput's, when asked for."""

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cell_embedding: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


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
        # in the norm's dtype: float32 weights under autocast (bf16 embedding in, as before), bf16 after .to(bf16)
        return self.out(self.dropout(F.gelu(self.dense(self.dropout(self.norm(cell.to(self.norm.weight.dtype)))))))


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
        gene_ids: torch.Tensor | None = None,
        values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        condition_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        label_weights: torch.Tensor | None = None,
        return_dict: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: None = None,
    ) -> ScFMAnnotationOutput | tuple:
        """labels: (B,) long class index per cell, IGNORE_INDEX for unlabelled cells (single_label_classification);
        (B, num_labels) float multi-hot (multi_label_classification); (B,) or (B, num_labels) float (regression).
        config.problem_type None is inferred from num_labels and the labels' dtype, as BertForSequenceClassification
        does. label_weights: (B,) each cell's weight in the loss (e.g. its class's balanced weight,
        task.class_weighting); the loss is then sum(w·loss) / sum(w) over labelled cells — torch's
        `cross_entropy(weight=…)` mean, per cell. input_ids: alias of gene_ids (PEFT's SEQ_CLS wrapper)."""
        gene_ids, values = resolve_inputs(self.config, gene_ids, values, input_ids, inputs_embeds, attention_mask)
        return_dict = output_flags(self.config, None, None, return_dict)[2]
        out = self.scfm(gene_ids, values, attention_mask, condition_ids,
                        output_attentions=output_attentions, output_hidden_states=output_hidden_states)
        logits = self.classifier_head(out.cell_embedding)
        loss = None if labels is None else self._loss(logits, labels.to(logits.device), label_weights)
        result = ScFMAnnotationOutput(loss=loss, logits=logits, cell_embedding=out.cell_embedding,
                                      hidden_states=out.hidden_states, attentions=out.attentions)
        return result if return_dict else result.to_tuple()

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor, label_weights: torch.Tensor | None) -> torch.Tensor:
        """transformers' problem_type semantics (in float32): CE with IGNORE_INDEX, BCE-with-logits, or MSE."""
        if self.config.problem_type is None:  # BertForSequenceClassification's inference (it sets the config too)
            if self.config.num_labels == 1:
                self.config.problem_type = "regression"
            elif labels.dtype in (torch.long, torch.int):
                self.config.problem_type = "single_label_classification"
            else:
                self.config.problem_type = "multi_label_classification"
        problem = self.config.problem_type
        logits = logits.float()
        if problem == "single_label_classification":
            labels = labels.long()
            known = labels != IGNORE_INDEX
            if not bool(known.any()):  # a batch of unlabelled cells: zero loss, still in the graph
                return logits.sum() * 0.0
            if label_weights is None:
                return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
            per_cell = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none")
            w = label_weights.to(per_cell.device).float() * known
            return (per_cell * w).sum() / w.sum().clamp_min(1e-12)
        if problem == "multi_label_classification":
            per_cell = F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="none").mean(-1)
        elif problem == "regression":
            if self.config.num_labels == 1:
                logits, labels = logits.view(-1), labels.reshape(-1)
            per_cell = F.mse_loss(logits, labels.float(), reduction="none")
            per_cell = per_cell.mean(-1) if per_cell.dim() > 1 else per_cell
        else:
            raise ValueError(f"config.problem_type must be single_label_classification, multi_label_classification "
                             f"or regression, got {problem!r}")
        if label_weights is None:
            return per_cell.mean()
        w = label_weights.to(per_cell.device).float()
        return (per_cell * w).sum() / w.sum().clamp_min(1e-12)


def register_head_auto_classes() -> None:
    """AutoModelForSequenceClassification resolves model_type "scfm" to ScFMForAnnotation."""
    AutoModelForSequenceClassification.register(ScFMConfig, ScFMForAnnotation, exist_ok=True)


register_head_auto_classes()

__all__ = ["IGNORE_INDEX", "ScFMAnnotationOutput", "ScFMClassificationHead", "ScGPTClassificationHead",
           "ScFMForAnnotation", "register_head_auto_classes"]
