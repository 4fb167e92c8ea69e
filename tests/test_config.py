"""Recipes parse; unknown keys and wrong types are errors; dotted overrides apply."""
from pathlib import Path

import pytest
import yaml

from fm.config import RunConfig, load_config
from fm.paths import recipe_path

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*/*.yaml"))
RUN_RECIPES = [r for r in RECIPES if r.parent.name in ("pretrain", "finetune")]


@pytest.mark.parametrize("recipe", RUN_RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_recipe_parses(recipe):
    cfg = load_config(recipe)
    assert isinstance(cfg, RunConfig)
    assert cfg.data.paths, "a pretraining recipe names its data"


def test_overrides_apply_and_coerce():
    cfg = load_config(recipe_path("debug"), ["train.max_steps=20", "train.lr=1e-3", "data.conditions=[batch,assay]", "model.init_from=null"])
    assert cfg.train.max_steps == 20 and cfg.train.lr == pytest.approx(1e-3)
    assert cfg.data.conditions == ["batch", "assay"] and cfg.model.init_from is None


@pytest.mark.parametrize("override, message", [
    (["train.max_stepz=3"], "train.max_stepz"),
    (["nosection.x=1"], "nosection"),
    (["train.max_steps=many"], "train.max_steps"),
    (["train.gradient_checkpointing=3"], "true/false"),
    (["model.d_model=30"], "divisible"),
    (["data.mask_ratio=1.5"], "mask_ratio"),
    (["train.mixed_precision=fp8"], "mixed_precision"),
])
def test_bad_config_is_a_clear_error(override, message):
    with pytest.raises((KeyError, TypeError, ValueError), match=message):
        load_config(None, override)


def test_recipe_unknown_key(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"train": {"max_steps": 3, "learning_rate": 1}}))
    with pytest.raises(KeyError, match="train.learning_rate"):
        load_config(recipe)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["train.max_steps=7", "data.paths=[a.h5ad]"])
    cfg.save(tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
