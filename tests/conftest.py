"""Shared fixtures: the real-data directory (skip cleanly when absent) and a tiny trained model."""
from __future__ import annotations

import logging
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from fm.paths import DATA_DIR_ENV, data_dir

PBMC = "pbmc3k_seurat_hvg2000_labeled.h5ad"
KANG = "kang2018_muscat_1556c_labeled.h5ad"


def real_file(name: str) -> Path:
    path = data_dir() / "h5ad" / name
    if not path.is_file():
        pytest.skip(f"real data file {path} not found (set {DATA_DIR_ENV} to the shared data directory)")
    return path


@pytest.fixture(scope="session")
def pbmc_path() -> Path:
    return real_file(PBMC)


@pytest.fixture(scope="session")
def kang_path() -> Path:
    return real_file(KANG)


@pytest.fixture()
def pbmc_small(pbmc_path) -> ad.AnnData:
    """First 200 PBMC cells in memory (fresh copy per test)."""
    return ad.read_h5ad(pbmc_path)[:200].copy()


def tiny_overrides(out: Path, paths: list[Path], steps: int = 20, **extra) -> list[str]:
    """Overrides that shrink the debug recipe to a few seconds."""
    items = {"train.output_dir": str(out), "train.max_steps": steps, "train.progress": False,
             "train.log_every": 1, "train.save_every": 10, "train.eval_every": 0, "train.batch_size": 16,
             "train.warmup_steps": 2, "data.max_genes": 64, "model.d_model": 32, "model.n_heads": 4,
             "model.d_ff": 64, "data.paths": "[" + ",".join(map(str, paths)) + "]"}
    items.update(extra)
    return [f"{k}={v}" for k, v in items.items()]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, pbmc_path) -> Path:
    """A tiny model pretrained for 20 steps on PBMC cells, exported (session-wide, ~10 s)."""
    from fm.config import load_config
    from fm.paths import recipe_path
    from fm.pretrain import run_pretraining

    out = tmp_path_factory.mktemp("tiny_run")
    cfg = load_config(recipe_path("debug"), tiny_overrides(out, [pbmc_path]))
    result = run_pretraining(cfg)
    return result.export_dir


@pytest.fixture(autouse=True)
def _quiet_logs(caplog):
    caplog.set_level(logging.INFO, logger="fm")
    np.seterr(all="warn")
