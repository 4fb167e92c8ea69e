"""The one training loop (accelerate): pretraining and every fine-tune call `train(...)`.

Batch arithmetic: a micro-batch is `batch_size` cells on one process; an optimizer step is
`grad_accum` micro-batches on each of `world` processes, i.e. batch_size × grad_accum × world
cells. Data order is ours, not accelerate's: `ShardedBatchSampler` deals each process a disjoint
slice of a (seed, epoch) permutation, so resuming at micro-batch k is exact and a 2-process run
sees the same global batches as a 1-process run with twice the batch.

Distributed engines come from the launcher (accelerate config: DDP, DeepSpeed ZeRO-1/2/3), never
from code paths of our own. What this file adds on top (see README "Multi-node training"):
- the LR schedule is stepped once per optimizer step, whatever the world size (accelerate's
  default steps it world-size times per step, which changes the schedule with the process count);
- DeepSpeed's "auto" batch, accumulation and clipping values are filled from TrainConfig;
- SIGTERM → checkpoint at the next step boundary on all ranks → return `stopped=True`;
- the data position is stored in cells, so `--resume` with another world size (and the same
  global batch, e.g. twice the per-process batch on half the processes) continues at the same cell;
- the budget: `train.max_steps`, or `train.epochs` passes over the training cells capped by max_steps
  (`budget_steps`); early stopping on the held-out cells with the best weights exported
  (fm/early_stopping.py).
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs, set_seed
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from fm.config import TrainConfig
from fm.data.collator import pad_multiple
from fm.early_stopping import EarlyStopping
from fm.precision import resolve_mixed_precision
from fm.progress import progress_enabled
from fm.train_state import (CHECKPOINTS, EXIT_PREEMPTED, STATE_FILE, StopSignal, append_history, latest_checkpoint,
                             load_checkpoint, log_eval, open_history, process_counters, read_state, save_checkpoint)

log = logging.getLogger("fm")


class ShardedBatchSampler(Sampler[list[int]]):
    """Per-process batches of a (seed, epoch) permutation; process r takes slice r of each global batch."""

    def __init__(self, n: int, batch_size: int, world: int = 1, rank: int = 0, seed: int = 0,
                 epoch: int = 0, start_batch: int = 0, shuffle: bool = True):
        self.n, self.batch_size, self.world, self.rank = n, batch_size, world, rank
        self.seed, self.epoch, self.start_batch, self.shuffle = seed, epoch, start_batch, shuffle

    def __len__(self) -> int:  # full global batches only (drop_last): every rank steps the same count
        return max(self.n // (self.batch_size * self.world) - self.start_batch, 0)

    def __iter__(self):
        order = (np.random.default_rng([self.seed, self.epoch]).permutation(self.n) if self.shuffle
                 else np.arange(self.n))
        global_batch = self.batch_size * self.world
        for b in range(self.start_batch, self.n // global_batch):
            lo = b * global_batch + self.rank * self.batch_size
            yield order[lo:lo + self.batch_size].tolist()


MEGABATCH = 50
"""Length grouping sorts cells within megabatches of this many (global) batches (Hugging Face's
LengthGroupedSampler uses 50): batches of nearly one length, still random in which cells meet."""


class LengthGroupedBatchSampler(ShardedBatchSampler):
    """ShardedBatchSampler whose global batches hold cells of similar length (less padding).

    The (seed, epoch) permutation (the same one ShardedBatchSampler draws, so the same cells are
    dropped) is cut into megabatches of MEGABATCH global batches; each is sorted by length (longest
    first, ties in permutation order) and cut into global batches; the order of all global batches
    is then shuffled (seed, epoch) and the one holding the longest cell goes first, so an
    out-of-memory batch shows at step 1. Rank r takes cells r, r + world, … of each sorted global
    batch, so every rank pads to nearly the same width. A function of (seed, epoch, global batch)
    only: `start_batch` lands on the same batches, and a 2-process run sees the global batches of a
    1-process run with twice the batch."""

    def __init__(self, lengths: np.ndarray, batch_size: int, world: int = 1, rank: int = 0, seed: int = 0,
                 epoch: int = 0, start_batch: int = 0, megabatch: int = MEGABATCH):
        super().__init__(len(lengths), batch_size, world, rank, seed, epoch, start_batch)
        self.lengths, self.megabatch = np.asarray(lengths, dtype=np.int64), max(int(megabatch), 1)

    def global_batches(self) -> np.ndarray:
        """(global micro-batches in the epoch, batch_size × world) cell indices, in training order."""
        rng = np.random.default_rng([self.seed, self.epoch])
        global_batch = self.batch_size * self.world
        n_batches = self.n // global_batch
        order = rng.permutation(self.n)[:n_batches * global_batch]
        step = self.megabatch * global_batch
        parts = [mb[np.argsort(-self.lengths[mb], kind="stable")] for mb in
                 (order[lo:lo + step] for lo in range(0, order.size, step))]
        batches = np.concatenate(parts).reshape(n_batches, global_batch) if n_batches else order.reshape(0, global_batch)
        batches = batches[rng.permutation(n_batches)]
        if n_batches:
            first = int(np.argmax(self.lengths[batches[:, 0]]))  # sorted: column 0 is each batch's longest
            batches[[0, first]] = batches[[first, 0]]
        return batches

    def __iter__(self):
        batches = self.global_batches()
        for b in range(self.start_batch, len(batches)):
            yield batches[b, self.rank::self.world].tolist()


def dataset_lengths(dataset, collator) -> np.ndarray | None:
    """Tokens `collator` gives each cell of an in-memory dataset (EncodedCells, or TaskCells over one), from
    its indptr; None for datasets that cannot say cheaply (a streamed corpus groups by itself)."""
    cells = getattr(dataset, "cells", dataset)
    if not hasattr(cells, "indptr") or not hasattr(collator, "token_counts"):
        return None
    return collator.token_counts(cells)


def make_batch_sampler(dataset, batch_size: int, world: int, rank: int, seed: int, epoch: int,
                       start_batch: int, lengths: np.ndarray | None = None,
                       length_grouping: bool = False) -> Sampler[list[int]]:
    """The dataset's own sampler if it has one (e.g. a sharded corpus reading disjoint shards per
    rank), else ShardedBatchSampler, or LengthGroupedBatchSampler over `lengths` when length_grouping.
    Contract: every rank yields the same number of batches, the order is a function of (seed, epoch),
    and `start_batch` skips that many global micro-batches (this rank's share of each)."""
    if hasattr(dataset, "batch_sampler"):
        if length_grouping:
            return dataset.batch_sampler(batch_size, world, rank, seed, epoch, start_batch, length_grouping=True)
        return dataset.batch_sampler(batch_size, world, rank, seed, epoch, start_batch)
    if length_grouping and lengths is not None:
        return LengthGroupedBatchSampler(lengths, batch_size, world, rank, seed, epoch, start_batch)
    return ShardedBatchSampler(len(dataset), batch_size, world, rank, seed, epoch, start_batch)


@dataclass
class TrainResult:
    step: int
    history: list[dict] = field(default_factory=list)
    export_dir: Path | None = None
    stopped: bool = False
    """True when a signal stopped the run after a checkpoint (exit code EXIT_PREEMPTED; rerun with --resume)."""
    model: Any = field(default=None, repr=False)
    """The trained, accelerate-prepared model (DDP/DeepSpeed-wrapped; `accelerator.unwrap_model` it). With
    early stopping its main-process copy holds the best weights (not under DeepSpeed: the export does)."""
    early_stopped: bool = False
    """True when train.early_stopping_patience ended the run before its step budget."""
    best_step: int | None = None
    """With early stopping: the step whose weights were exported (best held-out value), else None."""
    best_metric: float | None = None
    """That step's train.early_stopping_metric."""
    heldout: dict = field(default_factory=dict)
    """Task scores of the returned model on the held-out cells, where the task computes them (annotation:
    accuracy, macro_f1, n)."""


def check_output_dir(output_dir: str | Path, resume: bool) -> None:
    """A new run may not start in a directory holding another run's checkpoints. Called before anything is
    written there (config.yaml included), so the message's "nothing was overwritten" holds."""
    out = Path(output_dir)
    if not resume and latest_checkpoint(out) is not None:
        raise FileExistsError(f"{out} already holds checkpoints of a run; pass --resume to continue it "
                              "or choose another train.output_dir (nothing was overwritten).")


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    """Accelerator for this launch; gloo when several CPU processes (see DESIGN 'Known traps')."""
    handlers = []
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    launcher_mp = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")  # the launcher's config: not the source
    mixed_precision = resolve_mixed_precision(cfg.mixed_precision)
    if launcher_mp not in ("no", mixed_precision):
        log.warning("accelerate config says mixed_precision=%s; the recipe's train.mixed_precision=%s is used",
                    launcher_mp, mixed_precision)
    # step_scheduler_with_optimizer=False: we step the schedule once per optimizer step ourselves;
    # accelerate's default would step it num_processes times, so LR would depend on the world size
    accelerator = Accelerator(gradient_accumulation_steps=cfg.grad_accum, mixed_precision=mixed_precision,
                              step_scheduler_with_optimizer=False, kwargs_handlers=handlers)
    if accelerator.state.deepspeed_plugin is not None:  # we prepare no dataloader: fill DeepSpeed's "auto"s
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = cfg.batch_size
        ds["gradient_accumulation_steps"] = cfg.grad_accum
        ds["train_batch_size"] = cfg.batch_size * cfg.grad_accum * accelerator.num_processes
        if ds.get("gradient_clipping", "auto") == "auto":  # DeepSpeed clips inside engine.step()
            ds["gradient_clipping"] = cfg.max_grad_norm
    return accelerator


def _adamw_implementation(cfg: TrainConfig, accelerator: Accelerator) -> dict:
    """fused=True where torch has the kernel (CPU and CUDA float parameters), unless turned off or under DeepSpeed,
    which wraps the optimizer itself. Measured in eval/perf/RESULTS.md ("Optimizer step")."""
    if not cfg.fused_optimizer or accelerator.state.deepspeed_plugin is not None:
        return {}
    return {"fused": accelerator.device.type in ("cpu", "cuda")}


NO_DECAY_MODULES = (torch.nn.Embedding, torch.nn.LayerNorm, torch.nn.BatchNorm1d)
"""Modules whose weights AdamW does not decay (a lookup table or a norm's gain is not a weight to shrink)."""


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay only the ≥ 2-D weights of modules other than embeddings and norms (nanoGPT's
    rule plus the module type, so an nn.Embedding head table is never decayed, whatever its name)."""
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (no_decay if p.ndim < 2 or isinstance(module, NO_DECAY_MODULES) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _loss_parts(output: Any) -> dict[str, torch.Tensor]:
    """Every scalar `*loss` field of a model output (loss, gep_loss, mvc_loss, …)."""
    items = output.items() if hasattr(output, "items") else vars(output).items()
    return {k: v.detach().float() for k, v in items if k.endswith("loss") and torch.is_tensor(v) and v.ndim == 0}


def evaluate(model, accelerator: Accelerator, dataset, collator, batch_size: int) -> dict[str, float]:
    """Mean loss parts over held-out cells (fixed masks: collator epoch 0), reduced across processes."""
    if dataset is None or len(dataset) == 0:
        return {}
    model.eval()
    collator = replace(collator, epoch=0)  # fixed masks for every evaluation
    sampler = ShardedBatchSampler(len(dataset), batch_size, accelerator.num_processes,
                                  accelerator.process_index, shuffle=False)
    sums: dict[str, torch.Tensor] = {}
    n = torch.zeros((), device=accelerator.device)
    with torch.no_grad():
        for batch in DataLoader(dataset, batch_sampler=sampler, collate_fn=collator):
            out = model(**{k: v.to(accelerator.device) for k, v in batch.items()})
            for k, v in _loss_parts(out).items():
                sums[k] = sums.get(k, 0.0) + v
            n += 1
    model.train()
    if not sums:
        return {}
    keys = sorted(sums)
    total = accelerator.reduce(torch.stack([sums[k] for k in keys] + [n]), reduction="sum")
    return {f"eval_{k}": float(total[i] / max(float(total[-1]), 1.0)) for i, k in enumerate(keys)}


def budget_steps(cfg: TrainConfig, micro_per_epoch: int) -> int:
    """Optimizer steps this run trains for: max_steps, or — when train.epochs is set — epochs × optimizer
    steps per epoch (global micro-batches per epoch / grad_accum), rounded up, capped by max_steps.
    Depends on the global batch, not on how it is split over processes, so resume agrees with itself."""
    if cfg.epochs is None:
        return cfg.max_steps
    by_epochs = max(1, math.ceil(cfg.epochs * micro_per_epoch / cfg.grad_accum - 1e-9))
    if by_epochs > cfg.max_steps:
        log.info("train.epochs=%g would be %d steps (%.1f per epoch); train.max_steps=%d caps it",
                 cfg.epochs, by_epochs, micro_per_epoch / cfg.grad_accum, cfg.max_steps)
        return cfg.max_steps
    log.info("train.epochs=%g: %d steps (%.1f per epoch; train.max_steps=%d is the cap)", cfg.epochs, by_epochs,
             micro_per_epoch / cfg.grad_accum, cfg.max_steps)
    return by_epochs


def _early_stopping(cfg: TrainConfig, eval_dataset) -> EarlyStopping:
    """The tracker for this run; off (with a warning saying why) when nothing would be evaluated."""
    patience = cfg.early_stopping_patience
    if patience and not cfg.eval_every:
        log.warning("train.early_stopping_patience=%d needs periodic evaluation: train.eval_every is 0, so early "
                    "stopping is off and the last weights are exported", patience)
        patience = 0
    if patience and (eval_dataset is None or len(eval_dataset) == 0):
        log.warning("train.early_stopping_patience=%d needs held-out cells (data.val_fraction > 0): none, so early "
                    "stopping is off and the last weights are exported", patience)
        patience = 0
    return EarlyStopping(patience, cfg.early_stopping_metric)


def _resume_position(state: dict, cfg: TrainConfig, world: int, micro_per_epoch: int) -> tuple[int, int]:
    """(epoch, global micro-batches to skip in it) for this launch's batch size and world size."""
    micro_batch = cfg.batch_size * world  # cells per global micro-batch now
    if "cells_in_epoch" not in state:  # checkpoint from before positions were stored in cells
        return divmod(state["step"] * cfg.grad_accum, micro_per_epoch)
    offset, rest = divmod(state["cells_in_epoch"], micro_batch)
    if rest:
        log.warning("resume: %d cells into epoch %d is not a whole global micro-batch of %d; %d cells are "
                    "seen again", state["cells_in_epoch"], state["epoch"], micro_batch, rest)
    global_batch = micro_batch * cfg.grad_accum
    if state.get("global_batch", global_batch) != global_batch:
        log.warning("resume: global batch %d (batch_size %d × grad_accum %d × %d processes) differs from the "
                    "checkpoint's %d; keep it equal (scale train.batch_size or train.grad_accum) to continue "
                    "the same optimisation", global_batch, cfg.batch_size, cfg.grad_accum, world,
                    state["global_batch"])
    return state["epoch"], offset


def train(model: torch.nn.Module, dataset, collator, cfg: TrainConfig, eval_dataset=None,
          export: Callable[[torch.nn.Module, dict, Path], None] | None = None, resume: bool = False,
          accelerator: Accelerator | None = None, num_workers: int = 0,
          callbacks: Sequence[Callable[[torch.nn.Module, int], None]] = (),
          length_grouping: bool = False) -> TrainResult:
    """Train `model` (whose forward returns `.loss` when given labels) for `budget_steps` optimizer steps,
    or fewer when early stopping ends it (then the best-on-`eval_dataset` weights are exported).

    `callbacks(model, step)` (e.g. fm.quality.QualityMonitor) run on the main process with the unwrapped
    model at the start, at every eval_every and at the end. `length_grouping` (data.length_grouping): batches
    of cells of similar length (LengthGroupedBatchSampler; a corpus groups within its stream)."""
    out = Path(cfg.output_dir)
    accelerator = accelerator or make_accelerator(cfg)
    if getattr(collator, "pad_to_multiple_of", 0) is None:  # by device: 8 on CUDA, 1 on CPU
        collator = replace(collator, pad_to_multiple_of=pad_multiple(accelerator.device))
    check_output_dir(out, resume)
    set_seed(cfg.seed)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()  # transformers 5 alias of activation checkpointing
    world, rank = accelerator.num_processes, accelerator.process_index
    lengths = dataset_lengths(dataset, collator) if length_grouping else None

    def batch_sampler(epoch: int, start: int) -> Sampler[list[int]]:
        return make_batch_sampler(dataset, cfg.batch_size, world, rank, cfg.seed, epoch, start, lengths,
                                  length_grouping)

    micro_per_epoch = len(batch_sampler(0, 0))
    if micro_per_epoch == 0:
        raise ValueError(f"{len(dataset)} training cells cannot fill one global batch of "
                         f"{cfg.batch_size} × {world} processes; lower train.batch_size")
    total = budget_steps(cfg, micro_per_epoch)  # the schedule's length: known before the optimizer exists
    stopper = _early_stopping(cfg, eval_dataset)
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-8,
                                  **_adamw_implementation(cfg, accelerator))
    scheduler = get_cosine_schedule_with_warmup(optimizer, min(cfg.warmup_steps, total), total)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    step, epoch, offset = 0, 0, 0
    if resume and (ckpt := latest_checkpoint(out)) is not None:
        load_checkpoint(accelerator, ckpt)
        state = read_state(ckpt)
        step = state["step"]
        epoch, offset = _resume_position(state, cfg, world, micro_per_epoch)
        stopper.restore(state.get("early_stopping"), ckpt, accelerator.is_main_process)
        log.info("resumed from %s at step %d (epoch %d, global micro-batch %d, %d processes; saved by %s)",
                 ckpt, step, epoch, offset, world, state.get("world_size", "?"))
    elif resume:
        log.warning("--resume: no checkpoint in %s, starting from scratch", out)
    history = open_history(out / "train_log.csv", step, accelerator.is_main_process)

    def position() -> dict:  # what a checkpoint needs to continue at the same cell, on any world size
        return {"epoch": epoch, "cells_in_epoch": offset * cfg.batch_size * world, "world_size": world,
                "distributed_type": str(accelerator.distributed_type.value), "batch_size": cfg.batch_size,
                "grad_accum": cfg.grad_accum, "global_batch": cfg.batch_size * cfg.grad_accum * world,
                "processes": process_counters(accelerator, seen_micro, seen_cells), "budget_steps": total,
                "early_stopping": stopper.state() if stopper.enabled else None}

    _run_callbacks(callbacks, accelerator, model, step)
    model.train()
    micro, seen_micro, seen_cells, stopped = step * cfg.grad_accum, 0, 0, False
    # the bar only where someone watches (a terminal; FM_PROGRESS=1/0 overrides): redirected, it would print one
    # line per refresh; there train.progress gives one log line per train.log_every steps instead
    show_bar = cfg.progress and accelerator.is_main_process and progress_enabled(None)
    log_progress = cfg.progress and accelerator.is_main_process and not show_bar
    bar = tqdm(total=total, initial=step, disable=not show_bar, desc="train", dynamic_ncols=True)
    t0, cells, tokens, parts_sum, n_parts = time.perf_counter(), 0, 0, {}, 0
    with StopSignal() as stop:
        while step < total and not stopped and not stopper.should_stop:
            collator.epoch = epoch
            sampler = batch_sampler(epoch, offset)
            # a private generator: creating an iterator must not consume the global RNG (dropout), or a
            # resumed run would diverge from an uninterrupted one
            loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collator, num_workers=num_workers,
                                generator=torch.Generator().manual_seed(cfg.seed))
            for batch in loader:
                batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in batch.items()}
                with accelerator.accumulate(model):
                    output = model(**batch)
                    accelerator.backward(output.loss)  # DeepSpeed: engine.backward (+ engine.step at the boundary)
                    if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)  # DeepSpeed: no-op
                    optimizer.step()  # no-op under DeepSpeed (its engine stepped); skipped between boundaries
                    if accelerator.sync_gradients and not optimizer.step_was_skipped:
                        scheduler.step()  # once per optimizer step on every world size
                    optimizer.zero_grad(set_to_none=True)
                micro, offset, seen_micro = micro + 1, offset + 1, seen_micro + 1
                cells += batch["gene_ids"].shape[0]
                seen_cells += batch["gene_ids"].shape[0]
                tokens += int(batch["attention_mask"].sum())
                for k, v in _loss_parts(output).items():
                    parts_sum[k] = parts_sum.get(k, 0.0) + v
                n_parts += 1
                if micro % cfg.grad_accum:
                    continue
                step += 1
                bar.update(1)
                if step % cfg.log_every == 0 or step in (1, total):
                    row = _log_row(accelerator, step, epoch, parts_sum, n_parts, scheduler, cells, tokens, t0)
                    history.append(row)
                    bar.set_postfix(loss=f"{row['loss']:.4f}")
                    if log_progress:
                        log.info("train step %d/%d: loss %.4f", step, total, row["loss"])
                    append_history(out / "train_log.csv", row, accelerator.is_main_process)
                    parts_sum, n_parts = {}, 0
                if cfg.eval_every and step % cfg.eval_every == 0:
                    metrics = evaluate(model, accelerator, eval_dataset, collator, cfg.batch_size)
                    log_eval(out, step, metrics, accelerator)
                    if stopper.update(metrics, step):  # reduced metrics: every rank decides alike
                        stopper.capture(accelerator, model)
                    elif stopper.should_stop:
                        log.info(stopper.describe_stop(step, epoch))
                    _run_callbacks(callbacks, accelerator, model, step)
                stopped = stop.requested(accelerator)  # all ranks agree: any rank's signal stops every rank
                done = step >= total or stopper.should_stop
                if (cfg.save_every and step % cfg.save_every == 0) or done or stopped:
                    save_checkpoint(accelerator, out, step, cfg.save_total_limit, position(),
                                    stopper.checkpoint_files())
                if done or stopped:
                    break
            else:  # the epoch ran out
                epoch, offset = epoch + 1, 0
    bar.close()
    if stopped:
        log.warning("stopped by signal after step %d; checkpoint saved, continue with --resume (exit code %d)",
                    step, EXIT_PREEMPTED)
        return TrainResult(step, history, None, stopped=True, model=model)
    if not (cfg.eval_every and step % cfg.eval_every == 0):  # the loop has not just evaluated this step
        metrics = evaluate(model, accelerator, eval_dataset, collator, cfg.batch_size)
        log_eval(out, step, metrics, accelerator)
        if stopper.update(metrics, step, count=False):
            stopper.capture(accelerator, model)
        _run_callbacks(callbacks, accelerator, model, step)
    if not stopper.should_stop:
        log.info("trained the full budget: %d steps (epoch %d)", step, epoch)
    _use_best_weights(stopper, accelerator, model, step)
    export_dir = None
    if export is not None:
        export_dir = out / "model"
        # collective: every rank must call it (ZeRO-3 gathers the shards); non-main ranks get None
        state_dict = accelerator.get_state_dict(model)
        if accelerator.is_main_process:
            export(accelerator.unwrap_model(model), stopper.weights or state_dict, export_dir)
    accelerator.wait_for_everyone()
    return TrainResult(step, history, export_dir, model=model, early_stopped=stopper.should_stop,
                       best_step=stopper.best_step, best_metric=stopper.best)


def _use_best_weights(stopper: EarlyStopping, accelerator, model, step: int) -> None:
    """Load the best-on-validation weights into the main process's model (what `export` then writes and
    TrainResult.model holds). Under DeepSpeed the engine owns (sharded) weights: only the export gets them."""
    if not (stopper.enabled and stopper.best_step is not None):
        return
    log.info("exporting the best held-out weights: step %d (%s=%.4f); the run ended at step %d",
             stopper.best_step, stopper.metric, stopper.best, step)
    if accelerator.is_main_process and stopper.weights is None:
        log.warning("the best weights of step %d are not available (a checkpoint without %s); exporting the last",
                    stopper.best_step, "best_weights.pt")
    elif accelerator.is_main_process and accelerator.distributed_type != DistributedType.DEEPSPEED:
        accelerator.unwrap_model(model).load_state_dict(stopper.weights)


def _run_callbacks(callbacks, accelerator, model, step: int) -> None:
    """Run `callbacks` on the main process (the others wait). Skipped under DeepSpeed with several
    processes: a sharded model cannot run forward on one rank alone."""
    if not callbacks:
        return
    if accelerator.num_processes > 1 and accelerator.distributed_type == DistributedType.DEEPSPEED:
        log.warning("step %d: callbacks skipped (DeepSpeed with %d processes)", step, accelerator.num_processes)
        return
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        for callback in callbacks:
            callback(unwrapped, step)
    accelerator.wait_for_everyone()


def _log_row(accelerator, step, epoch, parts_sum, n_parts, scheduler, cells, tokens, t0) -> dict:
    """Loss parts averaged over the micro-batches since the last row and over processes.

    The mean over ranks of each rank's mean loss is the loss DDP/ZeRO differentiate (gradients are
    averaged over ranks). It equals the 1-process loss on the same global batch when every rank
    scores as many masked tokens (cells with ≥ max_genes expressed genes); otherwise the two are
    differently weighted means and differ slightly."""
    keys = sorted(parts_sum)
    values = accelerator.reduce(torch.stack([parts_sum[k] for k in keys]), reduction="mean") if keys else []
    n = max(n_parts, 1)
    elapsed = time.perf_counter() - t0
    row = {"step": step, "epoch": epoch}
    row.update({k: float(v) / n for k, v in zip(keys, values)})
    row.update(lr=scheduler.get_last_lr()[0], cells_per_s=cells * accelerator.num_processes / elapsed,
               tokens_per_s=tokens * accelerator.num_processes / elapsed, elapsed_s=elapsed)
    return row


__all__ = ["CHECKPOINTS", "STATE_FILE", "EXIT_PREEMPTED", "LengthGroupedBatchSampler", "MEGABATCH",
           "ShardedBatchSampler", "budget_steps", "dataset_lengths",
           "make_batch_sampler", "TrainResult", "evaluate", "latest_checkpoint", "make_accelerator",
           "save_checkpoint", "train"]
