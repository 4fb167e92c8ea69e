"""`fm eval` harness and the annotation / batch-correction / imputation suites on their `ci` profile.

Real data (skips with the path when absent). The ci runs are shared by the tests through a
module fixture; the ranking tests are the point: a control must rank at or near the bottom on
its task's main metric and the best baseline must beat it clearly — if not, the task is broken.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("scanpy", reason="needs the [eval] extra: pip install -e '.[eval]'")

from fm.eval.harness import load_suite, run_suite  # noqa: E402
from fm.paths import DATA_DIR_ENV, data_dir  # noqa: E402
from fm.eval.registry import get_task  # noqa: E402

EVAL = Path(__file__).resolve().parents[1] / "eval"
MINE = ("annotation", "batch_correction", "imputation")
# the best baseline must beat the control by this much on the main metric (absolute, or ratio for MSE)
MARGIN = {"annotation": 0.3, "batch_correction": 0.05, "imputation": 0.8}


def real_file(name: str) -> Path:
    path = data_dir() / "h5ad" / name
    if not path.is_file():
        pytest.skip(f"real data file {path} not found (set {DATA_DIR_ENV} to the shared data directory)")
    return path


def test_every_baseline_library_imports():
    for name in ("scanpy", "sklearn", "scib_metrics", "harmonypy", "scanorama", "scvi", "magic", "liana",
                 "celltypist", "matplotlib"):
        importlib.import_module(name)


def test_all_suites_validate():
    for path in sorted(EVAL.glob("*.yaml")):
        suite = load_suite(path)
        assert suite["task"] == path.stem, f"{path}: one suite per task, named after it"
        assert "ci" in (suite.get("profiles") or {}), f"{path}: every suite needs a ci profile"


@pytest.mark.parametrize("patch, message", [
    ({"label_kye": "cell_type"}, "unknown keys ['label_kye']"),
    ({"__top__": {"profile": {}}}, "unknown top-level keys ['profile']"),
    ({"__profile__": {"ci": {"seed": [0]}}}, "unknown keys ['seed']"),
])
def test_suite_typos_are_errors(tmp_path, patch, message):
    import yaml

    suite = yaml.safe_load((EVAL / "annotation.yaml").read_text())
    if "__top__" in patch:
        suite.update(patch["__top__"])
    elif "__profile__" in patch:
        suite["profiles"].update(patch["__profile__"])
    else:
        suite["datasets"][0].update(patch)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(suite))
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_suite(path)


@pytest.fixture(scope="module")
def ci_runs(tmp_path_factory, request):
    """The three ci suites, once, with a tiny session model pretrained on PBMC and CellBench cells as the FM
    (rows fm_…[<name>]): a PBMC-only model never trained on most CellBench genes, and the tokenizer rightly
    refuses them."""
    real_file("pbmc3k_seurat_hvg2000_labeled.h5ad")
    real_file("cellbench_3cl_celseq2_dropseq.h5ad")
    model = request.getfixturevalue("tiny_full_model_dir")
    out = tmp_path_factory.mktemp("eval_ci")
    return {task: (run_suite(EVAL / f"{task}.yaml", "ci", [model] if task != "imputation" else [], out / task),
                   out / task) for task in MINE}


@pytest.mark.parametrize("task", MINE)
def test_ci_profile_writes_outputs(ci_runs, task):
    df, out = ci_runs[task]
    assert {"task", "dataset", "method", "metric", "value", "seed", "runtime_s"} <= set(df.columns)
    assert (df.task == task).all() and len(df)
    for name in ("results.csv", "results.md", "meta.json"):
        assert (out / name).is_file(), name
    meta = json.loads((out / "meta.json").read_text())
    assert meta["profile"] == "ci" and meta["seeds"] == [0] and meta["versions"]["scanpy"]
    assert list(out.glob("*.png"))
    module = get_task(task)
    assert f"**{module.MAIN_METRIC}**" in (out / "results.md").read_text()
    assert (out / "splits").is_dir() and list((out / "splits").glob("*.npz"))
    if task != "imputation":
        assert df.method.str.startswith("fm").any(), "FM rows missing"
        assert df.method.str.contains(r":(?:random_init|scratch)\]").any(), "random-init control rows missing"
        assert "Δ vs twin" in (out / "results.md").read_text() and (out / "deltas.csv").is_file()
    if task == "batch_correction":
        assert (out / "batch_correction_table.png").is_file() and list(out.glob("umap_*.png"))


@pytest.mark.parametrize("task", MINE)
def test_control_ranks_low_and_best_baseline_beats_it(ci_runs, task):
    df, _ = ci_runs[task]
    module = get_task(task)
    main = df[(df.metric == module.MAIN_METRIC) & ~df.method.str.startswith("fm")]
    scores = main.groupby("method")["value"].mean()
    sign = 1 if module.HIGHER_IS_BETTER else -1
    ranked = (sign * scores).sort_values(ascending=False)  # best first
    for control in module.CONTROLS:
        assert list(ranked.index).index(control) >= len(ranked) - 2, f"{task}: control {control} ranks {ranked}"
        best = scores[ranked.index[0]]
        if module.HIGHER_IS_BETTER:
            assert best >= scores[control] + MARGIN[task], scores
        else:
            assert best <= MARGIN[task] * scores[control], scores


def test_splits_are_reused(ci_runs):
    """Re-running into the same directory reads the saved split instead of drawing a new one."""
    from fm.eval.context import EvalContext

    _, out = ci_runs["annotation"]
    path = out / "splits" / "pbmc3k_seed0.npz"
    ctx = EvalContext(output_dir=out, profile="ci", models=[], data_dir=Path("."), caps={})
    names = np.load(path)["obs_names"]
    train, test = ctx.save_split("pbmc3k_seed0", [0], [1], obs_names=names)
    assert len(train) > 1 and len(test) > 1
    with pytest.raises(ValueError, match="other cells"):
        ctx.save_split("pbmc3k_seed0", [0], [1], obs_names=names[::-1])


def _suite(tmp_path, task, dataset, methods):
    import yaml

    path = tmp_path / f"{task}.yaml"
    path.write_text(yaml.safe_dump({"task": task, "methods": methods, "datasets": [dataset],
                                    "profiles": {"ci": {"seeds": [0]}}}))
    return path


def test_missing_batch_column_names_file_and_column(tmp_path):
    real = real_file("kang2018_muscat_1556c_labeled.h5ad")
    suite = _suite(tmp_path, "batch_correction", {"name": "kang", "file": str(real), "label_key": "cell_type",
                                                   "batch_key": "donor"}, ["unintegrated"])
    with pytest.raises(ValueError, match=r"kang2018_muscat_1556c_labeled\.h5ad: obs has no column 'donor'"):
        run_suite(suite, "ci", [], tmp_path / "out")


def test_model_with_too_few_matching_genes_names_the_file(tmp_path, tiny_model_dir, pbmc_small):
    pbmc_small.var_names = [f"notagene{i}" for i in range(pbmc_small.n_vars)]
    data = tmp_path / "renamed.h5ad"
    pbmc_small.write_h5ad(data)
    suite = _suite(tmp_path, "annotation", {"name": "renamed", "file": str(data), "label_key": "cell_type"},
                   ["fm_knn", "majority"])
    with pytest.raises(ValueError, match=r"renamed\.h5ad.*vocabulary"):
        run_suite(suite, "ci", [tiny_model_dir], tmp_path / "out")


def test_methods_and_datasets_pick_a_subset_of_a_suite():
    from fm.eval.harness import resolve_profile

    suite = load_suite(Path(__file__).resolve().parents[1] / "eval" / "annotation.yaml")
    plan = resolve_profile(suite, "cpu", [0], methods=["knn_pca", "fm_finetune"], datasets=["kang_ctrl_to_stim"])
    assert plan["methods"] == ["knn_pca", "fm_finetune"] and [d["name"] for d in plan["datasets"]] == ["kang_ctrl_to_stim"]
    assert plan["seeds"] == [0]
    with pytest.raises(ValueError, match="--methods \\['scgpt'\\] not in the suite's methods"):
        resolve_profile(suite, "cpu", methods=["scgpt"])
    with pytest.raises(ValueError, match="--datasets"):
        resolve_profile(suite, "cpu", datasets=["pbmc68k"])


def test_a_failing_dataset_keeps_the_others_results(tmp_path, pbmc_small):
    import yaml

    from fm.eval.harness import EvalFailed

    pbmc_small.write_h5ad(tmp_path / "counts.h5ad")
    logged = pbmc_small.copy()
    logged.layers["counts"] = logged.X.copy()
    logged.X = np.log1p(logged.X)
    logged.write_h5ad(tmp_path / "logged.h5ad")
    entry = {"label_key": "cell_type", "split": {"kind": "random", "test_size": 0.3}}
    datasets = [{"name": "good", "file": str(tmp_path / "counts.h5ad"), **entry},
                {"name": "logged", "file": str(tmp_path / "logged.h5ad"), **entry},
                {"name": "logged_with_layer", "file": str(tmp_path / "logged.h5ad"), "layer": "counts", **entry}]
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({"task": "annotation", "methods": ["majority"], "datasets": datasets,
                                     "profiles": {"ci": {"seeds": [0]}}}))
    with pytest.raises(EvalFailed, match=r"logged seed 0: ValueError: .*X of dataset 'logged' is not raw counts: "
                                         r"non-integer values .*layer: <name>") as failed:
        run_suite(suite, "ci", [], tmp_path / "out")
    written = pd.read_csv(tmp_path / "out" / "results.csv")
    assert set(written.dataset) == {"good", "logged_with_layer"} == set(failed.value.results.dataset)
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert [f["dataset"] for f in meta["failures"]] == ["logged"]
    assert "Failed dataset runs" in (tmp_path / "out" / "results.md").read_text()


def test_column_split_takes_lists_of_values(tmp_path, pbmc_small):
    from fm.eval.context import EvalContext
    from fm.eval.tasks.annotation import make_split

    pbmc_small.obs["plate"] = np.arange(pbmc_small.n_obs) % 4 + 1
    pbmc_small.uns["eval_file"] = "pbmc_small"
    ctx = EvalContext(output_dir=tmp_path, profile="ci", models=[], data_dir=tmp_path, caps={})
    labels = pbmc_small.obs["cell_type"].astype(str).to_numpy()
    spec = {"name": "plates", "split": {"kind": "column", "key": "plate", "train": [1, 2], "test": 3}}
    train, test = make_split(pbmc_small, spec, 0, ctx, labels)
    assert set(pbmc_small.obs.plate.iloc[train]) == {1, 2} and set(pbmc_small.obs.plate.iloc[test]) == {3}
    spec = {"name": "typo", "split": {"kind": "column", "key": "plate", "train": [1, 7], "test": 9}}
    with pytest.raises(ValueError, match=r"values not in the column: \['7', '9'\]"):
        make_split(pbmc_small, spec, 0, ctx, labels)


def test_imputation_flags_methods_that_destroy_structure(caplog):
    from fm.eval.tasks.imputation import report_flags

    rows = [("none", "ari_kmeans", 0.95), ("smooth", "ari_kmeans", 0.93), ("fm_finetune[m]", "ari_kmeans", 0.07),
            ("none", "mcv_mse", 0.79), ("fm_finetune[m]", "mcv_mse", 0.74)]
    df = pd.DataFrame([{"dataset": "cellbench", "method": m, "metric": k, "value": v, "seed": 0} for m, k, v in rows])
    with caplog.at_level("WARNING", logger="fm.eval"):
        flags = report_flags(df)
    assert len(flags) == 1 and "fm_finetune[m] destroys cell-type structure" in flags[0] and "0.070 vs 0.950" in flags[0]
    assert any("destroys" in r.getMessage() for r in caplog.records)


def test_spike_ins_are_dropped_unless_kept(tmp_path, pbmc_small):
    from fm.eval.context import EvalContext

    names = list(pbmc_small.var_names)
    names[:3] = ["ERCC-00002", "ERCC-00003", "ERCC-00004"]
    pbmc_small.var_names = names
    pbmc_small.write_h5ad(tmp_path / "spiked.h5ad")
    ctx = EvalContext(output_dir=tmp_path, profile="ci", models=[], data_dir=tmp_path, caps={})
    entry = {"name": "spiked", "file": str(tmp_path / "spiked.h5ad")}
    loaded = ctx.load_dataset(entry)
    assert loaded.n_vars == pbmc_small.n_vars - 3 and not any(loaded.var_names.str.startswith("ERCC-"))
    assert ctx.load_dataset({**entry, "keep_spike_ins": True}).n_vars == pbmc_small.n_vars


def test_recorded_command_names_the_subset(tmp_path, pbmc_small):
    pbmc_small.write_h5ad(tmp_path / "counts.h5ad")
    suite = _suite(tmp_path, "annotation", {"name": "small", "file": str(tmp_path / "counts.h5ad"),
                                            "label_key": "cell_type"}, ["majority", "logreg"])
    run_suite(suite, "ci", [], tmp_path / "out", methods=["majority"], datasets=["small"], seeds=[1])
    command = json.loads((tmp_path / "out" / "meta.json").read_text())["command"]
    assert "--methods majority" in command and "--datasets small" in command and "--seeds 1" in command
