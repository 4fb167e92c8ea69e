"""Imputation / denoising, scored three ways on the same cells and genes.

1. Masked entries: hold out a fraction of the nonzero counts (set to 0 in the input), impute,
   compare imputed vs true values at those entries on the log-normalised scale (Pearson, MSE).
   The truth is log1p(true counts / true library size · 1e4); methods see the masked counts.
2. Molecular cross-validation (Batson, Royer & Webber 2019): split every count binomially,
   X' ~ Binomial(X, p), X'' = X − X'; impute from X', compare with X'' — both log-normalised
   to 1e4 per cell so the depth difference cancels — MSE over all entries. Caveat (the paper's):
   on the log scale E[log1p(noisy)] < log1p(E[·]), so this favours methods that average log
   values (kNN smoothing, MAGIC) over ones that estimate expected expression (scVI) or restore
   nonzero-level values (ALRA). On the linear normalised scale (expm1 of both; tried) the loss
   is dominated by a few highly expressed genes and no imputation ranks first on pbmc3k.
3. Clustering: ARI of Leiden (on a kNN graph of the imputed data's PCA) and of KMeans (k = number
   of cell types) against cell_type, computed on the masked-input run (saves a third imputation).

Every method maps log-normalised input (cells × genes) to an imputed matrix on the same scale.
Control: no imputation (the input itself).

fm_finetune (once per --model) fine-tunes the imputation head (recipes/finetune/imputation.yaml +
caps.finetune) on exactly the counts the other methods get as input — the masked counts for
scores 1 and 3, the MCV train half for score 2, one fine-tune each (neither may see the other's
held-out counts) — then fm.impute's those cells on the log1p scale. Its library size is the input
cells' total over the suite's genes, as lognorm() here uses, so outputs are on the harness's scale;
genes outside the model's vocabulary keep their input value. No zero-shot FM row: the pretraining
MVC decoder predicts per-cell expression-bin ranks, not normalised expression.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fm.eval.context import EvalContext, dense, select_genes, torch_threads
from fm.preprocessing import TARGET_SUM, log_normalise

MAIN_METRIC = "mcv_mse"
HIGHER_IS_BETTER = False
CONTROLS = ["none"]
DATASET_KEYS = {"n_hvg", "mask_fraction", "mcv_p"}


def lognorm(counts: np.ndarray) -> np.ndarray:
    """The same normalisation as fm.preprocessing.log_normalise, on a dense matrix (cells with 0 counts stay 0)."""
    lib = counts.sum(1, keepdims=True)
    return np.log1p(counts / np.maximum(lib, 1) * TARGET_SUM).astype(np.float32)


def _pca(x, seed, n=50):
    from sklearn.decomposition import PCA

    return PCA(n_components=min(n, x.shape[0] - 1, x.shape[1]), random_state=seed).fit_transform(x)


@dataclass
class Prepared:
    """What every method of one dataset × seed sees, and the held-out truth it is scored on."""

    name: str
    seed: int
    var_names: np.ndarray  # the selected genes
    masked: np.ndarray  # counts with the held-out entries set to 0 (input of scores 1 and 3)
    x_masked: np.ndarray  # … log-normalised
    train_counts: np.ndarray  # MCV train half (input of score 2)
    x_train: np.ndarray  # … log-normalised
    x_test: np.ndarray  # MCV test half, log-normalised: score 2's truth
    truth: np.ndarray  # log-normalised full counts: score 1's truth at (rows, cols)
    rows: np.ndarray
    cols: np.ndarray
    labels: np.ndarray | None  # cell types for score 3 (None: no label_key)


def prepare(dataset: dict, seed: int, ctx: EvalContext) -> Prepared:
    label_key = dataset.get("label_key")
    adata = ctx.load_dataset(dataset, required_obs=["label_key"] if label_key else [])
    genes = select_genes(log_normalise(adata), dataset.get("n_hvg", ctx.cap("n_hvg", 2000)))
    counts = dense(adata.X[:, genes])
    rng = np.random.default_rng(seed)
    # 1. masked nonzero entries (index file: flat positions into cells × selected genes)
    nz = np.flatnonzero(counts.ravel() > 0)
    frac = dataset.get("mask_fraction", ctx.cap("mask_fraction", 0.1))
    held = np.sort(rng.choice(nz, size=int(frac * len(nz)), replace=False))
    # 2. MCV binomial split; stored as the train-half counts so the split is exactly reproducible
    p = dataset.get("mcv_p", ctx.cap("mcv_p", 0.5))
    train_counts = rng.binomial(counts.astype(np.int64), p)
    saved = ctx.save_indices(f"{dataset['name']}_seed{seed}", obs_names=adata.obs_names, held_out=held,
                             genes=genes, mcv_train_counts=train_counts.ravel())
    held, train_counts = saved["held_out"], saved["mcv_train_counts"].reshape(counts.shape).astype(np.float32)
    rows, cols = np.unravel_index(held, counts.shape)
    masked = counts.copy()
    masked[rows, cols] = 0
    return Prepared(name=dataset["name"], seed=seed, var_names=adata.var_names[genes].to_numpy(), masked=masked,
                    x_masked=lognorm(masked), train_counts=train_counts, x_train=lognorm(train_counts),
                    x_test=lognorm(counts - train_counts), truth=lognorm(counts), rows=rows, cols=cols,
                    labels=adata.obs[label_key].astype(str).to_numpy() if label_key else None)


# ---------------------------------------------------------------- imputations (x, counts, seed, ctx) → imputed x
def _none(x, counts, seed, ctx):
    return x


def _knn_smooth(x, counts, seed, ctx):
    """Average of each cell's k nearest neighbours (itself included) in PCA space of the log data."""
    from sklearn.neighbors import NearestNeighbors

    k = int(ctx.cap("knn_k", 15))
    _, idx = NearestNeighbors(n_neighbors=k).fit(pc := _pca(x, seed)).kneighbors(pc)
    return x[idx].mean(axis=1)


def _magic(x, counts, seed, ctx):
    """MAGIC (magic-impute) with its defaults on the log-normalised data."""
    import magic

    op = magic.MAGIC(random_state=seed, n_jobs=1, verbose=0, n_pca=min(100, x.shape[1], x.shape[0] - 1))
    return np.asarray(op.fit_transform(x), dtype=np.float32)


def alra(a_norm: np.ndarray, k: int | None = None, q: int = 10, quantile_prob: float = 0.001, seed: int = 0,
         k_max: int = 100, thresh: float = 6.0, noise_start: int = 80) -> np.ndarray:
    """ALRA (Linderman et al., Nat Commun 2022; reference R code KlugerLab/ALRA, alra.R).

    There is no maintained Python package of ALRA, so this follows the reference code step by
    step: rank-k randomized SVD of the log-normalised matrix; per gene, zero the entries below
    |quantile_prob quantile| (the symmetric-noise threshold); rescale each gene's surviving
    values to the mean/sd of its original nonzeros; keep negatives at 0; restore original
    nonzeros the approximation zeroed. k from `choose_k`: the largest gap in the spectrum more
    than `thresh` sd above the noise gaps (from singular value `noise_start` on).
    """
    from sklearn.utils.extmath import randomized_svd

    if k is None:
        k = choose_k(a_norm, k_max=min(k_max, min(a_norm.shape) - 1), thresh=thresh,
                     noise_start=min(noise_start, min(a_norm.shape) - 21), seed=seed)
    u, s, vt = randomized_svd(a_norm, n_components=k, n_iter=q, random_state=seed)
    low = (u * s) @ vt
    mins = np.abs(np.quantile(low, quantile_prob, axis=0))  # R quantile type 7 == numpy linear
    cor = np.where(low <= mins[None, :], 0.0, low)

    def nz_stats(m):
        nz = m != 0
        cnt = nz.sum(0)
        mu = np.where(cnt > 0, m.sum(0) / np.maximum(cnt, 1), np.nan)
        ss = np.where(nz, (m - mu[None, :]) ** 2, 0).sum(0)
        sd = np.where(cnt > 1, np.sqrt(ss / np.maximum(cnt - 1, 1)), np.nan)  # R sd: n − 1
        return mu, sd

    mu1, sigma1 = nz_stats(cor)
    mu2, sigma2 = nz_stats(a_norm)
    toscale = ~np.isnan(sigma1) & ~np.isnan(sigma2) & ~((sigma1 == 0) & (sigma2 == 0)) & ~(sigma1 == 0)
    out = cor.copy()
    ratio = np.divide(sigma2, sigma1, out=np.zeros_like(sigma2), where=toscale)
    shift = mu2 - mu1 * ratio
    out[:, toscale] = cor[:, toscale] * ratio[toscale] + shift[toscale]
    out[cor == 0] = 0
    out[out < 0] = 0
    restore = (a_norm > 0) & (out == 0)
    out[restore] = a_norm[restore]
    return out.astype(np.float32)


def choose_k(a_norm, k_max=100, thresh=6.0, noise_start=80, q=2, seed=0) -> int:
    """ALRA's rank choice. The R code's `diffs[noise_start-1:length(diffs)]` parses as a negative
    index range; we use what it intends, the gaps from noise_start on, for mean and sd alike."""
    from sklearn.utils.extmath import randomized_svd

    _, d, _ = randomized_svd(a_norm, n_components=k_max, n_iter=q, random_state=seed)
    diffs = d[:-1] - d[1:]
    noise = diffs[noise_start - 1:]
    z = (diffs - noise.mean()) / max(noise.std(ddof=1), 1e-12)
    above = np.flatnonzero(z > thresh)
    return int(above.max() + 1) if len(above) else 1


def _alra(x, counts, seed, ctx):
    return alra(x, seed=seed, k_max=int(ctx.cap("alra_k_max", 100)))


def _scvi(x, counts, seed, ctx):
    """scVI's denoised expression (normalised to 1e4, log1p) from the input counts; epochs capped."""
    import anndata as ad
    import scvi

    scvi.settings.seed = seed
    scvi.settings.dl_num_workers = 0
    scvi.settings.num_threads = int(ctx.cap("threads", 1))  # 2 torch threads on 2 busy cores: ~10× slower
    a = ad.AnnData(counts.astype(np.float32))
    scvi.model.SCVI.setup_anndata(a)
    model = scvi.model.SCVI(a, n_latent=int(ctx.cap("scvi_latent", 10)))
    model.train(max_epochs=int(ctx.cap("scvi_epochs", 100)), accelerator="cpu", devices=1,
                enable_progress_bar=False, enable_model_summary=False, logger=False, enable_checkpointing=False)
    rate = model.get_normalized_expression(library_size=TARGET_SUM, return_numpy=True)
    return np.log1p(np.asarray(rate, dtype=np.float32))


def _fm_impute(x, counts, seed, ctx, model_dir, dataset, genes, part):
    """Fine-tune on these input counts only (cells with no input counts keep their zero input), then
    impute them. Torch runs on caps.threads threads (context.torch_threads)."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    import fm

    cells = np.flatnonzero(counts.sum(1) > 0)
    a = ad.AnnData(sp.csr_matrix(counts[cells]), var=pd.DataFrame(index=pd.Index(genes, dtype=str)))
    with torch_threads(ctx.cap("threads", 1)):
        model = ctx.fm_finetune(a, model_dir, "imputation", f"{dataset}_{part}", seed, **{"task.target_scale": "log1p"})
        out = x.copy()
        out[cells] = fm.impute(a, model, scale="log1p")
    return out


# ---------------------------------------------------------------- methods: prepared → (imputed masked, imputed MCV)
def _on_both_inputs(impute):
    """A method from an imputation function (x, counts, seed, ctx) → imputed x: run on the masked
    input and on the MCV train half, the two inputs every method sees."""

    def method(p: Prepared, ctx):
        return impute(p.x_masked, p.masked, p.seed, ctx), impute(p.x_train, p.train_counts, p.seed, ctx)

    method.__doc__ = impute.__doc__
    return method


def _fm_finetune(p: Prepared, ctx, model_dir):
    """One fine-tune per input, so neither sees the other's held-out counts."""
    return tuple(_fm_impute(x, counts, p.seed, ctx, model_dir, p.name, p.var_names, part)
                 for x, counts, part in ((p.x_masked, p.masked, "masked"), (p.x_train, p.train_counts, "mcv")))


METHODS = {**{name: _on_both_inputs(fn) for name, fn in
              {"none": _none, "knn_smooth": _knn_smooth, "magic": _magic, "alra": _alra, "scvi": _scvi}.items()},
           "fm_finetune": _fm_finetune}


def clustering_ari(x: np.ndarray, labels: np.ndarray, seed: int) -> dict[str, float]:
    import anndata as ad
    import scanpy as sc
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    pc = _pca(x, seed)
    km = KMeans(n_clusters=len(set(labels)), n_init=10, random_state=seed).fit_predict(pc)
    a = ad.AnnData(pc.astype(np.float32))
    sc.pp.neighbors(a, use_rep="X", n_neighbors=15, random_state=seed)
    sc.tl.leiden(a, resolution=1.0, random_state=seed, flavor="igraph", n_iterations=2, directed=False)
    return {"ari_leiden": adjusted_rand_score(labels, a.obs["leiden"]), "ari_kmeans": adjusted_rand_score(labels, km),
            "nmi_leiden": normalized_mutual_info_score(labels, a.obs["leiden"]),
            "nmi_kmeans": normalized_mutual_info_score(labels, km)}


STRUCTURE_METRICS = ("ari_kmeans", "ari_leiden")
STRUCTURE_DROP = 0.1
"""A method is flagged when its clustering ARI falls more than this below no imputation's: the MCV / masked
scores can reward smoothing that merges cell types (CellBench: FM MCV 0.741 beat none's 0.793 while its
k-means ARI fell from 0.953 to 0.067), so structure is reported beside every score."""


def report_flags(df) -> list[str]:
    """Lines for results.md (and a WARNING each): methods whose imputed matrix lost the cell-type structure that
    the unimputed input has — mean ARI over seeds more than STRUCTURE_DROP below the 'none' control's."""
    import logging

    flags = []
    rows = df[df.metric.isin(STRUCTURE_METRICS)]
    means = rows.groupby(["dataset", "metric", "method"])["value"].mean()
    for (dataset, metric), by_method in means.groupby(level=[0, 1]):
        by_method = by_method.droplevel([0, 1])
        if "none" not in by_method.index:
            continue
        base = by_method["none"]
        for method, value in by_method.items():
            if method != "none" and value < base - STRUCTURE_DROP:
                flags.append(f"⚠ {dataset}: {method} destroys cell-type structure — {metric} {value:.3f} vs "
                             f"{base:.3f} without imputation; its imputation scores do not mean better data")
    for line in flags:
        logging.getLogger("fm.eval").warning(line)
    return flags


def masked_metrics(imputed, truth, rows, cols) -> dict[str, float]:
    pred, true = imputed[rows, cols], truth[rows, cols]
    pearson = float(np.corrcoef(pred, true)[0, 1]) if pred.std() > 0 else float("nan")  # 'none' predicts 0: undefined
    return {"masked_pearson": pearson, "masked_mse": float(np.mean((pred - true) ** 2))}


def score(p: Prepared, output) -> dict[str, float]:
    """MCV MSE (main), masked-entry Pearson/MSE and, with labels, clustering ARIs of the masked-input run."""
    imputed, mcv = output
    values = {"mcv_mse": float(np.mean((mcv - p.x_test) ** 2)), **masked_metrics(imputed, p.truth, p.rows, p.cols)}
    if p.labels is not None:
        values.update(clustering_ari(imputed, p.labels, p.seed))
    return values
