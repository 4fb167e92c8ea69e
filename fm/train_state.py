"""Checkpoints, trainer state, logs and the stop signal of the training loop (fm/train.py).

A checkpoint is `OUT/checkpoints/step_N/`: `accelerator.save_state` (model, optimizer, scheduler,
RNG; DeepSpeed's own layout under DeepSpeed) plus `trainer_state.json`, written last, so a
checkpoint without it is unfinished and ignored. trainer_state.json records the optimizer step
and the position in the data as (epoch, cells consumed in that epoch), which does not depend on
how many processes read them — so a run resumes at the same cell with another world size.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import signal
import threading
from pathlib import Path

import torch
from accelerate import Accelerator

log = logging.getLogger("fm")
CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
EXIT_PREEMPTED = 143  # 128 + SIGTERM: "checkpointed and stopped on a signal; rerun with --resume"


def latest_checkpoint(output_dir: Path) -> Path | None:
    ckpts = sorted((Path(output_dir) / CHECKPOINTS).glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
    ckpts = [c for c in ckpts if (c / STATE_FILE).is_file()]  # a checkpoint without state is unfinished
    return ckpts[-1] if ckpts else None


class _RandomStateWatch(logging.Handler):
    """Catches accelerate's INFO "Could not load random states" (load_state swallows the error)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.failed = False

    def emit(self, record: logging.LogRecord) -> None:
        self.failed |= "Could not load random states" in record.getMessage()


def load_checkpoint(accelerator: Accelerator, ckpt: Path) -> None:
    """`accelerator.load_state`, with a WARNING naming the consequence when the RNG state could not be restored
    (accelerate itself only logs INFO and continues): dropout and masking then differ from the interrupted run."""
    watch = _RandomStateWatch()
    logger = logging.getLogger("accelerate.checkpointing")
    logger.addHandler(watch)
    level = logger.level
    logger.setLevel(min(level or logging.INFO, logging.INFO))  # the INFO record must reach the handler
    try:
        accelerator.load_state(str(ckpt))
    finally:
        logger.removeHandler(watch)
        logger.setLevel(level)
    if watch.failed:
        log.warning("resume from %s: the random-number state (random_states_%d.pkl) could not be read, so it was "
                    "NOT restored: weights, optimizer and data position are resumed, but dropout and masking draws "
                    "differ from the interrupted run (the result is no longer bit-identical to an uninterrupted one)",
                    ckpt, accelerator.process_index)


def read_state(ckpt: Path) -> dict:
    return json.loads((ckpt / STATE_FILE).read_text())


def process_counters(accelerator: Accelerator, micro_batches: int, cells: int) -> list[dict]:
    """Every process's rank, node rank and what it consumed since this launch (gathered to all ranks).
    Lets a test assert that N processes really trained on disjoint shards, not N copies."""
    node = int(os.environ.get("GROUP_RANK", os.environ.get("NODE_RANK", 0)))  # torchrun/accelerate set GROUP_RANK
    mine = torch.tensor([[accelerator.process_index, node, micro_batches, cells]], device=accelerator.device)
    rows = accelerator.gather(mine).cpu().tolist() if accelerator.num_processes > 1 else mine.cpu().tolist()
    return [dict(zip(("rank", "node_rank", "micro_batches", "cells"), map(int, r))) for r in rows]


def save_checkpoint(accelerator: Accelerator, out: Path, step: int, keep: int, state: dict | None = None,
                    files: dict[str, object] | None = None) -> Path:
    """accelerate.save_state (on every rank: DeepSpeed writes shards from each), then `files` (name →
    object, torch.save'd by the main process, e.g. the best weights), then trainer_state.json last."""
    ckpt = out / CHECKPOINTS / f"step_{step}"
    accelerator.save_state(str(ckpt))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for name, obj in (files or {}).items():
            torch.save(obj, ckpt / name)
        (ckpt / STATE_FILE).write_text(json.dumps({"step": step, **(state or {})}, indent=1))
        done = sorted((out / CHECKPOINTS).glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
        for old in done[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return ckpt


class StopSignal:
    """SIGTERM (SLURM preemption / time limit, forwarded by the launcher) sets a flag; the loop polls
    `requested()` at each optimizer-step boundary, where all ranks agree (any rank's flag stops all),
    save a checkpoint and return. Installed only in the main thread; the old handler is restored."""

    def __init__(self, signals=(signal.SIGTERM,)):
        self.flag, self.signals, self.previous = False, signals, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self.previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if not self.flag:
            log.warning("received %s: saving a checkpoint at the end of this step, then exiting",
                        signal.Signals(signum).name)
        self.flag = True

    def requested(self, accelerator: Accelerator) -> bool:
        if accelerator.num_processes == 1:
            return self.flag
        flag = torch.tensor([float(self.flag)], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def open_history(path: Path, step: int, main: bool) -> list[dict]:
    """Rows up to `step` from an earlier run (a resumed run rewrites what came after)."""
    rows = []
    if path.is_file():
        with path.open() as f:
            rows = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f) if float(r["step"]) <= step]
    if main:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        for r in rows:
            append_history(path, r, main)
    return rows


def append_history(path: Path, row: dict, main: bool) -> None:
    if not main:
        return
    new = not path.is_file()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def log_eval(out: Path, step: int, metrics: dict, accelerator: Accelerator) -> None:
    if metrics and accelerator.is_main_process:
        log.info("step %d: %s", step, ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        with (out / "eval_log.jsonl").open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
