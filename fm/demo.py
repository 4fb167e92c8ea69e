"""The README's main job: pretrain the debug recipe, embed real cells, write an .h5ad, summarise.

Falls back to a small generated dataset (and says so) when the real data directory is absent.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import anndata as ad
import numpy as np

from fm.config import load_config
from fm.paths import DATA_DIR_ENV, data_dir, h5ad_path, recipe_path
from fm.quality import knn_label_accuracy, untrained_twin

log = logging.getLogger("fm")
DEMO_FILE = "pbmc3k_seurat_hvg2000_labeled.h5ad"


def pca_of_log_counts(adata: ad.AnnData, n_components: int = 50) -> np.ndarray:
    """The classical baseline embedding: PCA of log1p(counts normalised to 10⁴ per cell)."""
    x = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
    x = np.log1p(x / np.maximum(x.sum(1, keepdims=True), 1) * 1e4)
    x -= x.mean(0)
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    return u[:, :n_components] * s[:n_components]


def random_init_embedding(adata: ad.AnnData, model) -> np.ndarray:
    """Cell embeddings of the model's untrained twin (same config and tokenizer, random weights, seed 0):
    the reference that says whether pretraining taught the model anything."""
    from fm.inference import cell_embeddings

    twin = untrained_twin(type(model), model.config, seed=0)
    twin.cell_tokenizer = model.cell_tokenizer
    return cell_embeddings(adata, twin, batch_size=128)


def run_demo(output_dir: str = "runs/demo", overrides: list[str] | None = None) -> int:
    import fm
    from fm.pretrain import run_pretraining
    from fm.synthetic import synthetic_anndata
    from fm.train import latest_checkpoint

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    overrides = [f"train.output_dir={out}", "train.progress=true", *(overrides or [])]
    real = h5ad_path(DEMO_FILE)
    if real.is_file():
        source, adata_path = f"real data: {real}", real
    else:
        print(f"NOTE: no real data at {data_dir()} (set {DATA_DIR_ENV}); using a small GENERATED dataset "
              "instead — the numbers below describe synthetic cells.")
        adata_path = out / "synthetic_input.h5ad"
        synthetic_anndata(seed=0).write_h5ad(adata_path)
        source = f"generated data: {adata_path}"
        overrides.append(f"data.paths=[{adata_path}]")
    cfg = load_config(recipe_path("debug"), overrides)
    # a finished earlier demo run is reused (resumed at its last step), not retrained
    reused = latest_checkpoint(Path(cfg.train.output_dir))
    result = run_pretraining(cfg, resume=reused is not None)
    train_s = time.perf_counter() - t0

    model = fm.load(result.export_dir)
    adata = ad.read_h5ad(adata_path)
    t1 = time.perf_counter()
    emb = fm.embed(adata, model, batch_size=128)
    embed_s = time.perf_counter() - t1
    embedded = out / "embedded.h5ad"
    adata.write_h5ad(embedded)

    history = result.history
    print("\n=== scfm demo summary ===")
    print(f"input            {source} ({adata.n_obs} cells × {adata.n_vars} genes)")
    print(f"model            {result.export_dir} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params)")
    if reused is not None:
        print(f"pretraining      reused the checkpoint {reused} of an earlier demo run (step {result.step}; not "
              f"timed: delete {out} to retrain from scratch)")
    if history:
        first, last = history[0], history[-1]
        timing = "(the earlier run's log)" if reused is not None else f"in {train_s:.0f}s"
        print(f"pretraining      {result.step} steps {timing}; loss {first['loss']:.4f} (step "
              f"{int(first['step'])}) → {last['loss']:.4f} (step {int(last['step'])}), ratio "
              f"{last['loss'] / first['loss']:.2f}")
    print(f"embedding        obsm['X_fm'] {emb.shape} in {embed_s:.1f}s → {embedded}")
    label_key = next((k for k in ("cell_type", "celltype") if k in adata.obs), None)
    if label_key:
        labels = adata.obs[label_key].astype(str).to_numpy()
        twin = random_init_embedding(adata, model)
        print(f"10-NN {label_key} accuracy  FM zero-shot {knn_label_accuracy(emb, labels):.3f}  |  "
              f"same model, random weights {knn_label_accuracy(twin, labels):.3f}  |  "
              f"PCA of log counts {knn_label_accuracy(pca_of_log_counts(adata), labels):.3f}  |  "
              f"majority class {np.unique(labels, return_counts=True)[1].max() / len(labels):.3f}")
    return 0
