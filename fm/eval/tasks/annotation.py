"""Cell-type annotation: train on one split, predict the other.

Every method sees the same cells, the same normalisation (log1p of counts/1e4 over the file's
genes) and the same genes (HVGs chosen on the train split). Splits: `random` (stratified, per
seed) or `column` (e.g. Kang: train on ctrl, test on stim — a shift the model has to survive).
FM methods use zero-shot embeddings of the same cells × genes (raw counts, as the FM expects):
fm_knn / fm_logreg classify them; fm_finetune fine-tunes the annotation head on the train cells
only (recipes/finetune/annotation.yaml + caps.finetune) and predicts the test cells.
"""
from __future__ import annotations

import logging

import numpy as np

from fm.eval.context import EvalContext, dense, log_normalise, select_genes, timed

log = logging.getLogger("fm.eval")

MAIN_METRIC = "macro_f1"
HIGHER_IS_BETTER = True
CONTROLS = ["majority"]
DATASET_KEYS = {"n_hvg"}


def _majority(xtr, ytr, xte, seed, ctx, **_):
    from sklearn.dummy import DummyClassifier

    return DummyClassifier(strategy="most_frequent").fit(xtr, ytr).predict(xte)


def _logreg(xtr, ytr, xte, seed, ctx, scale=False, **_):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    steps = [StandardScaler()] if scale else []
    clf = make_pipeline(*steps, LogisticRegression(max_iter=int(ctx.cap("logreg_max_iter", 500)), random_state=seed))
    return clf.fit(xtr, ytr).predict(xte)


def _knn(xtr, ytr, xte, seed, ctx, **_):
    from sklearn.neighbors import KNeighborsClassifier

    return KNeighborsClassifier(n_neighbors=int(ctx.cap("knn_k", 15))).fit(xtr, ytr).predict(xte)


def _knn_pca(xtr, ytr, xte, seed, ctx, **_):
    """PCA fitted on the train cells only, test cells projected."""
    from sklearn.decomposition import PCA

    pca = PCA(n_components=min(50, xtr.shape[1], xtr.shape[0] - 1), random_state=seed).fit(xtr)
    return _knn(pca.transform(xtr), ytr, pca.transform(xte), seed, ctx)


def _celltypist(xtr, ytr, xte, seed, ctx, genes=None, test_full=None, **_):
    """CellTypist in SGD mode, trained here on the train split (no downloaded model), predicting
    without majority voting so it is a per-cell classifier like the others. annotate() gets the
    test cells with all genes so its own normalisation check sees counts summing to 1e4."""
    import celltypist

    np.random.seed(seed)
    model = celltypist.train(xtr, labels=ytr, genes=genes, use_SGD=True, feature_selection=False,
                             check_expression=False, n_jobs=1, max_iter=int(ctx.cap("celltypist_max_iter", 100)))
    pred = celltypist.annotate(test_full, model=model, majority_voting=False)
    return pred.predicted_labels["predicted_labels"].astype(str).to_numpy()


def _fm_finetune(adata, train, test, label_key, model_dir, dataset, seed, ctx):
    """Fine-tune the annotation head on the train cells (their labels in obs[label_key]), then
    fm.annotate the test cells with no unknown threshold (every cell gets a class)."""
    import fm

    reference = adata[train].copy()
    model = ctx.fm_finetune(reference, model_dir, "annotation", dataset, seed,
                            **{"task.label_key": label_key, "task.min_cells_per_class": 1})
    return np.asarray(fm.annotate(adata[test].copy(), model, threshold=0.0), dtype=str)


METHODS = {"majority": _majority, "logreg": _logreg, "knn_pca": _knn_pca, "celltypist": _celltypist,
           "fm_knn": _knn, "fm_logreg": _logreg, "fm_finetune": _fm_finetune}


def make_split(adata, dataset: dict, seed: int, ctx: EvalContext, labels: np.ndarray):
    """Train/test positions from the suite's `split` spec, written as index files and reused."""
    from sklearn.model_selection import train_test_split

    spec = dataset.get("split") or {"kind": "random", "test_size": 0.3}
    kind = spec.get("kind", "random")
    if kind == "random":
        idx = np.arange(adata.n_obs)
        train, test = train_test_split(idx, test_size=spec.get("test_size", 0.3), random_state=seed, stratify=labels)
    elif kind == "column":
        column = spec["key"]
        if column not in adata.obs.columns:
            raise ValueError(f"{adata.uns['eval_file']}: obs has no column {column!r} (split.key of dataset "
                             f"{dataset['name']!r}); columns present: {list(adata.obs.columns)}")
        values = adata.obs[column].astype(str).to_numpy()
        train, test = np.flatnonzero(values == str(spec["train"])), np.flatnonzero(values == str(spec["test"]))
        if not len(train) or not len(test):
            raise ValueError(f"{adata.uns['eval_file']}: split on {column!r} gives {len(train)} train / {len(test)} "
                             f"test cells (values {sorted(set(values))})")
    else:
        raise ValueError(f"dataset {dataset['name']!r}: split kind {kind!r} unknown (random | column)")
    return ctx.save_split(f"{dataset['name']}_seed{seed}", np.sort(train), np.sort(test), obs_names=adata.obs_names)


def metrics(y_true, y_pred, classes) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score

    out = {"macro_f1": f1_score(y_true, y_pred, labels=classes, average="macro", zero_division=0),
           "accuracy": accuracy_score(y_true, y_pred)}
    per_class = f1_score(y_true, y_pred, labels=classes, average=None, zero_division=0)
    out.update({f"f1:{c}": v for c, v in zip(classes, per_class)})
    return out


def run(dataset: dict, methods: list[str], seed: int, ctx: EvalContext) -> list[dict]:
    adata = ctx.load_dataset(dataset, required_obs=["label_key"])
    labels = adata.obs[dataset["label_key"]].astype(str).to_numpy()
    train, test = make_split(adata, dataset, seed, ctx, labels)
    lognorm = log_normalise(adata)
    genes = select_genes(lognorm, dataset.get("n_hvg", ctx.cap("n_hvg", 2000)), cells=train)
    x = dense(lognorm.X[:, genes])
    # macro-F1 over the classes present in the test split (a class absent there has no F1)
    classes = sorted(set(labels[test]))
    rows = []
    for method in methods:
        if method.startswith("fm_"):
            runs = [(f"{method}[{ctx.model_label(m)}]", m) for m in ctx.models]
        else:
            runs = [(method, None)]
        for name, model_dir in runs:
            with timed() as t:
                if method == "fm_finetune":
                    pred = _fm_finetune(adata[:, genes], train, test, dataset["label_key"], model_dir,
                                        dataset["name"], seed, ctx)
                elif model_dir is not None:
                    emb = ctx.fm_embeddings(adata[:, genes], model_dir)
                    pred = METHODS[method](emb[train], labels[train], emb[test], seed, ctx, scale=True)
                else:
                    pred = METHODS[method](x[train], labels[train], x[test], seed, ctx,
                                           genes=lognorm.var_names[genes].to_numpy(), test_full=lognorm[test].copy())
            for metric, value in metrics(labels[test], pred, classes).items():
                rows.append({"dataset": dataset["name"], "method": name, "metric": metric, "value": float(value),
                             "runtime_s": t.seconds})
            log.info("annotation %s %s seed %d: macro-F1 %.3f (%.1f s)", dataset["name"], name, seed,
                     rows[-len(classes) - 2]["value"], t.seconds)
    return rows
