"""Batch correction: integrate cells from several batches, score the representation with scib-metrics.

Every method starts from the same log-normalised HVGs (batch-aware HVG selection) and returns an
embedding (cells × d). Scores come from scib_metrics.benchmark.Benchmarker with its default
metric sets (bio conservation: isolated labels, KMeans NMI/ARI, silhouette label, cLISI; batch
correction: BRAS, iLISI, kBET per label, graph connectivity, PCR comparison) and its scIB
weighting total = 0.6 bio + 0.4 batch, on raw (not min-max scaled) values so a method's score
does not depend on which other methods ran. Neighbours: exact sklearn kNN (small data; exact and
deterministic beats pynndescent here). Control: the unintegrated PCA.
FM rows: `fm` is the checkpoint's zero-shot embedding of the same cells × genes (raw counts);
`fm_finetune` fine-tunes the integration head (recipes/finetune/batch_correction.yaml +
caps.finetune) on all cells with their batch labels only, then embeds them with fm.integrate.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fm.eval.context import EvalContext, dense, select_genes, timed
from fm.preprocessing import log_normalise

log = logging.getLogger("fm.eval")

MAIN_METRIC = "total"
HIGHER_IS_BETTER = True
CONTROLS = ["unintegrated"]
DATASET_KEYS = {"n_hvg"}
REPORT_PLOTS = ("heatmap", "umap")
METRIC_GROUPS = {  # scib-metrics' metric types, our column names (its names lower-cased, "_" for " ")
    "bio_conservation": ("isolated_labels", "leiden_nmi", "leiden_ari", "kmeans_nmi", "kmeans_ari",
                         "silhouette_label", "clisi"),
    "batch_correction": ("silhouette_batch", "ilisi", "kbet", "bras", "graph_connectivity", "pcr_comparison"),
    "aggregate_score": ("bio_conservation", "batch_correction", "total"),
}
"""Column groups of the results heatmap (fm.eval.report.plot_metric_heatmap)."""
N_PCS = 50


@dataclass
class Prepared:
    """What every method of one dataset × seed sees."""

    name: str
    seed: int
    label_key: str
    batch_key: str
    cells: object  # AnnData view: raw counts × the selected genes (what FM methods get)
    obs: object  # DataFrame: label and batch columns as categories
    x: np.ndarray  # log-normalised cells × selected genes
    counts: object  # raw counts of the selected genes (scVI)
    genes: object  # their names
    pca: np.ndarray  # PCA of x: the unintegrated control and Harmony's input
    scib_exclude: tuple  # Benchmarker metrics switched off (caps.scib_exclude)
    embeddings_file: Path  # where finalize writes every method's embedding


def _pca(x: np.ndarray, seed: int) -> np.ndarray:
    from sklearn.decomposition import PCA

    return PCA(n_components=min(N_PCS, x.shape[0] - 1, x.shape[1]), random_state=seed).fit_transform(x)


def prepare(dataset: dict, seed: int, ctx: EvalContext) -> Prepared:
    label_key, batch_key = dataset.get("label_key"), dataset.get("batch_key")
    if not label_key or not batch_key:
        raise ValueError(f"dataset {dataset['name']!r}: batch_correction needs label_key and batch_key in the suite")
    adata = ctx.load_dataset(dataset, required_obs=["label_key", "batch_key"])
    if adata.obs[batch_key].nunique() < 2:
        raise ValueError(f"{adata.uns['eval_file']}: obs column {batch_key!r} has a single batch; nothing to correct")
    lognorm = log_normalise(adata)
    genes = select_genes(lognorm, dataset.get("n_hvg", ctx.cap("n_hvg", 2000)), batch_key=batch_key)
    ctx.save_indices(f"{dataset['name']}_genes", genes=genes)
    x = dense(lognorm.X[:, genes])
    return Prepared(name=dataset["name"], seed=seed, label_key=label_key, batch_key=batch_key, cells=adata[:, genes],
                    obs=adata.obs[[label_key, batch_key]].astype(str).astype("category"), x=x,
                    counts=adata.X[:, genes].copy(), genes=lognorm.var_names[genes], pca=_pca(x, seed),
                    scib_exclude=tuple(ctx.cap("scib_exclude", ())),
                    embeddings_file=ctx.output_dir / "embeddings" / f"{dataset['name']}_seed{seed}.npz")


# ---------------------------------------------------------------- methods (prepared → cells × d embedding)
def _unintegrated(p: Prepared, ctx):
    return p.pca


def _combat(p: Prepared, ctx):
    """scanpy's ComBat on the log-normalised HVGs, then the same PCA."""
    import anndata as ad
    import scanpy as sc

    a = ad.AnnData(p.x.copy(), obs=p.obs[[p.batch_key]].copy())
    sc.pp.combat(a, key=p.batch_key)
    return _pca(np.asarray(a.X, dtype=np.float32), p.seed)


def _harmony(p: Prepared, ctx):
    import harmonypy

    ho = harmonypy.run_harmony(p.pca, p.obs, [p.batch_key], random_state=p.seed, verbose=False)
    z = np.asarray(ho.Z_corr)
    return z if z.shape[0] == p.pca.shape[0] else z.T


def _scanorama(p: Prepared, ctx):
    """scanorama.integrate on the per-batch log-normalised HVGs; rows put back in the original order."""
    import scanorama

    np.random.seed(p.seed)
    batches = p.obs[p.batch_key].astype(str).to_numpy()
    groups = [np.flatnonzero(batches == b) for b in np.unique(batches)]
    genes = list(p.genes)
    integrated, _ = scanorama.integrate([p.x[g] for g in groups], [genes] * len(groups),
                                        dimred=min(N_PCS, min(len(g) for g in groups) - 1), verbose=0, seed=p.seed)
    out = np.zeros((p.x.shape[0], integrated[0].shape[1]), dtype=np.float32)
    for g, z in zip(groups, integrated):
        out[g] = z
    return out


def _scvi(p: Prepared, ctx):
    """scVI on the raw counts of the same HVGs, batch as covariate; epochs capped by the profile."""
    import anndata as ad
    import scvi

    scvi.settings.seed = p.seed
    scvi.settings.dl_num_workers = 0
    scvi.settings.num_threads = int(ctx.cap("threads", 1))  # 2 torch threads on 2 busy cores: ~10× slower
    a = ad.AnnData(p.counts.copy(), obs=p.obs[[p.batch_key]].copy())
    scvi.model.SCVI.setup_anndata(a, batch_key=p.batch_key)
    model = scvi.model.SCVI(a, n_latent=int(ctx.cap("scvi_latent", 10)))
    model.train(max_epochs=int(ctx.cap("scvi_epochs", 100)), accelerator="cpu", devices=1,
                enable_progress_bar=False, enable_model_summary=False, logger=False, enable_checkpointing=False)
    return np.asarray(model.get_latent_representation(), dtype=np.float32)


def _fm(p: Prepared, ctx, model_dir):
    """The checkpoint's zero-shot embedding of the same cells × genes."""
    return ctx.fm_embeddings(p.cells, model_dir)


def integrate_finetuned(adata, batch_key, model_dir, dataset, seed, ctx):
    """Fine-tune the integration head on ALL cells of the dataset (integration is unsupervised: the
    cells to integrate are the training data) with only obs[batch_key] kept — the cell-type labels
    never reach the fine-tuning, they only score it — then fm.integrate the same cells."""
    import fm

    cells = adata.copy()
    cells.obs = cells.obs[[batch_key]]
    model = ctx.fm_finetune(cells, model_dir, "batch_correction", dataset, seed,
                            **{"task.batch_key": batch_key, "data.val_fraction": 0.0})
    return np.nan_to_num(fm.integrate(cells, model, drop_empty=True))  # no vocabulary gene: zero vector


def _fm_finetune(p: Prepared, ctx, model_dir):
    return integrate_finetuned(p.cells, p.batch_key, model_dir, p.name, p.seed, ctx)


METHODS = {"unintegrated": _unintegrated, "combat": _combat, "harmony": _harmony, "scanorama": _scanorama,
           "scvi": _scvi, "fm": _fm, "fm_finetune": _fm_finetune}


# ---------------------------------------------------------------- scoring
def _neighbors(x: np.ndarray, k: int):
    """Exact kNN for scib-metrics (its NeighborsResults), excluding nothing: scib expects self included."""
    from scib_metrics.nearest_neighbors import NeighborsResults
    from sklearn.neighbors import NearestNeighbors

    dist, idx = NearestNeighbors(n_neighbors=min(k, x.shape[0] - 1)).fit(x).kneighbors(x)
    return NeighborsResults(indices=idx, distances=dist)


def scib_scores(embeddings: dict[str, np.ndarray], obs, label_key: str, batch_key: str, pre_key: str,
                exclude=()) -> dict:
    """scib-metrics Benchmarker over all embeddings at once → {method: {metric: value}}.

    `exclude` names Benchmarker metric fields to switch off (caps.scib_exclude). Measured on 2
    CPU cores, CellBench: kbet_per_label costs ~45 s CPU on first call (jax compiles per label
    size) and ~3 s per embedding after; every other metric is ≤ 3 s. The ci profile drops kBET.
    """
    from dataclasses import fields
    import anndata as ad
    from scib_metrics.benchmark import BatchCorrection, Benchmarker, BioConservation

    a = ad.AnnData(np.zeros((len(obs), 1), dtype=np.float32), obs=obs.copy())
    for name, emb in embeddings.items():
        a.obsm[name] = np.asarray(emb, dtype=np.float32)
    known = {f.name for f in fields(BioConservation)} | {f.name for f in fields(BatchCorrection)}
    if set(exclude) - known:
        raise ValueError(f"caps.scib_exclude: unknown metrics {sorted(set(exclude) - known)}; known: {sorted(known)}")
    bio = BioConservation(**{f.name: False for f in fields(BioConservation) if f.name in exclude})
    batch = BatchCorrection(**{f.name: False for f in fields(BatchCorrection) if f.name in exclude})
    bm = Benchmarker(a, batch_key=batch_key, label_key=label_key, embedding_obsm_keys=list(embeddings),
                     pre_integrated_embedding_obsm_key=pre_key, bio_conservation_metrics=bio,
                     batch_correction_metrics=batch, n_jobs=1, progress_bar=False)
    bm.prepare(neighbor_computer=_neighbors)
    bm.benchmark()
    res = bm.get_results(min_max_scale=False).drop(index="Metric Type")
    res.columns = [str(c).lower().replace(" ", "_") for c in res.columns]  # "KMeans ARI" → kmeans_ari
    return {m: {c: float(res.loc[m, c]) for c in res.columns} for m in embeddings}


def score(p: Prepared, embedding) -> dict[str, float]:
    """Nothing per embedding: scib-metrics scores all of them in one Benchmarker pass (finalize),
    which builds the shared neighbour graphs and jax kernels once instead of once per method."""
    return {}


def finalize(p: Prepared, outputs: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """scib-metrics of every method's embedding (aggregates first, then each metric); writes the
    embeddings, the unintegrated PCA always among them, to embeddings/<dataset>_seed<k>.npz for the
    UMAPs and re-scoring."""
    embeddings = {**outputs}
    embeddings.setdefault("unintegrated", p.pca)  # scib's PCR comparison needs the pre-integration PCA
    with timed() as t:
        scores = scib_scores(embeddings, p.obs, p.label_key, p.batch_key, pre_key="unintegrated",
                             exclude=p.scib_exclude)
    log.info("batch_correction %s: scib-metrics on %d embeddings in %.1f s", p.name, len(embeddings), t.seconds)
    p.embeddings_file.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(p.embeddings_file, label=p.obs[p.label_key].to_numpy().astype(str),
                        batch=p.obs[p.batch_key].to_numpy().astype(str),
                        **{f"emb:{k}": v for k, v in embeddings.items()})
    first = ["total", "bio_conservation", "batch_correction"]
    return {m: {k: scores[m][k] for k in first + [k for k in scores[m] if k not in first]} for m in outputs}
