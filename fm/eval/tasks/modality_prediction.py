"""Modality prediction, RNA → protein (CITE-seq): learn surface-protein levels from RNA on the
train cells, predict them on the test cells.

Targets: CLR-normalised protein counts, per cell (Seurat's CLR with margin = 2 / muon's
`prot.pp.clr(axis=1)`): log1p(counts / exp(mean log1p over all of the cell's ADTs)) — the one
definition in fm.preprocessing (`clr`; `CONTROL_RE` from fm.tasks.modality_prediction), shared with
fine-tuning. Isotype
controls (names matching IgG/isotype/control) take part in the CLR mean, as they do in those
tools, but are never a target nor in any metric.

Every method sees the same cells, the same split (random, `split.test_size` 0.2 by default,
seeded, saved as an index file), the same log-normalised RNA (log1p counts/1e4) and the same genes
(HVGs chosen on the train cells). Methods:
  mean       — control: each protein's train mean for every test cell.
  ridge_pca  — RidgeCV (alphas 1e-2..1e4, chosen by leave-one-out on train) on RNA PCA
               (fit on train cells only, test projected; each _pca method fits it, so its runtime
               counts it).
  knn_pca    — kNN regression (k = caps.knn_k, distance-weighted) on the same PCA.
  totalvi    — scvi-tools TOTALVI on the HVG counts of *all* cells with the test cells' proteins
               masked: test cells form their own batch whose protein counts are all zero, which
               totalVI treats as unmeasured (protein_batch_mask; the scvi-tools protein-imputation
               protocol). Test RNA is seen unsupervised, test protein never. Prediction: the
               protein foreground (no background) of the test cells as if from the train batch
               (transform_batch), then CLR like the targets. Epochs capped by caps.totalvi_epochs.
  fm_ridge   — the same RidgeCV on the zero-shot embedding of each --model (rows `fm_ridge[<model>]`).
  fm_finetune — the protein head (recipes/finetune/modality_prediction.yaml + caps.finetune) fine-tuned
               on the train cells only (their RNA counts of the same genes + their ADT counts), then
               fm.predict_protein on the test cells' RNA: test proteins are never seen.
Metrics: per-protein Pearson over test cells, averaged over proteins (main; a constant prediction
has no correlation and scores 0), per-cell Pearson across proteins averaged over test cells, and
RMSE over all test cell × protein CLR values.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from fm.eval.context import EvalContext, dense, select_genes
from fm.preprocessing import clr, log_normalise
from fm.tasks.modality_prediction import CONTROL_RE

log = logging.getLogger("fm.eval")

MAIN_METRIC = "pearson_protein"
HIGHER_IS_BETTER = True
CONTROLS = ["mean"]
DATASET_KEYS = {"protein_key", "protein_names_key", "n_hvg", "min_protein_cells"}
MIN_PROTEIN_CELLS = 10
"""A protein with a count in fewer cells than this is not a target (see prepare)."""
FINETUNE_KEY = "protein_counts"
"""obsm key of the train cells' ADT counts handed to the fine-tuning (a DataFrame with the suite's names)."""


def protein_table(adata, dataset: dict) -> tuple[np.ndarray, list[str]]:
    """Protein counts (cells × proteins) and their names, from obsm (DataFrame columns, or names in
    uns[protein_names_key], else uns['protein_names'])."""
    key = dataset.get("protein_key", "protein_expression")
    if key not in adata.obsm:
        raise ValueError(f"{adata.uns['eval_file']}: obsm has no {key!r} (protein_key of dataset "
                         f"{dataset['name']!r}); obsm keys: {list(adata.obsm)}")
    table = adata.obsm[key]
    if hasattr(table, "columns"):
        names, counts = [str(c) for c in table.columns], np.asarray(table.to_numpy(), dtype=np.float64)
    else:
        counts = dense(table).astype(np.float64)
        uns_key = dataset.get("protein_names_key", "protein_names")
        names = [str(n) for n in adata.uns[uns_key]] if uns_key in adata.uns else [f"protein_{i}" for i in
                                                                                  range(counts.shape[1])]
    if len(names) != counts.shape[1]:
        raise ValueError(f"{adata.uns['eval_file']}: {len(names)} protein names for {counts.shape[1]} columns")
    if counts.min() < 0:
        raise ValueError(f"{adata.uns['eval_file']}: obsm[{key!r}] has negative values; raw ADT counts expected")
    return counts, names


def _pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson per row; rows where either side is constant have no correlation → 0."""
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    den = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    num = (a * b).sum(axis=1)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 1e-12)


def make_split(adata, dataset: dict, seed: int, ctx: EvalContext):
    from sklearn.model_selection import train_test_split

    spec = dataset.get("split") or {}
    if spec.get("kind", "random") != "random":
        raise ValueError(f"dataset {dataset['name']!r}: modality prediction supports split kind 'random' only")
    train, test = train_test_split(np.arange(adata.n_obs), test_size=spec.get("test_size", 0.2), random_state=seed)
    return ctx.save_split(f"{dataset['name']}_seed{seed}", np.sort(train), np.sort(test), obs_names=adata.obs_names)


@dataclass
class Prepared:
    """What every method of one dataset × seed sees, and the test targets it is scored on."""

    name: str
    seed: int
    adata: object  # raw counts, all genes (totalVI subsets them itself)
    cells: object  # AnnData view: raw counts × the selected genes (what FM methods get)
    genes: np.ndarray  # positions of the selected genes
    x: np.ndarray  # log-normalised cells × selected genes
    protein_counts: np.ndarray  # cells × all ADTs, isotype controls included
    protein_names: list
    target_cols: list  # the ADTs that are targets (not isotype controls)
    target_names: list
    y: np.ndarray  # CLR targets, cells × target_cols
    train: np.ndarray
    test: np.ndarray


def prepare(dataset: dict, seed: int, ctx: EvalContext) -> Prepared:
    adata = ctx.load_dataset(dataset)
    counts, names = protein_table(adata, dataset)
    target_cols = [i for i, n in enumerate(names) if not CONTROL_RE.search(n)]
    dropped = [names[i] for i in range(len(names)) if i not in target_cols]
    if dropped:
        log.info("modality %s: isotype controls %s excluded from targets and metrics", dataset["name"], dropped)
    # A protein measured in almost no cell has a CLR that is just minus the cell's ADT depth term: every method
    # "predicts" it from depth (CD223, 2 counts in 500 cells: Pearson 0.64-0.71 for all). Not a target.
    min_cells = int(dataset.get("min_protein_cells", ctx.cap("min_protein_cells", MIN_PROTEIN_CELLS)))
    detected = (np.asarray(counts) > 0).sum(0)
    empty = [i for i in target_cols if detected[i] < min_cells]
    if empty:
        log.warning("modality %s: proteins %s are detected in fewer than %d cells (%s); excluded from targets and "
                    "metrics (dataset key min_protein_cells sets the minimum)", dataset["name"],
                    [names[i] for i in empty], min_cells, [int(detected[i]) for i in empty])
        target_cols = [i for i in target_cols if i not in empty]
    train, test = make_split(adata, dataset, seed, ctx)
    lognorm = log_normalise(adata)
    genes = select_genes(lognorm, dataset.get("n_hvg", ctx.cap("n_hvg", 2000)), cells=train)
    return Prepared(name=dataset["name"], seed=seed, adata=adata, cells=adata[:, genes], genes=genes,
                    x=dense(lognorm.X[:, genes]), protein_counts=counts, protein_names=names, target_cols=target_cols,
                    target_names=[names[i] for i in target_cols], y=clr(counts)[:, target_cols], train=train,
                    test=test)


def score(p: Prepared, pred) -> dict[str, float]:
    return metrics(p.y[p.test], np.asarray(pred), p.target_names)


def metrics(y_true: np.ndarray, y_pred: np.ndarray, names: list[str]) -> dict[str, float]:
    per_protein = _pearson_rows(y_true.T, y_pred.T)
    out = {"pearson_protein": float(per_protein.mean()),
           "pearson_cell": float(_pearson_rows(y_true, y_pred).mean()),
           "rmse": float(np.sqrt(np.mean((y_true - y_pred) ** 2)))}
    out.update({f"pearson:{n}": float(v) for n, v in zip(names, per_protein)})
    return out


# ---------------------------------------------------------------- methods
def _pcs(p, ctx):
    """RNA PCA fitted on the train cells, test cells projected."""
    from sklearn.decomposition import PCA

    xtr, xte = p.x[p.train], p.x[p.test]
    n = min(int(ctx.cap("n_pcs", 50)), xtr.shape[1], xtr.shape[0] - 1)
    pca = PCA(n_components=n, random_state=p.seed).fit(xtr)
    return pca.transform(xtr), pca.transform(xte)


def _ridge(ztr, ytr, zte, scale=False):
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    steps = [StandardScaler()] if scale else []
    return make_pipeline(*steps, RidgeCV(alphas=np.logspace(-2, 4, 13))).fit(ztr, ytr).predict(zte)


def _knn(ztr, ytr, zte, ctx):
    from sklearn.neighbors import KNeighborsRegressor

    k = min(int(ctx.cap("knn_k", 15)), len(ztr))
    return KNeighborsRegressor(n_neighbors=k, weights="distance").fit(ztr, ytr).predict(zte)


def totalvi_predict(adata, genes, protein_counts, protein_names, train, test, seed, ctx) -> np.ndarray:
    """Protein foreground of the test cells (counts scale) from totalVI trained with their proteins masked."""
    import anndata as ad
    import pandas as pd
    import scvi

    scvi.settings.seed = seed
    scvi.settings.num_threads = int(ctx.cap("threads", 1))  # as every method: 2 threads on 2 busy cores ~9x slower
    sub = ad.AnnData(X=adata.X[:, genes].copy(), obs=pd.DataFrame(index=adata.obs_names.copy()))
    sub.var_names = adata.var_names[genes]
    masked = protein_counts.astype(np.float32).copy()
    masked[test] = 0.0
    batch = np.array(["train"] * adata.n_obs, dtype=object)
    batch[test] = "test"
    sub.obs["split_batch"] = pd.Categorical(batch, categories=["train", "test"])
    sub.obsm["protein_counts"] = pd.DataFrame(masked, index=sub.obs_names, columns=protein_names)
    scvi.model.TOTALVI.setup_anndata(sub, protein_expression_obsm_key="protein_counts", batch_key="split_batch")
    model = scvi.model.TOTALVI(sub, n_latent=int(ctx.cap("totalvi_n_latent", 20)))
    model.train(max_epochs=int(ctx.cap("totalvi_epochs", 100)), accelerator="cpu", devices=1,
                batch_size=int(ctx.cap("totalvi_batch_size", 128)), early_stopping=False,
                enable_progress_bar=False, enable_model_summary=False)
    _, proteins = model.get_normalized_expression(indices=test, transform_batch="train", n_samples=1,
                                                  include_protein_background=False, return_numpy=True)
    return np.asarray(proteins, dtype=np.float64)


def fm_finetune_predict(adata, counts, names, train, test, target_names, model_dir, dataset, seed, ctx):
    """CLR predictions (test cells × target_names) of the protein head fine-tuned on the train cells.

    The fine-tuning AnnData holds the train cells only, with their ADT counts as a named DataFrame
    (so array-stored panels keep their names); the test AnnData holds RNA only."""
    import anndata as ad
    import pandas as pd

    import fm

    def cells(rows, obsm):
        return ad.AnnData(X=adata.X[rows], obs=pd.DataFrame(index=adata.obs_names[rows]), var=adata.var.copy(),
                          obsm=obsm)

    reference = cells(train, {FINETUNE_KEY: pd.DataFrame(counts[train], index=adata.obs_names[train], columns=names)})
    model = ctx.fm_finetune(reference, model_dir, "modality_prediction", dataset, seed,
                            **{"task.protein_key": FINETUNE_KEY})
    return fm.predict_protein(cells(test, {}), model)[target_names].to_numpy(dtype=np.float64)


def _mean(p: Prepared, ctx):
    """Control: each protein's train mean for every test cell."""
    return np.broadcast_to(p.y[p.train].mean(axis=0), (len(p.test), p.y.shape[1]))


def _ridge_pca(p: Prepared, ctx):
    ztr, zte = _pcs(p, ctx)
    return _ridge(ztr, p.y[p.train], zte)


def _knn_pca(p: Prepared, ctx):
    ztr, zte = _pcs(p, ctx)
    return _knn(ztr, p.y[p.train], zte, ctx)


def _totalvi(p: Prepared, ctx):
    fg = totalvi_predict(p.adata, p.genes, p.protein_counts, p.protein_names, p.train, p.test, p.seed, ctx)
    return clr(fg)[:, p.target_cols]


def _fm_ridge(p: Prepared, ctx, model_dir):
    emb = ctx.fm_embeddings(p.cells, model_dir)
    return _ridge(emb[p.train], p.y[p.train], emb[p.test], scale=True)


def _fm_finetune(p: Prepared, ctx, model_dir):
    return fm_finetune_predict(p.cells, p.protein_counts, p.protein_names, p.train, p.test, p.target_names, model_dir,
                               p.name, p.seed, ctx)


METHODS = {"mean": _mean, "ridge_pca": _ridge_pca, "knn_pca": _knn_pca, "totalvi": _totalvi, "fm_ridge": _fm_ridge,
           "fm_finetune": _fm_finetune}
