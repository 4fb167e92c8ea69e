"""Cell-type annotation: train on one split, predict the other.

Every method sees the same cells, the same normalisation (log1p of counts/1e4 over the file's
genes) and the same genes (HVGs chosen on the train split). Splits: `random` (stratified, per
seed) or `column` (e.g. Kang: train on ctrl, test on stim — a shift the model has to survive).
FM methods use zero-shot embeddings of the same cells × genes (raw counts, as the FM expects):
fm_knn / fm_logreg classify them; fm_finetune fine-tunes the annotation head on the train cells
only (recipes/finetune/annotation.yaml + caps.finetune) and predicts the test cells.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fm.eval.context import EvalContext, dense, select_genes
from fm.preprocessing import log_normalise

MAIN_METRIC = "macro_f1"
HIGHER_IS_BETTER = True
CONTROLS = ["majority"]
DATASET_KEYS = {"n_hvg"}


@dataclass
class Prepared:
    """What every method of one dataset × seed sees."""

    name: str
    seed: int
    label_key: str
    cells: object  # AnnData view: raw counts of all cells × the selected genes (what FM methods get)
    lognorm: object  # AnnData: log-normalised, all genes (CellTypist's test input)
    genes: np.ndarray  # positions of the selected genes
    x: np.ndarray  # log-normalised cells × selected genes (what baselines get)
    labels: np.ndarray
    train: np.ndarray
    test: np.ndarray
    classes: list  # classes present in the test split: macro-F1 is over these (an absent class has no F1)


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
        wanted = {side: [str(v) for v in (spec[side] if isinstance(spec[side], (list, tuple)) else [spec[side]])]
                  for side in ("train", "test")}  # one value or a list of them (plates [1, 2] → [3])
        if set(wanted["train"]) & set(wanted["test"]):
            raise ValueError(f"dataset {dataset['name']!r}: split values {sorted(set(wanted['train']) & set(wanted['test']))} "
                             "are both train and test")
        train, test = (np.flatnonzero(np.isin(values, wanted[side])) for side in ("train", "test"))
        if not len(train) or not len(test):
            absent = sorted(v for side in wanted.values() for v in side if v not in set(values))
            raise ValueError(f"{adata.uns['eval_file']}: split on {column!r} (train {wanted['train']}, test "
                             f"{wanted['test']}) gives {len(train)} train / {len(test)} test cells; values not in the "
                             f"column: {absent} (values present: {sorted(set(values))})")
    else:
        raise ValueError(f"dataset {dataset['name']!r}: split kind {kind!r} unknown (random | column)")
    return ctx.save_split(f"{dataset['name']}_seed{seed}", np.sort(train), np.sort(test), obs_names=adata.obs_names)


def prepare(dataset: dict, seed: int, ctx: EvalContext) -> Prepared:
    adata = ctx.load_dataset(dataset, required_obs=["label_key"])
    labels = adata.obs[dataset["label_key"]].astype(str).to_numpy()
    train, test = make_split(adata, dataset, seed, ctx, labels)
    lognorm = log_normalise(adata)
    genes = select_genes(lognorm, dataset.get("n_hvg", ctx.cap("n_hvg", 2000)), cells=train)
    return Prepared(name=dataset["name"], seed=seed, label_key=dataset["label_key"], cells=adata[:, genes],
                    lognorm=lognorm, genes=genes, x=dense(lognorm.X[:, genes]), labels=labels, train=train,
                    test=test, classes=sorted(set(labels[test])))


def score(p: Prepared, pred) -> dict[str, float]:
    """Macro-F1 (main), accuracy and per-class F1 of the predicted test labels."""
    from sklearn.metrics import accuracy_score, f1_score

    y_true = p.labels[p.test]
    out = {"macro_f1": f1_score(y_true, pred, labels=p.classes, average="macro", zero_division=0),
           "accuracy": accuracy_score(y_true, pred)}
    per_class = f1_score(y_true, pred, labels=p.classes, average=None, zero_division=0)
    out.update({f"f1:{c}": v for c, v in zip(p.classes, per_class)})
    return out


# ---------------------------------------------------------------- classifiers (train matrix → test labels)
def _logreg_fit(xtr, ytr, xte, seed, ctx, scale=False):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    steps = [StandardScaler()] if scale else []
    clf = make_pipeline(*steps, LogisticRegression(max_iter=int(ctx.cap("logreg_max_iter", 500)), random_state=seed))
    return clf.fit(xtr, ytr).predict(xte)


def _knn_fit(xtr, ytr, xte, ctx):
    from sklearn.neighbors import KNeighborsClassifier

    return KNeighborsClassifier(n_neighbors=int(ctx.cap("knn_k", 15))).fit(xtr, ytr).predict(xte)


# ---------------------------------------------------------------- methods (prepared → test labels)
def _majority(p: Prepared, ctx):
    from sklearn.dummy import DummyClassifier

    return DummyClassifier(strategy="most_frequent").fit(p.x[p.train], p.labels[p.train]).predict(p.x[p.test])


def _logreg(p: Prepared, ctx):
    return _logreg_fit(p.x[p.train], p.labels[p.train], p.x[p.test], p.seed, ctx)


def _knn_pca(p: Prepared, ctx):
    """PCA fitted on the train cells only, test cells projected."""
    from sklearn.decomposition import PCA

    xtr, xte = p.x[p.train], p.x[p.test]
    pca = PCA(n_components=min(50, xtr.shape[1], xtr.shape[0] - 1), random_state=p.seed).fit(xtr)
    return _knn_fit(pca.transform(xtr), p.labels[p.train], pca.transform(xte), ctx)


def _celltypist(p: Prepared, ctx):
    """CellTypist in SGD mode, trained here on the train split (no downloaded model), predicting
    without majority voting so it is a per-cell classifier like the others. annotate() gets the
    test cells with all genes so its own normalisation check sees counts summing to 1e4."""
    import celltypist

    np.random.seed(p.seed)
    model = celltypist.train(p.x[p.train], labels=p.labels[p.train], genes=p.lognorm.var_names[p.genes].to_numpy(),
                             use_SGD=True, feature_selection=False, check_expression=False, n_jobs=1,
                             max_iter=int(ctx.cap("celltypist_max_iter", 100)))
    pred = celltypist.annotate(p.lognorm[p.test].copy(), model=model, majority_voting=False)
    return pred.predicted_labels["predicted_labels"].astype(str).to_numpy()


def _fm_knn(p: Prepared, ctx, model_dir):
    emb = ctx.fm_embeddings(p.cells, model_dir)
    return _knn_fit(emb[p.train], p.labels[p.train], emb[p.test], ctx)


def _fm_logreg(p: Prepared, ctx, model_dir):
    """Logistic regression on the standardised zero-shot embedding."""
    emb = ctx.fm_embeddings(p.cells, model_dir)
    return _logreg_fit(emb[p.train], p.labels[p.train], emb[p.test], p.seed, ctx, scale=True)


def _fm_finetune(p: Prepared, ctx, model_dir):
    """Fine-tune the annotation head on the train cells (their labels in obs[label_key]), then
    fm.annotate the test cells with no unknown threshold (every cell gets a class)."""
    import fm

    reference = p.cells[p.train].copy()
    model = ctx.fm_finetune(reference, model_dir, "annotation", p.name, p.seed,
                            **{"task.label_key": p.label_key, "task.min_cells_per_class": 1})
    return np.asarray(fm.annotate(p.cells[p.test].copy(), model, threshold=0.0), dtype=str)


METHODS = {"majority": _majority, "logreg": _logreg, "knn_pca": _knn_pca, "celltypist": _celltypist,
           "fm_knn": _fm_knn, "fm_logreg": _fm_logreg, "fm_finetune": _fm_finetune}
