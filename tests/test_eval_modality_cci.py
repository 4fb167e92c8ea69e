"""Modality prediction (RNA → protein) and cell–cell communication task modules: definitions on
tiny synthetic inputs, and the ci profiles of both suites end to end on the real data (skipped
when the shared data directory is absent). Controls must rank at the bottom, the best baseline
clearly above them."""
from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from fm.paths import DATA_DIR_ENV, data_dir

pytest.importorskip("sklearn", reason="needs the [eval] extra (scikit-learn)")
REPO = Path(__file__).resolve().parents[1]


def need(*files: str) -> None:
    for name in files:
        path = data_dir() / name
        if not path.is_file():
            pytest.skip(f"real data file {path} not found (set {DATA_DIR_ENV} to the shared data directory)")


# ---------------------------------------------------------------- modality: definitions
def _muon_clr(x: np.ndarray, axis: int) -> np.ndarray:
    """muon's dense branch, reimplemented from scverse/muon muon/_prot/preproc.py `clr`:
    np.log1p(x / np.exp(np.log1p(x).sum(axis=axis, keepdims=True) / x.shape[axis]))."""
    return np.log1p(x / np.exp(np.log1p(x).sum(axis=axis, keepdims=True) / x.shape[axis]))


def _seurat_clr(v: np.ndarray) -> np.ndarray:
    """Seurat NormalizeData CLR's custom_function, applied to one margin's vector:
    log1p(x / (exp(sum(log1p(x[x > 0]), na.rm = TRUE) / length(x))))."""
    return np.log1p(v / np.exp(np.log1p(v[v > 0]).sum() / len(v)))


def test_clr_is_seurat_margin2_and_muon_axis1():
    """Per cell: Seurat margin 2 (columns = cells of a features × cells matrix) = muon axis=1 on cells × proteins."""
    from fm.preprocessing import clr

    rng = np.random.default_rng(0)
    counts = np.vstack([[0, 9, 99], [5, 5, 5], [0, 0, 0], rng.poisson(20, 3)]).astype(float)
    out = clr(counts)
    np.testing.assert_allclose(out, _muon_clr(counts, axis=1), rtol=1e-12)
    np.testing.assert_allclose(out, np.stack([_seurat_clr(row) for row in counts]), rtol=1e-12)
    assert not np.allclose(out[:2], _muon_clr(counts, axis=0)[:2])  # not the per-protein default
    np.testing.assert_allclose(out[1], np.log1p(5 / 6))  # x / geometric mean of (1 + x): the pseudocount stays
    np.testing.assert_array_equal(out[2], 0.0)  # all-zero cell: defined
    assert (out >= 0).all()


def test_protein_table_names_and_isotype_control():
    from fm.eval.tasks.modality_prediction import CONTROL_RE, metrics, protein_table

    a = ad.AnnData(np.zeros((3, 2), dtype=np.float32))
    a.uns["eval_file"] = "synthetic"
    a.obsm["adt"] = pd.DataFrame([[1, 2, 0], [3, 4, 0], [5, 6, 1]], index=a.obs_names,
                                 columns=["CD3", "CD4-1", "IgG1_control_TotalSeqC"])
    counts, names = protein_table(a, {"name": "x", "protein_key": "adt"})
    assert names == ["CD3", "CD4-1", "IgG1_control_TotalSeqC"] and counts.shape == (3, 3)
    assert [n for n in names if CONTROL_RE.search(n)] == ["IgG1_control_TotalSeqC"]
    b = ad.AnnData(np.zeros((2, 2), dtype=np.float32), obsm={"p": np.ones((2, 2))}, uns={"protein_names": ["A", "B"]})
    b.uns["eval_file"] = "synthetic"
    assert protein_table(b, {"name": "y", "protein_key": "p"})[1] == ["A", "B"]
    with pytest.raises(ValueError, match="obsm has no 'missing'"):
        protein_table(b, {"name": "y", "protein_key": "missing"})
    y = np.array([[1.0, 2.0], [2.0, 1.0], [3.0, 0.5]])
    const = metrics(y, np.broadcast_to(y.mean(axis=0), y.shape), ["A", "B"])
    assert const["pearson_protein"] == 0.0  # a constant prediction carries no per-protein correlation
    assert metrics(y, y, ["A", "B"])["pearson_protein"] == pytest.approx(1.0)


# ---------------------------------------------------------------- cci: definitions
def test_spatial_truth_finds_planted_interaction():
    """Couples of touching cells (type 0 next to type 1, k=1 graph); in half of them the type-0 cell
    expresses L and the type-1 cell R. L→R from 0 to 1 is proximal and specific → true; 1→0 is not."""
    from fm.eval.tasks.cci import spatial_truth

    rng = np.random.default_rng(0)
    n = 100  # couples
    centres = rng.uniform(0, 10, size=(n, 2)) + np.arange(n)[:, None] * 100  # couples far apart
    coords = np.concatenate([centres, centres + 0.01])
    types = np.concatenate([np.zeros(n, int), np.ones(n, int)])
    on = np.zeros(n)
    on[: n // 2] = 1.0
    lig = np.concatenate([on, np.zeros(n)])[:, None]
    rec = np.concatenate([np.zeros(n), on])[:, None]
    truth = spatial_truth(lig, rec, types, coords, seed=0, k=1, n_perms=200, min_edges=10)
    # rows are s·T + t: 0→1 is row 1, 1→0 is row 2
    assert truth["n_edges"][1] == n and truth["testable"][1]
    assert truth["true"][1, 0] and truth["p_positions"][1, 0] < 0.05 and truth["p_labels"][1, 0] < 0.05
    assert not truth["true"][2, 0]


def test_complex_is_min_over_subunits():
    from fm.tasks.cci_scoring import complex_values

    x = np.array([[1.0, 3.0, 2.0], [0.0, 5.0, 4.0]], dtype=np.float32)
    np.testing.assert_allclose(complex_values(x, ["A", "B", "C"], ["A_B", "C", "B_C"]), [[1, 2, 2], [0, 4, 4]])


# ---------------------------------------------------------------- ci profiles end to end
def _ci(suite: str, tmp_path) -> pd.DataFrame:
    from fm.eval.harness import run_suite

    return run_suite(REPO / "eval" / suite, profile="ci", output_dir=tmp_path, write=False)


def _main(df: pd.DataFrame, metric: str) -> pd.Series:
    return df[df.metric == metric].groupby("method")["value"].mean()


def test_modality_ci_profile(tmp_path):
    pytest.importorskip("scanpy")
    need("h5ad/pbmc_10k_protein_v3.h5ad")
    df = _ci("modality_prediction.yaml", tmp_path)
    assert set(df.method) == {"mean", "ridge_pca", "knn_pca"}  # fm_ridge skipped without --model
    assert (tmp_path / "splits" / "pbmc10k_protein_200c_seed0.npz").is_file()
    main = _main(df, "pearson_protein")
    rmse = _main(df, "rmse")
    assert main["mean"] == 0.0 and main.idxmin() == "mean"
    assert main.max() > 0.5 and main.max() - main["mean"] > 0.3, main.to_dict()
    assert rmse.idxmax() == "mean" and rmse.min() < 0.8 * rmse["mean"], rmse.to_dict()
    assert not any(m.startswith("pearson:") and "igg" in m.lower() for m in df.metric)


def test_cci_ci_profile(tmp_path):
    pytest.importorskip("liana")
    need("h5ad/spatial_starmap_cortex_930c_labeled.h5ad", "lr/liana_omni_resource.csv")
    df = _ci("cci.yaml", tmp_path)
    truth = pd.read_csv(tmp_path / "cci_truth_starmap_cortex_seed0.csv")
    assert 0 < truth["true"].sum() < len(truth) and (truth["n_edges"] >= 10).all()
    auroc = _main(df, "auroc")
    assert set(auroc.index) == {"random", "expr_product", "cellphonedb", "rank_aggregate"}
    assert abs(auroc["random"] - 0.5) < 0.06 and auroc.idxmin() == "random", auroc.to_dict()
    assert auroc.max() - auroc["random"] > 0.1, auroc.to_dict()
    auprc = _main(df, "auprc")
    assert auprc.max() > 1.5 * truth["true"].mean(), (auprc.to_dict(), truth["true"].mean())


def test_near_empty_proteins_are_not_targets(tmp_path, citeseq_h5ad_path, caplog):
    from fm.eval.context import EvalContext
    from fm.eval.tasks.modality_prediction import prepare

    a = ad.read_h5ad(citeseq_h5ad_path)[:200].copy()
    proteins = a.obsm["protein_counts"].copy()
    first = proteins.columns[0]
    proteins[first] = 0
    proteins.iloc[:2, 0] = 1  # 2 counts over 200 cells, like CD223 in the 10x files
    a.obsm["protein_counts"] = proteins
    a.write_h5ad(tmp_path / "cite.h5ad")
    ctx = EvalContext(output_dir=tmp_path / "out", profile="ci", models=[], data_dir=tmp_path, caps={"n_hvg": 200})
    entry = {"name": "cite", "file": str(tmp_path / "cite.h5ad"), "protein_key": "protein_counts"}
    with caplog.at_level("WARNING", logger="fm.eval"):
        p = prepare(entry, 0, ctx)
    assert first not in p.target_names and p.y.shape[1] == len(p.target_names) >= 1
    assert any(first in r.getMessage() and "fewer than 10 cells" in r.getMessage() for r in caplog.records)
    assert first in prepare({**entry, "min_protein_cells": 1}, 0, ctx).target_names
