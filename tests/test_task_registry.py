"""The task registry is the one place a task is declared: a sixth task, written entirely in this file
(config, head, collator, run, inference function, eval module) and registered at run time, is
fine-tuned by `fm.finetune`, loaded by `fm.load`, exported as `fm.<function>` and benchmarked by
`fm eval` — without editing any other module. The README's "Adding a task" walks through the same."""
from __future__ import annotations

import types
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import yaml
from torch import nn
from transformers.utils import ModelOutput

import fm
from fm.config import TaskConfig, load_config
from fm.data import LabeledCellCollator
from fm.modeling_scfm import ScFMModel, ScFMPreTrainedModel
from fm.tasks import registry
from fm.tasks.common import (TaskCells, collator_kwargs, concat_targets, encode_with_targets, load_head,
                             load_task_cells, split_cells, train_task)
from fm.inference import run_batched


# ---------------------------------------------------------------- the toy task: predict log library size
@dataclass
class ToyDepthConfig(TaskConfig):
    """task.name=toy_depth: regress each cell's log total count from its embedding."""

    name: str = "toy_depth"
    scale: float = 1.0
    """Multiplies the target (a field of this task only)."""

    def __post_init__(self):
        if self.scale <= 0:
            raise ValueError(f"task.scale must be > 0, got {self.scale}")


@dataclass
class ToyDepthOutput(ModelOutput):
    loss: torch.FloatTensor | None = None
    predictions: torch.FloatTensor | None = None


class ScFMForToyDepth(ScFMPreTrainedModel):
    """Backbone + Linear(D, 1) on the cell embedding."""

    def __init__(self, config):
        super().__init__(config)
        self.scfm = ScFMModel(config)
        self.depth_head = nn.Linear(config.d_model, 1)
        self.post_init()

    def forward(self, gene_ids, values, attention_mask=None, condition_ids=None, labels=None, return_dict=True):
        predictions = self.depth_head(self.scfm(gene_ids, values, attention_mask, condition_ids).cell_embedding).squeeze(-1)
        loss = None if labels is None else nn.functional.mse_loss(predictions.float(), labels.float())
        return ToyDepthOutput(loss=loss, predictions=predictions)


def run_toy_depth(cfg, resume=False, adatas=None):
    def read(adata, source):
        return {"depth": cfg.task.scale * np.log1p(np.asarray(adata.X.sum(axis=1)).ravel()).astype(np.float32)}

    accelerator, tokenizer, (cells, per_source) = load_task_cells(
        cfg, adatas, lambda sources, tokenizer: encode_with_targets(sources, tokenizer, read))
    train_cells, val_cells = split_cells(TaskCells(cells, concat_targets(per_source)), cfg.data.val_fraction,
                                         cfg.train.seed)
    model = load_head(ScFMForToyDepth, cfg)
    collator = LabeledCellCollator(**collator_kwargs(model, cfg), targets={"depth": "labels"})
    return train_task(model, tokenizer, train_cells, val_cells, collator, cfg, resume, accelerator)


def predict_depth(adata, model, key="fm_depth", batch_size=64):
    out, _ = run_batched(adata, model, lambda m, batch: m(**batch).predictions[:, None], width=1,
                         batch_size=batch_size, desc="depth")
    adata.obs[key] = out[:, 0]
    return out[:, 0]


def _eval_module():
    """The toy task's benchmark module: prepare / METHODS / score, as fm/eval/tasks/<task>.py are."""
    module = types.ModuleType("toy_depth_eval")
    module.MAIN_METRIC, module.HIGHER_IS_BETTER, module.CONTROLS, module.DATASET_KEYS = "mse", False, ["mean"], set()

    def prepare(dataset, seed, ctx):
        adata = ctx.load_dataset(dataset)
        return types.SimpleNamespace(adata=adata, truth=np.log1p(np.asarray(adata.X.sum(axis=1)).ravel()))

    def fm_finetune(prepared, ctx, model_dir):
        model = ctx.fm_finetune(prepared.adata, model_dir, "toy_depth", "toy", 0)
        return predict_depth(prepared.adata.copy(), model)

    module.prepare = prepare
    module.METHODS = {"mean": lambda prepared, ctx: np.full(len(prepared.truth), prepared.truth.mean()),
                      "fm_finetune": fm_finetune}
    module.score = lambda prepared, output: {"mse": float(np.mean((output - prepared.truth) ** 2))}
    return module


@pytest.fixture()
def toy_task(tmp_path):
    recipe = tmp_path / "toy_depth.yaml"  # recipes/finetune/<task>.yaml
    recipe.write_text(yaml.safe_dump({
        "task": {"name": "toy_depth", "scale": 2.0}, "data": {"max_genes": 32, "val_fraction": 0.1},
        "train": {"max_steps": 3, "batch_size": 16, "lr": 1e-3, "warmup_steps": 1, "progress": False, "save_every": 0}}))
    task = registry.register(registry.Task(name="toy_depth", config=ToyDepthConfig, head=ScFMForToyDepth,
                                           collator=LabeledCellCollator, run=run_toy_depth, inference=(predict_depth,),
                                           eval=_eval_module(), recipe=recipe))
    yield task
    registry.unregister("toy_depth")


def test_a_sixth_task_registered_in_one_file_runs_everywhere(toy_task, tiny_model_dir, small_h5ad_path, pbmc_small,
                                                            tmp_path):
    recipe = toy_task.recipe_path()
    cfg = load_config(recipe)
    assert isinstance(cfg.task, ToyDepthConfig) and cfg.task.scale == 2.0
    with pytest.raises(KeyError, match="task.label_key"):  # only the toy task's own fields
        load_config(recipe, ["task.label_key=x"])

    model = fm.finetune(tiny_model_dir, pbmc_small, task="toy_depth", output_dir=tmp_path / "ft")  # its own recipe
    assert type(model) is ScFMForToyDepth and fm.load(tmp_path / "ft" / "model").__class__ is ScFMForToyDepth
    assert fm.predict_depth is predict_depth and "predict_depth" in fm._public_names()
    depth = fm.predict_depth(pbmc_small, model)
    assert depth.shape == (pbmc_small.n_obs,) and np.isfinite(depth).all()
    np.testing.assert_array_equal(depth, fm.predict_depth(pbmc_small.copy(), model))  # deterministic

    suite = tmp_path / "toy_depth_suite.yaml"  # eval/<task>.yaml
    suite.write_text(yaml.safe_dump({
        "task": "toy_depth", "methods": ["mean", "fm_finetune"],
        "datasets": [{"name": "toy", "file": str(small_h5ad_path), "max_cells": 120}],
        "caps": {"finetune": {"train.max_steps": 2, "data.max_genes": 32}}}))
    from fm.eval.harness import run_suite

    results = run_suite(suite, profile="ci", models=[tiny_model_dir], output_dir=tmp_path / "eval", write=False)
    label = f"fm_finetune[{fm.eval.context.EvalContext.model_label(tiny_model_dir)}]"
    assert set(results["method"]) == {"mean", label, label.replace("]", ":scratch]")}
    assert (results["metric"] == "mse").all()
    assert results["value"].notna().all() and (results["runtime_s"] >= 0).all()


def test_registry_refuses_duplicates_and_names_the_known_tasks():
    with pytest.raises(ValueError, match="already registered"):
        registry.register(registry.TASKS["annotation"])
    with pytest.raises(ValueError, match="known tasks: annotation, imputation, batch_correction"):
        registry.get("segmentation")
    assert list(registry.TASKS) == ["annotation", "imputation", "batch_correction", "modality_prediction", "cci"]


@pytest.mark.parametrize("name", list(registry.TASKS))
def test_every_registered_task_resolves(name):
    """Every reference of every built-in entry imports, and each part is what its field says."""
    task = registry.get(name)
    assert issubclass(task.load("config"), TaskConfig) and task.load("config")().name == name
    assert issubclass(task.load("head"), ScFMPreTrainedModel) and callable(task.load("run"))
    assert callable(task.load("collator"))
    for function in task.functions():
        assert getattr(fm, function) is registry.inference_function(function)
    eval_module = task.load("eval")
    assert all(hasattr(eval_module, a) for a in ("METHODS", "prepare", "score", "MAIN_METRIC"))
    for legacy in task.legacy_heads:  # checkpoints exported under a former class name still load
        assert registry.task_for_head(legacy) is task


def test_light_modules_import_no_torch():
    """`import fm.binning` (and vocab, tokenizer, the task registry) pays for no torch / transformers /
    accelerate: fm/__init__.py exports lazily."""
    import subprocess
    import sys

    code = ("import sys, fm.binning, fm.vocab, fm.tokenizer, fm.tasks.registry, fm.config; "
            "print(sorted(m for m in ('torch', 'transformers', 'accelerate') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
