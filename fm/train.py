"""The one training loop (accelerate): pretraining and every fine-tune call `train(...)`.

Batch arithmetic: a micro-batch is `batch_size` cells on one process; an optimizer step is
`grad_accum` micro-batches on each of `world` processes, i.e. batch_size × grad_accum × world
cells. Data order is ours, not accelerate's: `ShardedBatchSampler` deals each process a disjoint
slice of a (seed, epoch) permutation, so resuming at micro-batch k is exact and a 2-process run
sees the same global batches as a 1-process run with twice the batch.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, set_seed
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from fm.config import TrainConfig

log = logging.getLogger("fm")
CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"


class ShardedBatchSampler(Sampler[list[int]]):
    """Per-process batches of a (seed, epoch) permutation; process r takes slice r of each global batch."""

    def __init__(self, n: int, batch_size: int, world: int = 1, rank: int = 0, seed: int = 0,
                 epoch: int = 0, start_batch: int = 0, shuffle: bool = True):
        self.n, self.batch_size, self.world, self.rank = n, batch_size, world, rank
        self.seed, self.epoch, self.start_batch, self.shuffle = seed, epoch, start_batch, shuffle

    def __len__(self) -> int:  # full global batches only (drop_last): every rank steps the same count
        return self.n // (self.batch_size * self.world) - self.start_batch

    def __iter__(self):
        order = (np.random.default_rng([self.seed, self.epoch]).permutation(self.n) if self.shuffle
                 else np.arange(self.n))
        global_batch = self.batch_size * self.world
        for b in range(self.start_batch, self.n // global_batch):
            lo = b * global_batch + self.rank * self.batch_size
            yield order[lo:lo + self.batch_size].tolist()


def make_batch_sampler(dataset, batch_size: int, world: int, rank: int, seed: int, epoch: int,
                       start_batch: int) -> Sampler[list[int]]:
    """The dataset's own sampler if it has one (e.g. a sharded corpus reading disjoint shards per
    rank), else ShardedBatchSampler. Contract: every rank yields the same number of batches, the
    order is a function of (seed, epoch), and `start_batch` skips that many of this rank's batches."""
    if hasattr(dataset, "batch_sampler"):
        return dataset.batch_sampler(batch_size, world, rank, seed, epoch, start_batch)
    return ShardedBatchSampler(len(dataset), batch_size, world, rank, seed, epoch, start_batch)


@dataclass
class TrainResult:
    step: int
    history: list[dict] = field(default_factory=list)
    export_dir: Path | None = None


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    """Accelerator for this launch; gloo when several CPU processes (see DESIGN 'Known traps')."""
    handlers = []
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    accelerator = Accelerator(gradient_accumulation_steps=cfg.grad_accum, mixed_precision=cfg.mixed_precision,
                              kwargs_handlers=handlers)
    if accelerator.state.deepspeed_plugin is not None:  # we do not prepare a dataloader: tell DeepSpeed
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = cfg.batch_size
        ds["gradient_accumulation_steps"] = cfg.grad_accum
    return accelerator


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no decay on biases, norms and embeddings (GPT-2/BERT practice)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "embed" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def latest_checkpoint(output_dir: Path) -> Path | None:
    ckpts = sorted((output_dir / CHECKPOINTS).glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
    ckpts = [c for c in ckpts if (c / STATE_FILE).is_file()]  # a checkpoint without state is unfinished
    return ckpts[-1] if ckpts else None


def _loss_parts(output: Any) -> dict[str, torch.Tensor]:
    """Every scalar `*loss` field of a model output (loss, gep_loss, mvc_loss, …)."""
    items = output.items() if hasattr(output, "items") else vars(output).items()
    return {k: v.detach().float() for k, v in items if k.endswith("loss") and torch.is_tensor(v) and v.ndim == 0}


def evaluate(model, accelerator: Accelerator, dataset, collator, batch_size: int) -> dict[str, float]:
    """Mean loss parts over held-out cells (fixed masks: collator epoch 0), reduced across processes."""
    if dataset is None or len(dataset) == 0:
        return {}
    model.eval()
    collator = type(collator)(**{**collator.__dict__, "epoch": 0})
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


def train(model: torch.nn.Module, dataset, collator, cfg: TrainConfig, eval_dataset=None,
          export: Callable[[torch.nn.Module, dict, Path], None] | None = None, resume: bool = False,
          accelerator: Accelerator | None = None, num_workers: int = 0) -> TrainResult:
    """Train `model` (whose forward returns `.loss` when given labels) for cfg.max_steps optimizer steps."""
    out = Path(cfg.output_dir)
    accelerator = accelerator or make_accelerator(cfg)
    if not resume and latest_checkpoint(out) is not None:
        raise FileExistsError(f"{out} already holds checkpoints of a run; pass --resume to continue it "
                              "or choose another train.output_dir (nothing was overwritten).")
    set_seed(cfg.seed)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()  # transformers 5 alias of activation checkpointing
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-8)
    scheduler = get_cosine_schedule_with_warmup(optimizer, min(cfg.warmup_steps, cfg.max_steps), cfg.max_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    world, rank = accelerator.num_processes, accelerator.process_index
    micro_per_epoch = len(make_batch_sampler(dataset, cfg.batch_size, world, rank, cfg.seed, 0, 0))
    if micro_per_epoch == 0:
        raise ValueError(f"{len(dataset)} training cells cannot fill one global batch of "
                         f"{cfg.batch_size} × {world} processes; lower train.batch_size")
    step = 0
    if resume and (ckpt := latest_checkpoint(out)) is not None:
        accelerator.load_state(str(ckpt))
        step = json.loads((ckpt / STATE_FILE).read_text())["step"]
        log.info("resumed from %s at step %d", ckpt, step)
    elif resume:
        log.warning("--resume: no checkpoint in %s, starting from scratch", out)
    history = _open_history(out / "train_log.csv", step, accelerator.is_main_process)

    model.train()
    micro = step * cfg.grad_accum
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not (cfg.progress and accelerator.is_main_process),
               desc="train", dynamic_ncols=True)
    t0, cells, tokens, parts_sum, n_parts = time.perf_counter(), 0, 0, {}, 0
    while step < cfg.max_steps:
        epoch, offset = divmod(micro, micro_per_epoch)
        collator.epoch = epoch
        sampler = make_batch_sampler(dataset, cfg.batch_size, world, rank, cfg.seed, epoch, offset)
        # a private generator: creating an iterator must not consume the global RNG (dropout), or a
        # resumed run would diverge from an uninterrupted one
        loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collator, num_workers=num_workers,
                            generator=torch.Generator().manual_seed(cfg.seed))
        for batch in loader:
            batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in batch.items()}
            with accelerator.accumulate(model):
                output = model(**batch)
                accelerator.backward(output.loss)
                if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            micro += 1
            cells += batch["gene_ids"].shape[0]
            tokens += int(batch["attention_mask"].sum())
            for k, v in _loss_parts(output).items():
                parts_sum[k] = parts_sum.get(k, 0.0) + v
            n_parts += 1
            if micro % cfg.grad_accum:
                continue
            step += 1
            bar.update(1)
            if step % cfg.log_every == 0 or step in (1, cfg.max_steps):
                row = _log_row(accelerator, step, epoch, parts_sum, n_parts, scheduler, cells, tokens, t0)
                history.append(row)
                bar.set_postfix(loss=f"{row['loss']:.4f}")
                _append_history(out / "train_log.csv", row, accelerator.is_main_process)
                parts_sum, n_parts = {}, 0
            if cfg.eval_every and step % cfg.eval_every == 0:
                _log_eval(out, step, evaluate(model, accelerator, eval_dataset, collator, cfg.batch_size), accelerator)
            if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.max_steps:
                save_checkpoint(accelerator, out, step, cfg.save_total_limit)
            if step >= cfg.max_steps:
                break
    bar.close()
    _log_eval(out, step, evaluate(model, accelerator, eval_dataset, collator, cfg.batch_size), accelerator)
    export_dir = None
    if export is not None:
        export_dir = out / "model"
        state_dict = accelerator.get_state_dict(model)  # gathers ZeRO-3 shards; None on non-main ranks
        if accelerator.is_main_process:
            export(accelerator.unwrap_model(model), state_dict, export_dir)
    accelerator.wait_for_everyone()
    return TrainResult(step, history, export_dir)


def save_checkpoint(accelerator: Accelerator, out: Path, step: int, keep: int) -> Path:
    """accelerate.save_state + our step counter; the state file is written last, marking it complete."""
    ckpt = out / CHECKPOINTS / f"step_{step}"
    accelerator.save_state(str(ckpt))
    if accelerator.is_main_process:
        (ckpt / STATE_FILE).write_text(json.dumps({"step": step}))
        done = sorted((out / CHECKPOINTS).glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
        for old in done[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return ckpt


def _log_row(accelerator, step, epoch, parts_sum, n_parts, scheduler, cells, tokens, t0) -> dict:
    """Loss parts averaged over the micro-batches since the last row and over processes."""
    keys = sorted(parts_sum)
    values = accelerator.reduce(torch.stack([parts_sum[k] for k in keys]), reduction="mean") if keys else []
    n = max(n_parts, 1)
    elapsed = time.perf_counter() - t0
    row = {"step": step, "epoch": epoch}
    row.update({k: float(v) / n for k, v in zip(keys, values)})
    row.update(lr=scheduler.get_last_lr()[0], cells_per_s=cells * accelerator.num_processes / elapsed,
               tokens_per_s=tokens * accelerator.num_processes / elapsed, elapsed_s=elapsed)
    return row


def _open_history(path: Path, step: int, main: bool) -> list[dict]:
    """Rows up to `step` from an earlier run (a resumed run rewrites what came after)."""
    rows = []
    if path.is_file():
        with path.open() as f:
            rows = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f) if float(r["step"]) <= step]
    if main:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        for r in rows:
            _append_history(path, r, main)
    return rows


def _append_history(path: Path, row: dict, main: bool) -> None:
    if not main:
        return
    new = not path.is_file()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def _log_eval(out: Path, step: int, metrics: dict, accelerator: Accelerator) -> None:
    if metrics and accelerator.is_main_process:
        log.info("step %d: %s", step, ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        with (out / "eval_log.jsonl").open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")


__all__ = ["ShardedBatchSampler", "make_batch_sampler", "TrainResult", "evaluate", "latest_checkpoint", "make_accelerator",
           "save_checkpoint", "train"]
