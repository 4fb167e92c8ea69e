"""What every task shares, so that every method sees the same cells, genes and normalisation.

One place for: reading a suite's dataset (with clear errors naming the file and the column),
subsampling, fixed splits written as index files (and reused when present), gene selection, and
FM embeddings (cached per model and dataset). The normalisation itself lives in fm.preprocessing,
shared with the task heads.
"""
from __future__ import annotations

import hashlib
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger("fm.eval")


@dataclass
class EvalContext:
    """Run-wide settings handed to every task's `prepare()` and methods.

    caps: profile limits (max_cells, n_hvg, scvi_epochs, …); tasks read them with `cap()`.
    controls: run every FM method also on a random-init twin of each model (fm.eval.controls).
    finetune_calls: how many times a method asked for a fine-tuned model (the harness reads it to
    tell fine-tuning methods from zero-shot ones when naming control rows).
    """

    output_dir: Path
    profile: str
    models: list[Path]
    data_dir: Path
    caps: dict
    controls: bool = True
    keep_checkpoints: bool = False  # harness fine-tunes keep only their exported model (~80 MB of optimizer each)
    finetune_calls: int = 0
    _models: dict = field(default_factory=dict, repr=False)
    _twins: dict = field(default_factory=dict, repr=False)
    _embeddings: dict = field(default_factory=dict, repr=False)
    _finetuned: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.output_dir = Path(self.output_dir)
        self.data_dir = Path(self.data_dir)
        self.models = [Path(m) for m in self.models]
        self.caps = dict(self.caps or {})

    def cap(self, key: str, default=None):
        return self.caps.get(key, default)

    # ---------------------------------------------------------------- data
    def dataset_path(self, entry: dict) -> Path:
        path = Path(entry["file"])
        return path if path.is_absolute() else self.data_dir / path

    def load_dataset(self, entry: dict, required_obs: list[str] | tuple = (), seed: int = 0):
        """Raw counts of a suite dataset entry, checked and subsampled.

        `required_obs` lists the *suite keys* whose values must be obs columns (e.g. "label_key")
        or literal column names. The subsample to min(entry.max_cells, caps.max_cells) uses `seed`
        (default 0: the same cells for every seed, so seeds vary splits and methods, not data).
        """
        import anndata as ad
        import scipy.sparse as sp

        path = self.dataset_path(entry)
        name = entry.get("name", path.stem)
        if not path.is_file():
            raise FileNotFoundError(f"dataset {name!r}: file {path} not found (data directory {self.data_dir}; "
                                    "set FM_DATA_DIR to the shared data directory)")
        adata = ad.read_h5ad(path)
        for key in required_obs:
            column = entry.get(key, key)
            if column not in adata.obs.columns:
                via = f" (suite key {key}={column!r})" if key in entry else ""
                raise ValueError(f"{path}: obs has no column {column!r}{via} needed by dataset {name!r}; "
                                 f"columns present: {list(adata.obs.columns)}")
            if adata.obs[column].isna().any():
                raise ValueError(f"{path}: obs column {column!r} has missing values ({int(adata.obs[column].isna().sum())} cells)")
        adata, matrix = _counts_view(adata, entry, path)
        x = adata.X
        x = sp.csr_matrix(x, dtype=np.float32) if not sp.issparse(x) else x.tocsr().astype(np.float32)
        _check_counts(x.data, path, name, matrix)
        adata.X = x
        spike = adata.var_names.str.match(SPIKE_IN_RE)
        if spike.any() and not entry.get("keep_spike_ins", False):  # technical controls, not genes: never HVGs
            log.info("%s: dropped %d ERCC spike-in features (suite key keep_spike_ins: true keeps them)", name,
                     int(spike.sum()))
            adata = adata[:, ~spike].copy()
        limits = [v for v in (entry.get("max_cells"), self.cap("max_cells")) if v]
        if limits and adata.n_obs > min(limits):
            keep = np.sort(np.random.default_rng(seed).choice(adata.n_obs, size=int(min(limits)), replace=False))
            adata = adata[keep].copy()
        adata.uns["eval_file"] = str(path)
        adata.uns["eval_dataset"] = name
        return adata

    # ---------------------------------------------------------------- splits
    def save_indices(self, name: str, obs_names=None, **arrays: np.ndarray) -> dict[str, np.ndarray]:
        """Write integer index arrays to output_dir/splits/<name>.npz, or reuse the file if present.

        Reuse keeps splits fixed across re-runs into the same output directory; with `obs_names`
        the stored cell names are checked so a stale file (other subsample) is an error, not a
        silent mismatch.
        """
        path = self.output_dir / "splits" / f"{name}.npz"
        names = None if obs_names is None else np.asarray(obs_names, dtype=str)
        if path.is_file():
            stored = dict(np.load(path, allow_pickle=False))
            if names is not None and "obs_names" in stored and not np.array_equal(stored["obs_names"], names):
                raise ValueError(f"{path}: split file was written for other cells; delete it or use a new --output")
            stored.pop("obs_names", None)
            if set(stored) != set(arrays):
                raise ValueError(f"{path}: holds {sorted(stored)}, expected {sorted(arrays)}")
            return stored
        path.parent.mkdir(parents=True, exist_ok=True)
        extra = {} if names is None else {"obs_names": names}
        np.savez_compressed(path, **{k: np.asarray(v, dtype=np.int64) for k, v in arrays.items()}, **extra)
        return {k: np.asarray(v, dtype=np.int64) for k, v in arrays.items()}

    def save_split(self, name: str, train_idx, test_idx, obs_names=None) -> tuple[np.ndarray, np.ndarray]:
        """A train/test split as index files (see save_indices); returns the (possibly reused) split."""
        s = self.save_indices(name, obs_names=obs_names, train=train_idx, test=test_idx)
        return s["train"], s["test"]

    # ---------------------------------------------------------------- FM
    @staticmethod
    def model_label(model_dir: Path) -> str:
        """A short name for result rows: runs/debug_eval/model → debug_eval."""
        model_dir = Path(model_dir).resolve()
        return model_dir.parent.name if model_dir.name == "model" else model_dir.name

    def random_init_twin(self, model_dir: Path, seed: int) -> Path:
        """The random-init twin of `model_dir` for `seed` (fm.eval.controls.random_init_twin), written
        once per run to <output>/controls/<label>_random_init_seed<k>. One twin per seed, so the spread
        over seeds of a control row includes the spread over random initialisations."""
        from fm.eval.controls import random_init_twin

        key = (str(Path(model_dir).resolve()), seed)
        if key not in self._twins:
            out = self.output_dir / "controls" / f"{self.model_label(model_dir)}_random_init_seed{seed}"
            self._twins[key] = random_init_twin(model_dir, out, seed)
            log.info("random-init twin of %s (seed %d) → %s", model_dir, seed, out)
        return self._twins[key]

    def fm_embeddings(self, adata, model_dir: Path) -> np.ndarray:
        """Zero-shot cell embeddings of `adata` (raw counts) from a checkpoint, cached per (model, cells, genes).

        A model whose vocabulary matches too few of the dataset's genes stops with the dataset file
        in the message (the tokenizer's own check, re-raised with context).
        """
        import fm

        model_dir = Path(model_dir)
        digest = hashlib.sha1()
        for part in (adata.obs_names, adata.var_names):
            digest.update("\x00".join(map(str, part)).encode())
        digest.update(str(float(adata.X.sum())).encode())
        key = (str(model_dir.resolve()), digest.hexdigest())
        if key in self._embeddings:
            return self._embeddings[key]
        if key[0] not in self._models:
            self._models[key[0]] = fm.load(model_dir)
        source = adata.uns.get("eval_file", "dataset")
        try:
            emb = fm.embed(adata.copy(), self._models[key[0]], batch_size=64, drop_empty=True)
        except ValueError as e:
            raise ValueError(f"model {model_dir} on {source}: {e}") from e
        emb = np.nan_to_num(emb)  # cells without any vocabulary gene: zero vector, not NaN
        self._embeddings[key] = emb
        return emb

    def fm_finetune(self, train_adata, model_dir: Path, task: str, dataset: str, seed: int, **overrides):
        """Fine-tune `task`'s head from `model_dir` on `train_adata` (the harness's train split only:
        test cells never reach the fine-tuning) and return the loaded fine-tuned model.

        The recipe is recipes/finetune/<task>.yaml with train.seed = seed, then the suite's
        caps.finetune overrides (dotted keys, e.g. {train.max_steps: 150}), then `overrides`. The run
        goes to <output>/finetune/<task>_<dataset>_seed<seed>_<model label>; a previous run there is
        replaced (its split may differ). Cached per (model, task, dataset, seed) within one harness run.
        Its training checkpoints are deleted afterwards unless keep_checkpoints (fm eval --keep-checkpoints).
        Torch runs on caps.threads threads (default 1, see torch_threads).
        """
        import shutil

        import fm

        self.finetune_calls += 1
        label = self.model_label(model_dir)
        key = (str(Path(model_dir).resolve()), task, dataset, seed)
        if key not in self._finetuned:
            out = self.output_dir / "finetune" / f"{task}_{dataset}_seed{seed}_{label}"
            if out.exists():
                shutil.rmtree(out)
            settings = {"train.seed": seed, "train.progress": False, "train.save_every": 0,
                        **(self.cap("finetune") or {}), **overrides}
            log.info("fine-tuning %s for %s on %d train cells of %s (seed %d) → %s", label, task, train_adata.n_obs,
                     dataset, seed, out)
            with torch_threads(self.cap("threads", 1)):
                self._finetuned[key] = fm.finetune(model_dir, train_adata, task=task, output_dir=out,
                                                   overrides=settings)
            if not self.keep_checkpoints:  # the exported model (out/model) is all the harness reads
                shutil.rmtree(out / "checkpoints", ignore_errors=True)
        return self._finetuned[key]


SPIKE_IN_RE = r"^(ERCC-\d{5}|ERCC_\d{5})"
"""ERCC spike-in controls (ERCC-00002 …): dropped from evaluation data unless a dataset sets keep_spike_ins."""


def _counts_view(adata, entry: dict, path: Path):
    """(adata with the dataset's counts as X, where they came from): suite keys `layer: <name>` (counts in
    adata.layers) or `use_raw: true` (adata.raw), as fm.embed's layer= / use_raw= keywords."""
    import anndata as ad

    layer, use_raw = entry.get("layer"), bool(entry.get("use_raw", False))
    if layer and use_raw:
        raise ValueError(f"{path}: dataset {entry.get('name')!r} sets both layer and use_raw; pick one")
    if layer:
        if layer not in adata.layers:
            raise ValueError(f"{path}: dataset {entry.get('name')!r}: layer {layer!r} missing; layers: "
                             f"{list(adata.layers)}")
        adata.X = adata.layers[layer]
        return adata, f"layers[{layer!r}]"
    if use_raw:
        if adata.raw is None:
            raise ValueError(f"{path}: dataset {entry.get('name')!r}: use_raw: true but the file has no .raw")
        return ad.AnnData(adata.raw.X, obs=adata.obs, var=adata.raw.var, obsm=dict(adata.obsm), uns=adata.uns), "raw.X"
    return adata, "X"


def _check_counts(values: np.ndarray, path: Path, name: str, matrix: str) -> None:
    """Raw counts or a clear error naming the failed check and the fix (a layer / .raw holding counts)."""
    sample = values[:100000]
    if not sample.size:
        return
    fix = ("evaluation needs raw counts so that every method gets the same normalisation: if the file keeps them "
           "in a layer or in .raw, set `layer: <name>` or `use_raw: true` on the dataset in the suite YAML")
    if not np.isfinite(sample).all():
        raise ValueError(f"{path}: {matrix} of dataset {name!r} contains NaN or infinite values; {fix}")
    if sample.min() < 0:
        raise ValueError(f"{path}: {matrix} of dataset {name!r} is not raw counts: negative values (min "
                         f"{sample.min():.3g}; scaled or centred data); {fix}")
    frac = sample != np.round(sample)
    if frac.any():
        raise ValueError(f"{path}: {matrix} of dataset {name!r} is not raw counts: non-integer values (e.g. "
                         f"{sample[frac][0]:.4g}; {int(frac.sum())} of the first {sample.size} nonzeros; normalised "
                         f"or log data); {fix}")


def select_genes(adata_log, n_top: int | None, cells=None, batch_key: str | None = None) -> np.ndarray:
    """Positions of the genes every method uses: all genes when n_top is None or ≥ n_vars, else the
    top highly variable genes (Seurat flavour on log data), computed on `cells` (the train split
    when there is one, so test cells do not leak into the gene choice)."""
    import scanpy as sc

    if not n_top or adata_log.n_vars <= n_top:
        return np.arange(adata_log.n_vars)
    sub = adata_log if cells is None else adata_log[cells]
    sub = sub.copy()
    if batch_key is not None and sub.obs[batch_key].nunique() < 2:
        batch_key = None
    sc.pp.highly_variable_genes(sub, n_top_genes=int(n_top), flavor="seurat", batch_key=batch_key)
    return np.flatnonzero(sub.var["highly_variable"].to_numpy())


def dense(x) -> np.ndarray:
    return np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float32)


@contextmanager
def torch_threads(n: int):
    """Run a block on `n` torch threads, then restore. On a few shared cores one thread runs our small
    models ~5-7× faster than two (measured: 0.25 s vs 1.7 s per fine-tuning step on 2 busy cores),
    as scVI here (caps.threads, default 1)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _Timer:
    seconds: float = 0.0


@contextmanager
def timed():
    """`with timed() as t: ...` then `t.seconds` (wall clock)."""
    t = _Timer()
    start = time.perf_counter()
    try:
        yield t
    finally:
        t.seconds = time.perf_counter() - start
