"""Fine-tuning tasks: `fm finetune RECIPE` and `fm.finetune(model, adata, task)`.

The tasks are the entries of fm.tasks.registry; each one's config, collator, `run` and public
inference functions live in fm/tasks/<task>.py, its head in fm/heads/<task>.py, its benchmark in
fm/eval/tasks/<task>.py. This package imports nothing heavy until a task is used.
"""
from __future__ import annotations

from pathlib import Path

from fm.tasks.registry import TASKS, get


def run_finetune(cfg, resume: bool = False, adatas=None):
    """Run cfg.task.name's fine-tuning job (`adatas`, an AnnData or list, replaces data.paths when given)."""
    if cfg.task is None:
        raise ValueError("the recipe has no task section: set task.name to one of " + ", ".join(TASKS))
    return get(cfg.task.name).load("run")(cfg, resume=resume, adatas=adatas)


def finetune(model: str | Path, adata, task: str, output_dir: str | Path | None = None,
             recipe: str | Path | None = None, **overrides):
    """Fine-tune a task head on AnnData from Python; returns the fine-tuned model (fm.load of its export).

    model: a pretrained (or fine-tuned) checkpoint directory. adata: an AnnData of raw counts, or a
    list of them. task: a name in fm.tasks.registry.TASKS; the recipe defaults to the task's own
    (recipes/finetune/<task>.yaml). overrides: dotted config keys with '.' written '__', e.g.
    train__max_steps=100, task__label_key="cell_type" (or pass a dict as
    `overrides={"train.max_steps": 100}`). The run (logs, checkpoints, export) goes to output_dir
    (default runs/<task>); a directory that already holds a run is refused, as with `fm finetune`.
    """
    import yaml

    from fm.api import load
    from fm.config import load_config

    spec = get(task)  # unknown task: a clear error before any work
    extra = overrides.pop("overrides", None) or {}
    dotted = {k.replace("__", "."): v for k, v in overrides.items()}
    dotted.update(extra)
    dotted.update({"task.name": task, "model.init_from": str(model)})
    if output_dir is not None:
        dotted["train.output_dir"] = str(output_dir)
    cfg = load_config(recipe or spec.recipe_path(),
                      [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
                       for k, v in dotted.items()])
    run_finetune(cfg, adatas=adata)
    return load(Path(cfg.train.output_dir) / "model")


__all__ = ["TASKS", "finetune", "run_finetune"]
