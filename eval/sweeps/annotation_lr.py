"""Learning-rate sweep for recipes/finetune/annotation.yaml, on VALIDATION cells only.

Why a script: the recipe's lr is a measured default, and the measurement must be repeatable and must
never see a test split. The cells are the *train* split of fm eval's pbmc3k split for `--seed`
(eval/annotation.yaml: stratified, test_size 0.3, computed here exactly as fm/eval/tasks/annotation.py
does, test cells dropped at once); the fine-tune carves its validation cells out of them
(data.val_fraction) and reports their macro-F1 / accuracy (the early-stopping signal is their loss).

    OMP_NUM_THREADS=1 python eval/sweeps/annotation_lr.py --model /tmp/ft_base/model --lrs 3e-4,1e-3,3e-3,1e-2 \
        train.epochs=8  [recipe overrides ...]
The base: `fm pretrain recipes/pretrain/debug.yaml train.max_steps=50 train.output_dir=/tmp/ft_base`.
"""
from __future__ import annotations

import argparse
import logging
import tempfile
import time

import anndata as ad
import numpy as np


def main() -> None:
    from sklearn.model_selection import train_test_split

    from fm.config import load_config
    from fm.paths import data_dir, recipe_path
    from fm.tasks import run_finetune

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--lrs", default="3e-4,1e-3,3e-3,1e-2")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    adata = ad.read_h5ad(data_dir() / "h5ad" / "pbmc3k_seurat_hvg2000_labeled.h5ad")
    labels = adata.obs["cell_type"].astype(str).to_numpy()
    train, _ = train_test_split(np.arange(adata.n_obs), test_size=0.3, random_state=args.seed, stratify=labels)
    cells = adata[np.sort(train)].copy()  # the test split goes no further
    del adata
    print(f"{cells.n_obs} train-split cells; validation carved from them; lrs {args.lrs}")
    for lr in args.lrs.split(","):
        with tempfile.TemporaryDirectory() as out:
            cfg = load_config(recipe_path("finetune/annotation"),
                              [f"model.init_from={args.model}", f"train.output_dir={out}", f"train.lr={lr}",
                               f"train.seed={args.seed}", "train.progress=false", "train.save_every=0",
                               *args.overrides])
            t0 = time.perf_counter()
            result = run_finetune(cfg, adatas=cells)
            h = result.heldout
            print(f"lr={lr}: val macro-F1 {h['macro_f1']:.3f}, val accuracy {h['accuracy']:.3f} (n={h['n']}), "
                  f"best val loss {result.best_metric if result.best_metric is not None else float('nan'):.4f} "
                  f"at step {result.best_step}, stopped at {result.step} (early: {result.early_stopped}), "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
