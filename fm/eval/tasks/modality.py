"""Modality prediction, RNA → protein (CITE-seq): learn surface-protein levels from RNA on the
train cells, predict them on the test cells.

Targets: CLR-normalised protein counts, per cell (Seurat's CLR with margin 1 / muon's
`prot.pp.clr`): log1p(counts) minus the cell's mean log1p over all measured ADTs — the one
definition in fm.tasks.modality_prediction (`clr`, `CONTROL_RE`), shared with fine-tuning. Isotype
controls (names matching IgG/isotype/control) take part in the CLR mean, as they do in those
tools, but are never a target nor in any metric.

Every method sees the same cells, the same split (random, `split.test_size` 0.2 by default,
seeded, saved as an index file), the same log-normalised RNA (log1p counts/1e4) and the same genes
(HVGs chosen on the train cells). Methods:
  mean       — control: each protein's train mean for every test cell.
  ridge_pca  — RidgeCV (alphas 1e-2..1e4, chosen by leave-one-out on train) on RNA PCA
               (fit on train cells only, test projected).
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

import numpy as np

from fm.eval.context import EvalContext, dense, log_normalise, select_genes, timed
from fm.tasks.modality_prediction import CONTROL_RE, clr

log = logging.getLogger("fm.eval")

MAIN_METRIC = "pearson_protein"
HIGHER_IS_BETTER = True
CONTROLS = ["mean"]
DATASET_KEYS = {"protein_key", "protein_names_key", "n_hvg"}
METHODS = {"mean": None, "ridge_pca": None, "knn_pca": None, "totalvi": None, "fm_ridge": None, "fm_finetune": None}
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


def metrics(y_true: np.ndarray, y_pred: np.ndarray, names: list[str]) -> dict[str, float]:
    per_protein = _pearson_rows(y_true.T, y_pred.T)
    out = {"pearson_protein": float(per_protein.mean()),
           "pearson_cell": float(_pearson_rows(y_true, y_pred).mean()),
           "rmse": float(np.sqrt(np.mean((y_true - y_pred) ** 2)))}
    out.update({f"pearson:{n}": float(v) for n, v in zip(names, per_protein)})
    return out


# ---------------------------------------------------------------- methods
def _pca(xtr, xte, seed, ctx):
    from sklearn.decomposition import PCA

    n = min(int(ctx.cap("n_pcs", 50)), xtr.shape[1], xtr.shape[0] - 1)
    pca = PCA(n_components=n, random_state=seed).fit(xtr)
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
    scvi.settings.num_threads = int(ctx.cap("threads", 2))
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


def make_split(adata, dataset: dict, seed: int, ctx: EvalContext):
    from sklearn.model_selection import train_test_split

    spec = dataset.get("split") or {}
    if spec.get("kind", "random") != "random":
        raise ValueError(f"dataset {dataset['name']!r}: modality prediction supports split kind 'random' only")
    train, test = train_test_split(np.arange(adata.n_obs), test_size=spec.get("test_size", 0.2), random_state=seed)
    return ctx.save_split(f"{dataset['name']}_seed{seed}", np.sort(train), np.sort(test), obs_names=adata.obs_names)


def run(dataset: dict, methods: list[str], seed: int, ctx: EvalContext) -> list[dict]:
    adata = ctx.load_dataset(dataset)
    counts, names = protein_table(adata, dataset)
    target_cols = [i for i, n in enumerate(names) if not CONTROL_RE.search(n)]
    dropped = [names[i] for i in range(len(names)) if i not in target_cols]
    if dropped:
        log.info("modality %s: isotype controls %s excluded from targets and metrics", dataset["name"], dropped)
    target_names = [names[i] for i in target_cols]
    y = clr(counts)[:, target_cols]
    train, test = make_split(adata, dataset, seed, ctx)
    lognorm = log_normalise(adata)
    genes = select_genes(lognorm, dataset.get("n_hvg", ctx.cap("n_hvg", 2000)), cells=train)
    x = dense(lognorm.X[:, genes])
    pcs, pca_seconds = None, 0.0
    if any(m.endswith("_pca") for m in methods):
        with timed() as t_pca:
            pcs = _pca(x[train], x[test], seed, ctx)
        pca_seconds = t_pca.seconds
    rows = []
    for method in methods:
        if method not in METHODS:
            raise ValueError(f"modality prediction: unknown method {method!r}; known: {sorted(METHODS)}")
        runs = [(f"{method}[{ctx.model_label(m)}]", m) for m in ctx.models] if method.startswith("fm_") \
            else [(method, None)]
        for name, model_dir in runs:
            with timed() as t:
                if method == "fm_finetune":
                    pred = fm_finetune_predict(adata[:, genes], counts, names, train, test, target_names, model_dir,
                                               dataset["name"], seed, ctx)
                elif model_dir is not None:
                    emb = ctx.fm_embeddings(adata[:, genes], model_dir)
                    pred = _ridge(emb[train], y[train], emb[test], scale=True)
                elif method == "mean":
                    pred = np.broadcast_to(y[train].mean(axis=0), (len(test), y.shape[1]))
                elif method == "totalvi":
                    fg = totalvi_predict(adata, genes, counts, names, train, test, seed, ctx)
                    pred = clr(fg)[:, target_cols]
                else:
                    fit = _ridge if method == "ridge_pca" else (lambda a, b, c: _knn(a, b, c, ctx))
                    pred = fit(pcs[0], y[train], pcs[1])
            seconds = t.seconds + (pca_seconds if method.endswith("_pca") else 0.0)  # shared PCA counted for each
            values = metrics(y[test], np.asarray(pred), target_names)
            rows += [{"dataset": dataset["name"], "method": name, "metric": k, "value": v, "runtime_s": seconds}
                     for k, v in values.items()]
            log.info("modality %s %s seed %d: per-protein r %.3f, per-cell r %.3f, RMSE %.3f (%.1f s)", dataset["name"],
                     name, seed, values["pearson_protein"], values["pearson_cell"], values["rmse"], seconds)
    return rows
