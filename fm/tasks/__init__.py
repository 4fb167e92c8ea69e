"""Fine-tuning tasks: `fm finetune RECIPE` and `fm.finetune(model, adata, task)`.

Each task module fm/tasks/<task>.py defines `run(cfg, resume=False, adatas=None) -> TrainResult`:
it builds the per-cell targets, a ScFMFor<Task> head initialised from `model.init_from`, and a
collator, then calls the one training loop (through fm.tasks.common.train_task). Modules are
imported lazily so one task never pays for another's imports.
"""
from __future__ import annotations

import importlib
from pathlib import Path

from fm.config import TASKS, RunConfig, load_config
from fm.train import TrainResult

TASK_MODULES = {name: f"fm.tasks.{name}" for name in TASKS}


def run_finetune(cfg: RunConfig, resume: bool = False, adatas=None) -> TrainResult:
    """Dispatch on cfg.task.name; `adatas` (AnnData or list) replaces data.paths when given."""
    module = importlib.import_module(TASK_MODULES[cfg.task.name])
    return module.run(cfg, resume=resume, adatas=adatas)


def finetune(model: str | Path, adata, task: str, output_dir: str | Path | None = None,
             recipe: str | Path | None = None, **overrides):
    """Fine-tune a task head on AnnData from Python; returns the fine-tuned model (fm.load of its export).

    model: a pretrained (or fine-tuned) checkpoint directory. adata: an AnnData of raw counts, or a
    list of them. task: one of fm.config.TASKS; the recipe defaults to recipes/finetune/<task>.yaml.
    overrides: dotted config keys with '.' written '__', e.g. train__max_steps=100,
    task__label_key="cell_type" (or pass a dict as `overrides={"train.max_steps": 100}`).
    The run (logs, checkpoints, export) goes to output_dir (default runs/<task>); a directory that
    already holds a run is refused, as with `fm finetune`.
    """
    from fm.api import load
    from fm.paths import recipe_path

    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    extra = overrides.pop("overrides", None) or {}
    dotted = {k.replace("__", "."): v for k, v in overrides.items()}
    dotted.update(extra)
    dotted.update({"task.name": task, "model.init_from": str(model)})
    if output_dir is not None:
        dotted["train.output_dir"] = str(output_dir)
    import yaml
    cfg = load_config(recipe or recipe_path(f"finetune/{task}"),
                      [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
                       for k, v in dotted.items()])
    run_finetune(cfg, adatas=adata)
    return load(Path(cfg.train.output_dir) / "model")


__all__ = ["TASK_MODULES", "finetune", "run_finetune"]
