"""Random-init controls and Δ in `fm eval` (fm/eval/controls.py, fm/eval/deltas.py).

The twin must be the checkpoint's architecture with other weights (else the control controls for
nothing); the harness must add its rows, named by what the method did; Δ and its interval must be
the paired t-interval; a checkpoint that loses to its twin must be flagged. A tiny annotation suite
on 3 cell types of the small PBMC file keeps the harness run to seconds.
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("scanpy", reason="needs the [eval] extra: pip install -e '.[eval]'")

from fm.eval.controls import RANDOM_INIT, SCRATCH, parse_row, random_init_twin, row_name
from fm.eval.deltas import fm_deltas, twin_flags
from fm.eval.harness import run_suite


def test_twin_has_same_architecture_and_other_weights(tiny_model_dir, tmp_path):
    import torch

    import fm

    twin = random_init_twin(tiny_model_dir, tmp_path / "twin", seed=0)
    ref, rnd = fm.load(tiny_model_dir), fm.load(twin)
    assert type(ref) is type(rnd)
    assert ref.config.to_diff_dict() | {"transformers_version": None} == \
        rnd.config.to_diff_dict() | {"transformers_version": None}
    a, b = ref.state_dict(), rnd.state_dict()
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    matrices = [k for k in a if a[k].ndim == 2]
    assert matrices and not any(torch.equal(a[k], b[k]) for k in matrices), "twin kept pretrained weights"
    assert json.loads((twin / "random_init.json").read_text())["seed"] == 0
    for f in tiny_model_dir.iterdir():  # the tokenizer files travel with it
        assert (twin / f.name).is_file(), f.name
    again = fm.load(random_init_twin(tiny_model_dir, tmp_path / "again", seed=0)).state_dict()
    other = fm.load(random_init_twin(tiny_model_dir, tmp_path / "other", seed=1)).state_dict()
    assert all(torch.equal(b[k], again[k]) for k in b), "same seed must give the same twin"
    assert not all(torch.equal(b[k], other[k]) for k in matrices)


def test_row_names_round_trip():
    for control in (None, RANDOM_INIT, SCRATCH):
        assert parse_row(row_name("fm_knn", "run:1", control)) == ("fm_knn", "run:1", control)
    assert parse_row("logreg") == ("logreg", None, None)


@pytest.fixture(scope="module")
def tiny_suite(tmp_path_factory, small_h5ad_path):
    """An annotation suite on 180 cells of the 3 commonest types (a stratified split needs ≥ 2 per class)."""
    import anndata as ad
    import yaml

    tmp = tmp_path_factory.mktemp("controls_suite")
    a = ad.read_h5ad(small_h5ad_path)
    top = a.obs["cell_type"].value_counts().index[:3]
    a = a[np.flatnonzero(a.obs["cell_type"].isin(top))[:180]].copy()
    a.obs["cell_type"] = a.obs["cell_type"].astype(str)
    a.write_h5ad(tmp / "cells.h5ad")
    suite = {"task": "annotation", "methods": ["majority", "logreg", "fm_knn", "fm_finetune"],
             "datasets": [{"name": "toy", "file": str(tmp / "cells.h5ad"), "label_key": "cell_type"}],
             "caps": {"n_hvg": 300, "finetune": {"train.max_steps": 2, "train.eval_every": 0, "train.batch_size": 16,
                                                 "data.max_genes": 64}},
             "profiles": {"ci": {"seeds": [0]}}}
    (tmp / "annotation.yaml").write_text(yaml.safe_dump(suite))
    return tmp / "annotation.yaml"


def test_controls_rows_and_report(tiny_suite, tiny_model_dir, tmp_path):
    from fm.eval.context import EvalContext

    out = tmp_path / "out"
    df = run_suite(tiny_suite, "ci", [tiny_model_dir], out)
    label = EvalContext.model_label(tiny_model_dir)
    methods = set(df.method)
    assert {row_name("fm_knn", label), row_name("fm_knn", label, RANDOM_INIT),
            row_name("fm_finetune", label), row_name("fm_finetune", label, SCRATCH)} <= methods, methods
    assert row_name("fm_finetune", label, RANDOM_INIT) not in methods  # fine-tuned twin rows are `scratch`
    md = (out / "results.md").read_text()
    assert "Δ vs logreg" in md and "Δ vs twin" in md
    deltas = pd.read_csv(out / "deltas.csv")
    assert set(deltas.versus) == {"baseline", "twin"} and (deltas.n == 1).all()
    assert json.loads((out / "meta.json").read_text())["fm_controls"] is True
    off = run_suite(tiny_suite, "ci", [tiny_model_dir], tmp_path / "off", controls=False, write=False)
    assert not any(parse_row(m)[2] for m in off.method)


def _frame(values: dict[str, list[float]], metric="macro_f1", dataset="pbmc3k") -> pd.DataFrame:
    return pd.DataFrame([{"task": "annotation", "dataset": dataset, "method": m, "metric": metric, "value": v,
                          "seed": s, "runtime_s": 1.0} for m, vs in values.items() for s, v in enumerate(vs)])


def test_delta_is_the_paired_t_interval():
    from scipy import stats

    fm, twin, best = [0.80, 0.86, 0.83], [0.60, 0.70, 0.62], [0.75, 0.78, 0.74]
    df = _frame({"majority": [0.95, 0.95, 0.95],  # a control: never the reference, however high
                 "logreg": best, "knn_pca": [0.70, 0.72, 0.71], "fm_knn[m]": fm, "fm_knn[m:random_init]": twin})
    d = fm_deltas(df, "macro_f1", higher=True, controls=["majority"]).set_index(["method", "versus"])
    diff = np.subtract(fm, best)
    half = stats.t.ppf(0.975, 2) * diff.std(ddof=1) / np.sqrt(3)
    row = d.loc[("fm_knn[m]", "baseline")]
    assert row.reference == "logreg" and row.n == 3
    assert row.delta == pytest.approx(diff.mean()) and row.low == pytest.approx(diff.mean() - half)
    assert row.high == pytest.approx(diff.mean() + half)
    assert d.loc[("fm_knn[m]", "twin")].delta == pytest.approx(np.mean(np.subtract(fm, twin)))
    assert d.loc[("fm_knn[m:random_init]", "baseline")].reference == "logreg"
    assert ("fm_knn[m:random_init]", "twin") not in d.index
    assert twin_flags(d.reset_index()) == []


def test_lower_is_better_is_oriented_and_one_seed_has_no_interval():
    df = _frame({"none": [1.0], "magic": [0.8], "fm_finetune[m]": [0.7], "fm_finetune[m:scratch]": [0.6]},
                metric="mcv_mse")
    d = fm_deltas(df, "mcv_mse", higher=False, controls=["none"]).set_index(["method", "versus"])
    row = d.loc[("fm_finetune[m]", "baseline")]
    assert row.reference == "magic" and row.delta == pytest.approx(0.1) and np.isnan(row.low) and row.n == 1
    assert d.loc[("fm_finetune[m]", "twin")].delta == pytest.approx(-0.1)  # the scratch twin is better


@pytest.mark.parametrize("fm, flagged", [([0.70, 0.71, 0.69], True),   # loses to the twin
                                         ([0.82, 0.68, 0.73], True),   # mean above, interval not
                                         ([0.80, 0.82, 0.81], False)])  # clear win
def test_flag_when_fm_does_not_beat_its_twin(tmp_path, fm, flagged):
    from fm.eval.registry import get_task
    from fm.eval.report import write_report

    df = _frame({"logreg": [0.7, 0.7, 0.7], "fm_finetune[m]": fm, "fm_finetune[m:scratch]": [0.72, 0.73, 0.71]})
    suite = {"task": "annotation", "_module": get_task("annotation"), "_path": "eval/annotation.yaml"}
    write_report(df, tmp_path, suite=suite, profile="ci", seeds=[0, 1, 2], models=[], caps={}, runtime_s=1.0,
                 fm_controls=True)
    line = "⚠ fm_finetune[m] does not beat its random-init twin (fm_finetune[m:scratch]) on pbmc3k"
    assert (line in (tmp_path / "results.md").read_text()) is flagged
    assert bool(json.loads((tmp_path / "meta.json").read_text())["twin_flags"]) is flagged
