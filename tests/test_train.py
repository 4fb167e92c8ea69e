"""The training loop: export, resume = uninterrupted, no silent overwrite (on the real small files when
the shared data is there, else generated stand-ins; the debug recipe's own run needs the real data)."""
import csv

import pytest
import torch
from transformers import AutoModel

import fm
from conftest import tiny_overrides
from fm.config import load_config
from fm.paths import recipe_path
from fm.pretrain import run_pretraining
from fm.train import CHECKPOINTS


def _losses(path):
    with open(path) as f:
        return {int(float(r["step"])): float(r["loss"]) for r in csv.DictReader(f)}


def test_export_loads_with_fm_and_automodel(tiny_model_dir):
    names = {p.name for p in tiny_model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "cell_tokenizer.json", "tokenizer_config.json"} <= names
    model = fm.load(tiny_model_dir)
    assert isinstance(model, fm.ScFMForMaskedExpression) and not model.training
    backbone, info = AutoModel.from_pretrained(tiny_model_dir, output_loading_info=True)
    assert isinstance(backbone, fm.ScFMModel)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for a, b in zip(backbone.state_dict().values(), model.scfm.state_dict().values()):
        assert torch.equal(a, b)


def test_resume_continues_with_the_same_losses(tmp_path, small_h5ad_path):
    extra = {"model.dropout": 0.1, "train.save_every": 5, "train.save_total_limit": 5}
    full = run_pretraining(load_config(recipe_path("debug"), tiny_overrides(tmp_path / "a", [small_h5ad_path], 12, **extra)))
    run_b = tmp_path / "b"
    cfg_b = load_config(recipe_path("debug"), tiny_overrides(run_b, [small_h5ad_path], 12, **extra))
    run_pretraining(cfg_b)
    import shutil
    shutil.rmtree(run_b / CHECKPOINTS / "step_12")  # as if killed between step 10 and 12
    shutil.rmtree(run_b / CHECKPOINTS / "step_10")  # … and between 5 and 10
    resumed = run_pretraining(cfg_b, resume=True)
    assert resumed.step == 12
    a, b = _losses(tmp_path / "a" / "train_log.csv"), _losses(run_b / "train_log.csv")
    assert sorted(b) == list(range(1, 13)), "the log is rewritten from the resumed step, no duplicates"
    for step in range(1, 13):
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-7), step
    assert full.history[-1]["loss"] == pytest.approx(resumed.history[-1]["loss"], rel=1e-5)


def test_refuses_to_overwrite_a_run(tmp_path, small_h5ad_path):
    cfg = load_config(recipe_path("debug"), tiny_overrides(tmp_path, [small_h5ad_path], 2))
    run_pretraining(cfg)
    before = (tmp_path / "train_log.csv").read_text()
    with pytest.raises(FileExistsError, match="--resume"):
        run_pretraining(cfg)
    assert (tmp_path / "train_log.csv").read_text() == before


def test_conditions_become_tokens(tmp_path, batch_h5ad_path):
    cfg = load_config(recipe_path("debug"), tiny_overrides(tmp_path, [batch_h5ad_path], 3) + ["data.conditions=[sample]"])
    result = run_pretraining(cfg)
    model = fm.load(result.export_dir)
    assert model.config.condition_keys == ["sample"] and model.config.condition_vocab_sizes == [5]
    assert model.cell_tokenizer.condition_categories["sample"][0] == "<unknown>"


def test_empty_data_paths_is_a_clear_error(tmp_path):
    cfg = load_config(None, [f"train.output_dir={tmp_path}"])
    with pytest.raises(ValueError, match="data.paths is empty"):
        run_pretraining(cfg)


def test_debug_recipe_learns_on_real_cells(tmp_path, pbmc_path, kang_path):
    """The debug recipe itself (shortened): loss falls to ≤ 0.8 × its start on real cells."""
    cfg = load_config(recipe_path("debug"), [f"train.output_dir={tmp_path}", "train.max_steps=60",
                                             "train.progress=false", "train.eval_every=0", "train.save_every=0"])
    result = run_pretraining(cfg)
    first, last = result.history[0], result.history[-1]
    assert first["step"] == 1 and last["step"] == 60
    assert last["loss"] <= 0.8 * first["loss"], (first["loss"], last["loss"])
    evals = (tmp_path / "eval_log.jsonl").read_text().splitlines()
    assert evals and "eval_gep_loss" in evals[-1]


def test_weight_decay_is_chosen_by_module_type():
    """AdamW decays ≥ 2-D weights of Linear layers only: every nn.Embedding (whatever its name — a
    head's lookup table too) and every norm is left alone, and frozen tensors are in no group."""
    import torch
    from torch import nn

    from fm.train import _param_groups

    model = nn.ModuleDict({"proj": nn.Linear(4, 4), "niche_head": nn.ModuleDict({"base": nn.Embedding(3, 4)}),
                           "mvc_batch_head": nn.Embedding(2, 4), "norm": nn.LayerNorm(4), "bn": nn.BatchNorm1d(4),
                           "frozen": nn.Linear(4, 4)})
    model["frozen"].requires_grad_(False)
    decay, no_decay = _param_groups(model, 0.01)
    assert [p for p in decay["params"]] == [model["proj"].weight] and decay["weight_decay"] == 0.01
    ids = {id(p) for p in no_decay["params"]}
    for p in (model["niche_head"]["base"].weight, model["mvc_batch_head"].weight, model["norm"].weight,
              model["bn"].weight, model["proj"].bias):
        assert id(p) in ids
    assert not ({id(p) for p in model["frozen"].parameters()} & (ids | {id(p) for p in decay["params"]}))
    assert no_decay["weight_decay"] == 0.0 and isinstance(decay["params"][0], torch.nn.Parameter)
