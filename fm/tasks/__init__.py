"""Fine-tuning tasks (`fm finetune`): task.name → the function that runs the job.

Each task module builds a labelled dataset, a ScFMFor<Task> model initialised from
`model.init_from`, and a collator, then calls the one training loop `fm.train.train`.
"""
from __future__ import annotations

from fm.config import RunConfig
from fm.train import TrainResult


def run_finetune(cfg: RunConfig, resume: bool = False) -> TrainResult:
    """Dispatch on cfg.task.name."""
    if cfg.task.name == "annotation":
        from fm.tasks.annotation import run_annotation
        return run_annotation(cfg, resume=resume)
    raise ValueError(f"unknown task.name {cfg.task.name!r}")


__all__ = ["run_finetune"]
