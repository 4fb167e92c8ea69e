"""Representation quality during pretraining: how well the cell embedding separates known labels, next
to the same numbers for an untrained twin (same architecture, random weights).

A falling pretraining loss proves little (predicting the mean bin lowers it); what counts is whether
the embedding carries cell state. At the start, at every `train.eval_every` and at the end, each probe
set (`data.probes`: small labelled h5ad files, never the test split of an `fm eval` suite) is embedded
as fm.embed would embed it, and four numbers are logged to <output_dir>/quality_log.csv:

    knn_accuracy   leave-one-out 10-NN (cosine) label accuracy
    logreg_f1      macro-F1 of a logistic-regression probe (standardised embedding, stratified half split)
    nmi            NMI of k-means (k = number of labels) clusters against the labels
    depth_r        |Pearson r| of the embedding's first principal component with log total counts:
                   how much of the embedding is library size (lower is better)

Each row carries the random-init twin's value (`random_init`), computed once. logreg_f1 and nmi need
scikit-learn (the [eval] extra); without it they are left out with a warning. quality.png plots every
metric against the step.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger("fm")

LABEL_SEPARATOR = "::"
"""A probe is 'file.h5ad' (labels in obs['cell_type']) or 'file.h5ad::obs_column'."""
DEFAULT_LABEL_KEY = "cell_type"
QUALITY_LOG = "quality_log.csv"


def knn_label_accuracy(x: np.ndarray, labels: np.ndarray, k: int = 10) -> float:
    """Leave-one-out k-NN (cosine) majority-vote accuracy: how well an embedding separates known labels."""
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    k = min(k, len(x) - 1)
    neighbours = np.argpartition(-sim, k, axis=1)[:, :k]
    codes = np.unique(labels, return_inverse=True)[1]
    votes = np.zeros((len(codes), codes.max() + 1))
    np.add.at(votes, (np.repeat(np.arange(len(codes)), k), codes[neighbours].ravel()), 1)
    return float((votes.argmax(1) == codes).mean())


def depth_correlation(x: np.ndarray, log_depth: np.ndarray) -> float:
    """|Pearson r| between the embedding's first principal component and log total counts."""
    centred = x - x.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    pc1 = centred @ vt[0]
    if pc1.std() < 1e-12 or log_depth.std() < 1e-12:
        return 0.0
    return float(abs(np.corrcoef(pc1, log_depth)[0, 1]))


def _sklearn_metrics(x: np.ndarray, labels: np.ndarray, seed: int) -> dict[str, float]:
    from sklearn.cluster import KMeans
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score, normalized_mutual_info_score
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    z = StandardScaler().fit_transform(x)
    classes, counts = np.unique(labels, return_counts=True)
    stratify = labels if counts.min() >= 2 else None
    train, test = train_test_split(np.arange(len(x)), test_size=0.5, random_state=seed, stratify=stratify)
    probe = LogisticRegression(max_iter=500, random_state=seed).fit(z[train], labels[train])
    f1 = f1_score(labels[test], probe.predict(z[test]), average="macro", zero_division=0)
    clusters = KMeans(n_clusters=len(classes), n_init=10, random_state=seed).fit_predict(z)
    return {"logreg_f1": float(f1), "nmi": float(normalized_mutual_info_score(labels, clusters))}


def embedding_metrics(x: np.ndarray, labels: np.ndarray, log_depth: np.ndarray, seed: int = 0) -> dict[str, float]:
    """The four quality numbers of one embedding (see the module docstring)."""
    x = np.nan_to_num(np.asarray(x, dtype=np.float64))
    out = {"knn_accuracy": knn_label_accuracy(x, labels)}
    try:
        out.update(_sklearn_metrics(x, labels, seed))
    except ImportError:
        log.warning("representation quality: scikit-learn is not installed ([eval] extra); logreg_f1 and nmi left out")
    out["depth_r"] = depth_correlation(x, log_depth)
    return out


def untrained_twin(cls, config, seed: int):
    """`cls(config)` with the model's own initialiser seeded by `seed`, the caller's torch RNG left as it was:
    the random-init reference every quality number (quality log, demo, fm eval controls) is compared with."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(config)


@dataclass
class ProbeSet:
    """A labelled AnnData (raw counts, in memory) measured during pretraining."""

    name: str
    adata: object
    labels: np.ndarray
    log_depth: np.ndarray


def load_probe(spec: str, max_cells: int = 1000, seed: int = 0) -> ProbeSet:
    """'path[::label_key]' → ProbeSet, subsampled (seeded) to max_cells, cells without a label dropped."""
    import anndata as ad

    path, _, key = spec.partition(LABEL_SEPARATOR)
    key = key or DEFAULT_LABEL_KEY
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data.probes: {path} not found")
    adata = ad.read_h5ad(path)
    if key not in adata.obs.columns:
        raise KeyError(f"data.probes: {path} has no obs column {key!r} (columns: {list(adata.obs.columns)}); "
                       f"write the probe as '{path}{LABEL_SEPARATOR}<label column>'")
    adata = adata[adata.obs[key].notna().to_numpy()]
    if adata.n_obs > max_cells:
        adata = adata[np.sort(np.random.default_rng(seed).choice(adata.n_obs, max_cells, replace=False))]
    adata = adata.copy()
    labels = adata.obs[key].astype(str).to_numpy()
    if len(set(labels)) < 2:
        raise ValueError(f"data.probes: {path} obs[{key!r}] has fewer than 2 labels; a probe needs several")
    depth = np.asarray(adata.X.sum(axis=1)).ravel()
    return ProbeSet(f"{path.stem}:{key}", adata, labels, np.log1p(depth))


class QualityMonitor:
    """Called by the training loop (`train(callbacks=[…])`) with the model and step; logs the quality
    of every probe set beside its random-init twin's. Leaves the global RNG untouched, so a run with
    probes trains exactly as one without."""

    def __init__(self, probes: list[ProbeSet], tokenizer, output_dir: str | Path, seed: int = 0, batch_size: int = 64):
        self.probes, self.tokenizer, self.seed, self.batch_size = probes, tokenizer, seed, batch_size
        self.path = Path(output_dir) / QUALITY_LOG
        self.random_init: dict[tuple[str, str], float] | None = None

    def _measure(self, model) -> dict[tuple[str, str], float]:
        from fm.inference import cell_embeddings

        before = model.__dict__.get("cell_tokenizer")
        model.cell_tokenizer = self.tokenizer
        try:
            values = {}
            for probe in self.probes:
                emb = cell_embeddings(probe.adata, model, batch_size=self.batch_size, drop_empty=True)
                metrics = embedding_metrics(emb, probe.labels, probe.log_depth, self.seed)
                values.update({(probe.name, k): v for k, v in metrics.items()})
            return values
        finally:
            model.cell_tokenizer = before

    def _twin(self, model):
        """Same class and config, fresh random weights, on the model's device."""
        return untrained_twin(type(model), model.config, self.seed + 1).to(next(model.parameters()).device)

    def __call__(self, model, step: int) -> None:
        import torch

        with torch.random.fork_rng(devices=[]):
            if self.random_init is None:
                self.random_init = self._measure(self._twin(model))
            values = self._measure(model)
        rows = [{"step": step, "probe": p, "metric": m, "value": v, "random_init": self.random_init[(p, m)]}
                for (p, m), v in values.items()]
        self._append(rows)
        for probe in self.probes:
            log.info("step %d quality %s: %s", step, probe.name, ", ".join(
                f"{m} {values[(probe.name, m)]:.3f} (random {self.random_init[(probe.name, m)]:.3f})"
                for _, m in sorted(k for k in values if k[0] == probe.name)))

    def _append(self, rows: list[dict]) -> None:
        import pandas as pd

        self.path.parent.mkdir(parents=True, exist_ok=True)
        frame = pd.DataFrame(rows)
        frame.to_csv(self.path, mode="a", header=not self.path.is_file(), index=False)
        plot_quality(self.path)


def plot_quality(path: str | Path) -> Path | None:
    """quality.png beside the log: each metric against the step, the random-init twin dashed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    import pandas as pd

    frame = pd.read_csv(path)
    metrics = list(dict.fromkeys(frame["metric"]))
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 2.8), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for probe, part in frame[frame["metric"] == metric].groupby("probe"):
            line, = ax.plot(part["step"], part["value"], marker="o", label=probe)
            ax.axhline(part["random_init"].iloc[0], color=line.get_color(), linestyle="--", linewidth=1)
        ax.set_title(metric)
        ax.set_xlabel("step")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    out = Path(path).with_name("quality.png")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


__all__ = ["ProbeSet", "QualityMonitor", "untrained_twin", "depth_correlation", "embedding_metrics", "knn_label_accuracy",
           "load_probe", "plot_quality"]
