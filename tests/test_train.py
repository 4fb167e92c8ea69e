"""The training loop: export, resume = uninterrupted, no silent overwrite (on the real small files when
the shared data is there, else generated stand-ins; the debug recipe's own run needs the real data)."""
import csv
import json
import shutil
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModel

import fm
from conftest import tiny_overrides
from fm.config import TrainConfig, load_config
from fm.paths import recipe_path
from fm.pretrain import run_pretraining
from fm.train import CHECKPOINTS, budget_steps, latest_checkpoint, train


def _losses(path):
    with open(path) as f:
        return {int(float(r["step"])): float(r["loss"]) for r in csv.DictReader(f)}


def test_export_loads_with_fm_and_automodel(tiny_model_dir):
    names = {p.name for p in tiny_model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "cell_tokenizer.json", "scfm_vocab.json", "README.md"} <= names
    assert {"tokenizer_config.json", "tokenization_scfm.py"} <= names  # Hugging Face's file → fm's CellTokenizer
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
    before = _snapshot(tmp_path)
    with pytest.raises(FileExistsError, match="--resume"):
        run_pretraining(load_config(recipe_path("debug"), tiny_overrides(tmp_path, [small_h5ad_path], 5)))
    assert _snapshot(tmp_path) == before, "a refused run writes nothing (config.yaml included)"


def _snapshot(root):
    """Every file under root: bytes and mode (a refused run must leave the directory byte-identical)."""
    return {p.relative_to(root): (p.read_bytes(), p.stat().st_mode) for p in sorted(root.rglob("*")) if p.is_file()}


def test_resume_with_unreadable_rng_state_warns(tmp_path, small_h5ad_path, caplog):
    cfg = load_config(recipe_path("debug"), tiny_overrides(tmp_path, [small_h5ad_path], 4, **{"train.save_every": 2}))
    run_pretraining(cfg)
    shutil.rmtree(tmp_path / CHECKPOINTS / "step_4")
    (tmp_path / CHECKPOINTS / "step_2" / "random_states_0.pkl").write_bytes(b"truncated")
    with caplog.at_level("WARNING", logger="fm"):
        assert run_pretraining(cfg, resume=True).step == 4
    warned = [r for r in caplog.records if r.levelname == "WARNING" and "random-number state" in r.getMessage()]
    assert warned and "NOT restored" in warned[0].getMessage()


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


# ---------------------------------------------------------------- budget and early stopping (a toy model)
# One weight θ (init 0) fitted to targets 2 on the training cells while the held-out cells want 1: the
# held-out loss falls until θ passes 1 and rises after, so "the best step" is known in advance.

class _Theta(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.theta = torch.nn.Linear(1, 1, bias=False)
        torch.nn.init.zeros_(self.theta.weight)

    def forward(self, gene_ids, attention_mask, x, labels):
        return SimpleNamespace(loss=((self.theta(x)[:, 0] - labels) ** 2).mean())


@dataclass
class _ToyCollator:
    epoch: int = 0

    def __call__(self, rows):
        n = len(rows)
        return {"gene_ids": torch.zeros(n, 1, dtype=torch.long), "attention_mask": torch.ones(n, 1),
                "x": torch.ones(n, 1), "labels": torch.tensor([r for r in rows], dtype=torch.float32)}


def _toy_cfg(out, **kw):
    base = {"output_dir": str(out), "max_steps": 100, "batch_size": 8, "lr": 0.05, "weight_decay": 0.0,
            "warmup_steps": 0, "eval_every": 2, "save_every": 0, "progress": False, "log_every": 1}
    return TrainConfig(**{**base, **kw})


def _toy_run(out, resume=False, **kw):
    exported = {}
    result = train(_Theta(), [2.0] * 40, _ToyCollator(), _toy_cfg(out, **kw), eval_dataset=[1.0] * 16,
                   export=lambda model, state_dict, d: exported.update(state_dict), resume=resume)
    return result, exported


def _evals(out):
    return [json.loads(line) for line in (out / "eval_log.jsonl").read_text().splitlines()]


def test_epochs_set_the_step_budget_capped_by_max_steps(tmp_path):
    # 40 cells, batch 8 → 5 micro-batches per epoch; grad_accum 2 → 2.5 optimizer steps per epoch
    assert budget_steps(_toy_cfg(tmp_path, epochs=3.0, grad_accum=2), 5) == 8  # ceil(7.5)
    assert budget_steps(_toy_cfg(tmp_path, epochs=2.0, grad_accum=2), 5) == 5
    assert budget_steps(_toy_cfg(tmp_path, epochs=2.0, max_steps=3, grad_accum=2), 5) == 3  # the cap wins
    assert budget_steps(_toy_cfg(tmp_path, max_steps=7), 5) == 7  # epochs unset: max_steps alone
    result, _ = _toy_run(tmp_path, epochs=3.0, grad_accum=2, eval_every=0)
    assert result.step == 8 and not result.early_stopped and result.best_step is None
    assert result.history[-1]["epoch"] == 3 and result.history[-1]["lr"] == pytest.approx(0.0, abs=1e-9), \
        "the cosine schedule ends at the epoch budget"


def test_early_stopping_stops_and_exports_the_best_weights(tmp_path, caplog):
    result, exported = _toy_run(tmp_path, early_stopping_patience=3)
    evals = _evals(tmp_path)
    losses = {e["step"]: e["eval_loss"] for e in evals}
    best_step = min(losses, key=losses.get)
    assert result.early_stopped and result.step == best_step + 3 * 2 < 100, (result.step, losses)
    assert result.best_step == best_step and result.best_metric == pytest.approx(losses[best_step])
    assert max(losses) == result.step, "evaluations end where it stopped"
    theta = float(exported["theta.weight"])
    assert (theta - 1) ** 2 == pytest.approx(losses[best_step], rel=1e-5), "the export is the best step's weights"
    assert float(result.model.theta.weight.detach()) == pytest.approx(theta), "…and so is the returned model"
    assert "early stopping at step" in caplog.text and "exporting the best held-out weights" in caplog.text


def test_early_stopping_resumes_like_an_uninterrupted_run(tmp_path):
    full, full_export = _toy_run(tmp_path / "a", early_stopping_patience=3)
    _toy_run(tmp_path / "b", early_stopping_patience=3, save_every=4, save_total_limit=100)
    ckpts = sorted((tmp_path / "b" / CHECKPOINTS).glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
    resume_from = next(c for c in ckpts if int(c.name.split("_")[1]) > full.best_step)
    for c in ckpts:  # killed just after the first checkpoint past the best step: the best is in it
        if int(c.name.split("_")[1]) > int(resume_from.name.split("_")[1]):
            shutil.rmtree(c)
    assert (resume_from / "best_weights.pt").is_file() and latest_checkpoint(tmp_path / "b") == resume_from
    resumed, resumed_export = _toy_run(tmp_path / "b", resume=True, early_stopping_patience=3, save_every=4,
                                       save_total_limit=100)
    assert (resumed.step, resumed.best_step, resumed.early_stopped) == (full.step, full.best_step, True)
    assert float(resumed_export["theta.weight"]) == pytest.approx(float(full_export["theta.weight"]), abs=1e-7)
    # resuming a run that already stopped early trains nothing more and exports the same best weights
    again, again_export = _toy_run(tmp_path / "b", resume=True, early_stopping_patience=3, save_every=4)
    assert again.step == full.step and torch.equal(again_export["theta.weight"], resumed_export["theta.weight"])


def test_early_stopping_without_periodic_evaluation_is_off_and_says_so(tmp_path, caplog):
    result, exported = _toy_run(tmp_path, early_stopping_patience=2, eval_every=0, max_steps=12)
    assert result.step == 12 and not result.early_stopped and result.best_step is None
    assert "train.eval_every is 0, so early stopping is off" in caplog.text
    assert torch.equal(exported["theta.weight"], result.model.theta.weight.detach())


def test_a_refused_run_overwrites_nothing(tmp_path, small_h5ad_path):
    """A second run into a directory with checkpoints is refused before anything is written: its config.yaml
    still describes the finished run (it used to be rewritten with the refused run's settings)."""
    from conftest import tiny_overrides

    from fm.config import load_config
    from fm.paths import recipe_path
    from fm.pretrain import run_pretraining

    run_pretraining(load_config(recipe_path("debug"), tiny_overrides(tmp_path / "run", [small_h5ad_path], steps=2)))
    before = (tmp_path / "run" / "config.yaml").read_bytes()
    again = load_config(recipe_path("debug"), tiny_overrides(tmp_path / "run", [small_h5ad_path], steps=5))
    with pytest.raises(FileExistsError, match="nothing was overwritten"):
        run_pretraining(again)
    assert (tmp_path / "run" / "config.yaml").read_bytes() == before
