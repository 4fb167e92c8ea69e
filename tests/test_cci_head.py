"""Cell–cell interaction (issue #6): the niche head ScFMForCCI, `fm finetune` of the cci
recipe, fm.interactions (denoised and niche variants), bad input, and the harness's fm rows.

Data: the first 200 cells of small_h5ad_path (real PBMC when the shared data is there, else the
generated stand-in; human genes, as the tiny model's vocabulary) placed at seeded random positions —
a spatial AnnData in shape, not a biological one. Their number of cell types (8 in PBMC's first 200)
sets the niche-composition width and the number of sender × receiver pairs."""
from __future__ import annotations

import json
import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
import transformers

import fm
from fm.cli import main
from fm.config import load_config
from fm.heads.cci import ScFMForCCI
from fm.paths import recipe_path
from fm.pretrain import export_pretrained
from fm.tasks.cci import load_niche_cells, niche_graph, run as run_cci
from fm.tasks.cci_scoring import complex_values, load_resource
from fm.tasks.common import collator_kwargs, load_head
from fm.data import LabeledCellCollator
from fm.tokenizer import CellTokenizer

RECIPE = "finetune/cci"
PAIRS = pd.DataFrame({"ligand": ["B2M", "IL1B", "ANXA1", "TGFB1", "GRN"],
                      "receptor": ["KLRC1", "IL1R2_IL1RAP", "FPR1", "ITGB3", "TNFRSF1A"]})


@pytest.fixture()
def spatial(pbmc_small) -> ad.AnnData:
    a = pbmc_small
    a.obs["celltype"] = a.obs["cell_type"].astype(str)
    a.obsm["spatial"] = np.random.default_rng(0).uniform(0, 100, size=(a.n_obs, 2))
    return a


def _overrides(init, out, path=None, steps=4):
    items = [f"model.init_from={init}", f"train.output_dir={out}", f"train.max_steps={steps}", "train.batch_size=16",
             "train.progress=false", "train.save_every=0", "train.eval_every=0", "train.warmup_steps=1",
             "train.log_every=1", "data.max_genes=64", "task.n_neighbors=4"]
    return items + ([f"data.paths=[{path}]"] if path else [])


def _niche_model(tiny_model_dir, spatial, tmp_path):
    cfg = load_config(recipe_path(RECIPE), _overrides(tiny_model_dir, tmp_path / "run"))
    tokenizer = CellTokenizer.from_pretrained(tiny_model_dir)
    data, types, genes = load_niche_cells([(spatial, "spatial")], tokenizer, "celltype", "spatial", 4)
    model = load_head(ScFMForCCI, cfg, num_labels=len(types), id2label=dict(enumerate(types)),
                      label2id={t: i for i, t in enumerate(types)}, niche_genes=genes, label_key="celltype",
                      spatial_key="spatial", n_neighbors=4)
    collator = LabeledCellCollator(**collator_kwargs(model, cfg), targets={
        "type": "receiver_types", "composition": "niche_composition", "expression": "labels"})
    return model, collator([data[i] for i in range(32)]), data, tokenizer


def test_niche_head_shapes_and_loss_goes_down(tiny_model_dir, spatial, tmp_path):
    model, batch, data, tokenizer = _niche_model(tiny_model_dir, spatial, tmp_path)
    n_genes, n_types = spatial.n_vars, spatial.obs["celltype"].nunique()
    assert batch["labels"].shape == (32, n_genes) and batch["niche_composition"].shape == (32, n_types)
    torch.testing.assert_close(batch["niche_composition"].sum(1), torch.ones(32))
    # the niche of a receiver is the sum of its 4 neighbours' counts (never its own), vocabulary genes only
    neighbors = niche_graph(spatial.obsm["spatial"], 4)
    known = tokenizer.match_genes(spatial).vocab_ids >= 0
    assert 0 not in neighbors[0]
    assert data.cells.counts[: data.cells.indptr[1]].sum() == spatial.X[neighbors[0]][:, known].sum()
    out = model(**batch)
    assert out.predictions.shape == (32, n_genes) and out.niche_embedding.shape == (32, model.config.d_model)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(8):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.02, losses


def test_save_load_same_predictions(tiny_model_dir, spatial, tmp_path):
    model, batch, _, tokenizer = _niche_model(tiny_model_dir, spatial, tmp_path)
    model.eval()
    export_pretrained(tokenizer)(model, model.state_dict(), tmp_path / "export")
    loaded = fm.load(tmp_path / "export")
    assert isinstance(loaded, ScFMForCCI) and loaded.config.niche_genes == list(spatial.var_names)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).predictions, model(**batch).predictions)


@pytest.fixture(scope="module")
def niche_dir(tiny_model_dir, small_h5ad_path, tmp_path_factory):
    """`fm finetune recipes/finetune/cci.yaml` (shrunk) on a spatial h5ad file."""
    a = ad.read_h5ad(small_h5ad_path)[:200].copy()
    a.obs["celltype"] = a.obs["cell_type"].astype(str)
    a.obsm["spatial"] = np.random.default_rng(0).uniform(0, 100, size=(a.n_obs, 2))
    out = tmp_path_factory.mktemp("cci")
    a.write_h5ad(out / "spatial.h5ad")
    assert main(["finetune", RECIPE, *_overrides(tiny_model_dir, out / "run", out / "spatial.h5ad")]) == 0
    return out / "run" / "model"


def test_finetune_cli_exports_niche_model(niche_dir):
    config = json.loads((niche_dir / "config.json").read_text())
    types = sorted(set(ad.read_h5ad(niche_dir.parents[1] / "spatial.h5ad").obs["celltype"]))
    assert config["architectures"] == ["ScFMForCCI"] and config["spatial_key"] == "spatial"
    assert config["n_neighbors"] == 4 and config["label_key"] == "celltype"
    assert len(config["id2label"]) == len(types) and sorted(config["id2label"].values()) == types
    log = pd.read_csv(niche_dir.parent / "train_log.csv")
    assert len(log) == 4 and np.isfinite(log["loss"]).all()


def test_interactions_denoised_fields_x_untouched(tiny_model_dir, spatial):
    model = fm.load(tiny_model_dir)
    x = spatial.X.copy()
    frame = fm.interactions(spatial, model, groupby="celltype", resource=PAIRS, n_perms=20, seed=1)
    assert (spatial.X != x).nnz == 0 and spatial.uns["fm_interactions"] is frame
    assert {"source", "target", "ligand_complex", "receptor_complex", "ligand_means", "receptor_means", "score",
            "pvalue", "rank"} <= set(frame.columns)
    n_types = spatial.obs["celltype"].nunique()
    assert len(frame) == n_types * n_types * 5 and frame["rank"].tolist() == list(range(1, len(frame) + 1))
    assert frame["pvalue"].between(1 / 21, 1).all() and (frame["score"] >= 0).all()
    assert frame["pvalue"].is_monotonic_increasing
    np.testing.assert_allclose(frame["score"], frame["ligand_means"] * frame["receptor_means"], rtol=1e-5)
    assert "IL1R2_IL1RAP" in set(frame["receptor_complex"])
    again = fm.interactions(spatial.copy(), model, groupby="celltype", resource=PAIRS, n_perms=20, seed=1)
    pd.testing.assert_frame_equal(frame, again)


def test_complex_is_min_over_subunits():
    values = np.array([[1.0, 3.0, 2.0], [0.0, 5.0, 4.0]])
    np.testing.assert_allclose(complex_values(values, ["A", "B", "C"], ["A_B", "C", "B_C"]), [[1, 2, 2], [0, 4, 4]])


def test_interactions_niche_variant(niche_dir, spatial):
    model = fm.load(niche_dir)
    frame = fm.interactions(spatial, model, groupby="celltype", resource=PAIRS, n_perms=10, key_added="niche")
    assert "niche_effect" in frame and spatial.uns["niche"] is frame and np.isfinite(frame["niche_effect"]).all()
    assert frame["rank"].tolist() == list(range(1, len(frame) + 1)) and frame["pvalue"].is_monotonic_increasing
    assert (frame["score"] >= 0).all() and len(frame) > 0


# ----------------------------------------------------------------------------- bad input
def test_niche_needs_spatial_coordinates(niche_dir, spatial, tiny_model_dir, tmp_path):
    del spatial.obsm["spatial"]
    spatial.obsm["X_umap"] = np.zeros((spatial.n_obs, 2))
    with pytest.raises(KeyError, match=r"obsm has no 'spatial'.*X_umap"):
        fm.interactions(spatial, fm.load(niche_dir), groupby="celltype", resource=PAIRS)
    cfg = load_config(recipe_path(RECIPE), _overrides(tiny_model_dir, tmp_path / "run"))
    with pytest.raises(KeyError, match=r"adata\[0\]: obsm has no 'spatial'"):
        run_cci(cfg, adatas=spatial)


def test_resource_genes_absent(tiny_model_dir, spatial, caplog):
    model = fm.load(tiny_model_dir)
    with caplog.at_level(logging.WARNING, logger="fm"):
        frame = fm.interactions(spatial, model, groupby="celltype", n_perms=2,
                                resource=pd.concat([PAIRS, pd.DataFrame({"ligand": ["Notagene"], "receptor": ["B2M"]})]))
    assert "5 of 6 ligand–receptor pairs kept" in caplog.text and "Notagene" not in set(frame["ligand_complex"])
    mouse = pd.DataFrame({"ligand": ["Dll1", "Nrg2"], "receptor": ["Notch1", "Erbb2_Erbb3"]})
    with pytest.raises(ValueError, match="none of the 2 ligand–receptor pairs.*mouseconsensus"):
        fm.interactions(spatial, model, groupby="celltype", resource=mouse)
    with pytest.raises(ValueError, match="'ligand' and 'receptor'"):
        load_resource(pd.DataFrame({"a": ["x"], "b": ["y"]}))


def _shared_resource_table():
    """The shared OmniPath table (<data dir>/lr/liana_omni_resource.csv), or skip naming its path."""
    from fm.paths import data_dir
    from fm.tasks.cci_scoring import RESOURCE_FILE

    if not (data_dir() / RESOURCE_FILE).is_file():
        pytest.skip(f"shared ligand–receptor table {data_dir() / RESOURCE_FILE} not found (set FM_DATA_DIR)")


def test_unknown_resource_name_lists_the_available_ones():
    _shared_resource_table()
    with pytest.raises(ValueError, match="not in .*available: .*mouseconsensus"):
        load_resource("mouse")


def test_liana_resource_frames_are_accepted():
    """LIANA's bundled resources (offline) and the shared OmniPath table give the same pairs."""
    li = pytest.importorskip("liana")
    _shared_resource_table()
    ours = load_resource("mouseconsensus")
    pd.testing.assert_frame_equal(load_resource(li.resource.select_resource("mouseconsensus")), ours)


def test_bad_groups(tiny_model_dir, spatial):
    model = fm.load(tiny_model_dir)
    with pytest.raises(KeyError, match=r"no obs column 'cluster'.*celltype"):
        fm.interactions(spatial, model, groupby="cluster", resource=PAIRS)
    spatial.obs.loc[spatial.obs_names[0], "celltype"] = "Lonely"
    with pytest.raises(ValueError, match=r"fewer than 2 cells: \{'Lonely': 1\}"):
        fm.interactions(spatial, model, groupby="celltype", resource=PAIRS)
    assert "fm_interactions" not in spatial.uns
    with pytest.raises(ValueError, match="cannot give denoised expression"):  # a bare backbone has no decoder
        fm.interactions(spatial, transformers.AutoModel.from_pretrained(tiny_model_dir), groupby="cell_type")


def test_harness_fm_rows(niche_dir, tiny_model_dir, spatial, tmp_path):
    """The cci task's fm methods on a spatial split: fm_niche fine-tunes on the train region only."""
    from fm.eval.context import EvalContext
    from fm.eval.harness import run_task
    from fm.eval.tasks import cci

    (tmp_path / "h5ad").mkdir()
    (tmp_path / "lr").mkdir()
    spatial.write_h5ad(tmp_path / "h5ad" / "toy.h5ad")
    PAIRS.rename(columns={"ligand": "source_genesymbol", "receptor": "target_genesymbol"}).assign(
        resource="toy").to_csv(tmp_path / "lr" / "liana_omni_resource.csv", index=False)
    ctx = EvalContext(output_dir=tmp_path / "out", profile="ci", models=[tiny_model_dir], data_dir=tmp_path,
                      caps={"fm_n_perms": 5, "truth_n_perms": 5, "finetune": {
                          "train.max_steps": 2, "train.batch_size": 16, "data.max_genes": 32, "data.val_fraction": 0.0}})
    dataset = {"name": "toy", "file": "h5ad/toy.h5ad", "label_key": "celltype", "spatial_key": "spatial",
               "resource": "toy", "n_neighbors": 4, "min_edges": 2, "split": {"kind": "spatial", "axis": 0}}
    rows = pd.DataFrame(run_task(cci, dataset, ["random", "fm_denoised", "fm_niche"], 0, ctx))
    label = ctx.model_label(tiny_model_dir)
    assert {f"fm_denoised[{label}]", f"fm_niche[{label}]", "random",  # + random-init twins, named by what ran
            f"fm_denoised[{label}:random_init]", f"fm_niche[{label}:scratch]"} == set(rows["method"])
    assert "auroc_niche_effect" in set(rows[rows.method == f"fm_niche[{label}]"]["metric"])
    split = np.load(tmp_path / "out" / "splits" / "toy_spatial.npz")
    assert len(split["train"]) == len(split["test"]) == 100
    tuned = fm.load(next((tmp_path / "out" / "finetune").iterdir()) / "model")
    assert isinstance(tuned, ScFMForCCI)
