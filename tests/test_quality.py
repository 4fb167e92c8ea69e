"""Representation quality during pretraining (fm/quality.py): the metrics, the monitor in the debug
recipe (quality_log.csv beside a random-init twin, quality.png), and that measuring changes no step
of training."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from conftest import tiny_overrides
from fm.config import load_config
from fm.paths import recipe_path
from fm.pretrain import run_pretraining
from fm.quality import QUALITY_LOG, embedding_metrics, load_probe


def test_metrics_on_known_embeddings():
    rng = np.random.default_rng(0)
    labels = np.repeat(["a", "b", "c"], 40)
    centres = {"a": [8, 0, 0], "b": [0, 8, 0], "c": [0, 0, 8]}
    depth = rng.normal(size=120)
    separated = np.array([centres[l] for l in labels]) + rng.normal(size=(120, 3))
    good = embedding_metrics(separated, labels, depth)
    assert good["knn_accuracy"] == 1.0 and good["logreg_f1"] == 1.0 and good["nmi"] > 0.95
    assert good["depth_r"] < 0.3
    library = embedding_metrics(np.c_[depth * 10, rng.normal(size=(120, 2))], labels, depth)
    assert library["depth_r"] > 0.99 and library["knn_accuracy"] < 0.6 and library["nmi"] < 0.2


def test_probe_needs_a_label_column(small_h5ad_path):
    with pytest.raises(KeyError, match="::<label column>"):
        load_probe(f"{small_h5ad_path}::no_such_column")
    probe = load_probe(str(small_h5ad_path), max_cells=50)
    assert probe.adata.n_obs == 50 and len(set(probe.labels)) >= 2 and np.isfinite(probe.log_depth).all()


def test_debug_recipe_logs_quality_beside_a_random_twin_without_changing_training(tmp_path, small_h5ad_path):
    def run(out, probes):
        cfg = load_config(recipe_path("debug"), tiny_overrides(out, [small_h5ad_path], steps=6, **{
            "train.eval_every": 3, "data.probes": probes, "data.probe_max_cells": 80}))
        return run_pretraining(cfg)

    with_probes = run(tmp_path / "q", f"[{small_h5ad_path}::cell_type]")
    without = run(tmp_path / "plain", "[]")
    assert [r["loss"] for r in with_probes.history] == [r["loss"] for r in without.history], "RNG untouched"
    log = pd.read_csv(tmp_path / "q" / QUALITY_LOG)
    assert sorted(set(log["step"])) == [0, 3, 6]
    assert set(log["metric"]) == {"knn_accuracy", "logreg_f1", "nmi", "depth_r"}
    assert log.groupby(["probe", "metric"])["random_init"].nunique().eq(1).all()  # the twin is measured once
    assert log["value"].between(0, 1).all() and log["random_init"].between(0, 1).all()
    assert (tmp_path / "q" / "quality.png").is_file() and not (tmp_path / "plain" / QUALITY_LOG).exists()
