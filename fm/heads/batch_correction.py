"""Batch-integration head: ScFMForBatchCorrection (scGPT's integration objective on the scfm backbone).

The cell embedding should keep cell state and lose the batch. The objective is scGPT's:
- reconstruction: masked expression from each gene's hidden state (GEP) and from the cell
  embedding alone (MVC). The modules keep the pretraining names `gep_head` / `mvc_head`, so they
  start from the pretrained weights. As scGPT's `use_batch_labels`, the MVC decoder also gets a
  batch embedding (`mvc_batch_head`): the term (W q_g)·b_batch is a per-gene, per-batch offset, so
  the batch's effect on expression has a place to go other than the cell embedding;
- DAR (scGPT's domain adaptation by an adversarial batch discriminator): `dar_head` learns to
  predict the batch from the cell embedding (`dar_loss`, its cross-entropy: log K at chance for
  K batches), and the backbone learns to make it predict the uniform distribution
  (`confusion_loss`, cross-entropy to uniform; Tzeng et al. 2015). scGPT instead puts a
  gradient-reversal layer before the discriminator, so the backbone *maximises* the
  discriminator's cross-entropy; that objective has no optimum at chance — once the discriminator
  is at chance the backbone still gains by making it confidently wrong, i.e. by separating the
  batches again (on the eval_base checkpoint and Kang, dar_loss climbed above log K and batch mixing
  collapsed below zero-shot: eval/RESULTS.md, "Hyper-parameter selection"). The confusion target stops at chance;
  each side's loss reaches only its own parameters (the discriminator sees a detached embedding,
  the backbone a detached discriminator). `task.adversary=reversal` gives scGPT's form for comparison;
- ECS (elastic cell similarity): cosine similarities between the mini-batch's (centred) cell
  embeddings are pushed away from `ecs_threshold` (below it towards 0, above it towards 1), which
  sharpens clusters that the adversarial term would otherwise blur.
loss = gep + mvc + dar_weight · (dar + confusion) + ecs_weight · ecs; every term is also in the output (the
training loop logs every `*_loss` field).

The batch also enters the backbone as a condition token (config.batch_key among
config.condition_keys): knowing the batch helps the encoder remove it. Batch ids are the
tokenizer's condition ids: 0 = unknown, 1..num_batches = the fine-tuning batches;
`batch_labels` (0..num_batches-1, IGNORE_INDEX unknown) are the true batches for DAR and MVC.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from fm.configuration_scfm import ScFMConfig
from fm.heads import IGNORE_INDEX
from fm.modeling_scfm import ScFMPreTrainedModel, build_backbone, output_flags, resolve_inputs
from fm.objectives import ScFMExpressionHead, ScFMMVCHead, masked_mse, prepare_masks


def ecs_loss(cell: torch.Tensor, threshold: float) -> torch.Tensor:
    """scGPT's elastic cell similarity: mean over cell pairs i ≠ j of 1 - (relu(cos_ij) - threshold)²,
    with cos_ij between embeddings centred on the mini-batch mean.

    Minimising it moves each similarity away from the threshold. Centring is our change: a
    pretrained <cls> embedding is anisotropic (pairwise cosines all close to 1), and on raw cosines
    scGPT's form then pulls every pair to 1 — a collapsed embedding.
    Centred, similarities spread over [-1, 1] and only close pairs are pulled together.
    0 (in the graph) for a single cell.
    """
    z = F.normalize(cell.float() - cell.float().mean(0, keepdim=True), dim=1)
    sim = F.relu(z @ z.T)
    off = ~torch.eye(len(z), dtype=torch.bool, device=z.device)
    if not bool(off.any()):
        return sim.sum() * 0.0
    return (1.0 - (sim[off] - threshold) ** 2).mean()


@dataclass
class ScFMBatchCorrectionOutput(ModelOutput):
    """loss = gep_loss + mvc_loss + dar_weight·(dar_loss + confusion_loss) + ecs_weight·ecs_loss
    (with labels); batch_logits (B, num_batches) of the discriminator; cell_embedding (B, D): the
    integrated representation fm.integrate writes."""

    loss: torch.FloatTensor | None = None
    gep_loss: torch.FloatTensor | None = None
    mvc_loss: torch.FloatTensor | None = None
    dar_loss: torch.FloatTensor | None = None
    confusion_loss: torch.FloatTensor | None = None
    ecs_loss: torch.FloatTensor | None = None
    batch_logits: torch.FloatTensor | None = None
    cell_embedding: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


class ScFMDiscriminatorHead(nn.Module):
    """Linear(D, D) → GELU → Linear(D, num_batches): batch logits from a cell embedding."""

    def __init__(self, config: ScFMConfig):
        super().__init__()
        self.dense = nn.Linear(config.d_model, config.d_model)
        self.out = nn.Linear(config.d_model, config.num_batches)

    def forward(self, cell: torch.Tensor) -> torch.Tensor:
        return self.out(F.gelu(self.dense(cell)))


class _ReverseGradient(torch.autograd.Function):
    """Identity forward, negated gradient backward (Ganin & Lempitsky 2015; scGPT's DAR)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -grad


def adversarial_losses(head: nn.Module, cell: torch.Tensor, batch_labels: torch.Tensor, mode: str = "confusion"
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits, discriminator cross-entropy, confusion loss) over the cells with a known batch.

    mode "confusion" (default): the discriminator trains on the detached embedding; the confusion
    loss (cross-entropy of the discriminator's prediction to the uniform distribution) reaches the
    embedding only, through the head with detached weights (torch.func.functional_call).
    mode "reversal" (scGPT's DAR): one cross-entropy through a gradient-reversal layer — the head
    minimises it, the backbone maximises it; the confusion loss is 0. Both losses are 0, in the
    graph, when no cell has a known batch.
    """
    known = batch_labels != IGNORE_INDEX
    if mode == "reversal":
        logits = head(_ReverseGradient.apply(cell))
        zero = logits.float().sum() * 0.0
        if not bool(known.any()):
            return logits, zero, zero
        return logits, F.cross_entropy(logits[known].float(), batch_labels[known]), zero
    if mode != "confusion":
        raise ValueError(f"adversary must be 'confusion' or 'reversal', got {mode!r}")
    logits = head(cell.detach())
    frozen = {name: p.detach() for name, p in head.named_parameters()}
    encoder_logits = torch.func.functional_call(head, frozen, (cell,))
    if not bool(known.any()):
        zero = logits.float().sum() * 0.0 + encoder_logits.float().sum() * 0.0
        return logits, zero, zero
    dar = F.cross_entropy(logits[known].float(), batch_labels[known])
    confusion = -F.log_softmax(encoder_logits[known].float(), dim=-1).mean()
    return logits, dar, confusion


class ScFMForBatchCorrection(ScFMPreTrainedModel):
    """Backbone + GEP/MVC reconstruction + adversarial batch discriminator + ECS (see module doc).

    Config fields (ScFMConfig, set by fm.tasks.batch_correction): batch_key (obs column, one of
    condition_keys), num_batches, adversary, dar_weight, ecs_weight, ecs_threshold.
    """

    def __init__(self, config: ScFMConfig):
        super().__init__(config)
        if config.batch_key not in config.condition_keys or config.num_batches < 1:
            raise ValueError(f"config.batch_key={config.batch_key!r} must be one of config.condition_keys "
                             f"{config.condition_keys} and config.num_batches >= 1 (got {config.num_batches}); "
                             "fine-tune with `fm finetune recipes/finetune/batch_correction.yaml`")
        self.scfm = build_backbone(config)
        self.gep_head = ScFMExpressionHead(config)
        self.mvc_head = ScFMMVCHead(config) if config.mvc else None
        # row 0 (unknown batch) is the padding row: zero, never trained → no offset
        self.mvc_batch_head = nn.Embedding(config.num_batches + 1, config.d_model, padding_idx=0) if config.mvc else None
        self.dar_head = ScFMDiscriminatorHead(config)
        self.post_init()

    def forward(
        self,
        gene_ids: torch.Tensor | None = None,
        values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        condition_ids: torch.Tensor | None = None,
        masked_positions: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        batch_labels: torch.Tensor | None = None,
        return_dict: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: None = None,
    ) -> ScFMBatchCorrectionOutput | tuple:
        """labels: (B, L) true bins (masked positions are scored); batch_labels: (B,) long batch
        index, IGNORE_INDEX where unknown. The loss needs labels; DAR and the MVC batch offset
        need batch_labels."""
        gene_ids, values = resolve_inputs(self.config, gene_ids, values, input_ids, inputs_embeds, attention_mask)
        return_dict = output_flags(self.config, None, None, return_dict)[2]
        attention_mask, masked_positions = prepare_masks(self.config, gene_ids, values, attention_mask,
                                                         masked_positions)
        out = self.scfm(gene_ids, values, attention_mask, condition_ids, masked_positions,
                        output_attentions=output_attentions, output_hidden_states=output_hidden_states)
        cell = out.cell_embedding
        result = ScFMBatchCorrectionOutput(cell_embedding=cell, hidden_states=out.hidden_states,
                                           attentions=out.attentions)
        if labels is None:
            result.batch_logits = self.dar_head(cell)
            return result if return_dict else result.to_tuple()

        known = None if batch_labels is None else batch_labels.to(cell.device).long()
        target = self.config.encoding.target(labels.to(cell.dtype))
        expression = self.gep_head(out.gene_hidden_states)  # (B, L)
        result.gep_loss = loss = masked_mse(expression, target, masked_positions)
        if self.mvc_head is not None:
            decoder_cell = cell
            if known is not None:
                decoder_cell = cell + self.mvc_batch_head((known + 1).clamp(min=0))
            mvc = self.mvc_head(self.scfm.embeddings.embed_genes(gene_ids), decoder_cell)
            result.mvc_loss = masked_mse(mvc, target, masked_positions)
            loss = loss + result.mvc_loss
        if known is not None:
            result.batch_logits, result.dar_loss, result.confusion_loss = adversarial_losses(
                self.dar_head, cell, known, self.config.adversary)
            loss = loss + self.config.dar_weight * (result.dar_loss + result.confusion_loss)
        else:
            result.batch_logits = self.dar_head(cell)
        result.ecs_loss = ecs_loss(cell, self.config.ecs_threshold)
        result.loss = loss + self.config.ecs_weight * result.ecs_loss
        return result if return_dict else result.to_tuple()


__all__ = ["ScFMBatchCorrectionOutput", "ScFMDiscriminatorHead", "ScFMForBatchCorrection", "adversarial_losses",
           "ecs_loss"]
