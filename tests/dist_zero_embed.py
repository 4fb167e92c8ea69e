"""Worker for tests/test_distributed.py, started by `accelerate launch` with a DeepSpeed config:
pretrain (the `fm pretrain` job, minus argparse), then embed the first cells of FILE with the
in-memory (ZeRO-sharded) model on every rank; rank 0 saves them for comparison with fm.load(export).

    accelerate launch --config_file recipes/accelerate/zero3.yaml tests/dist_zero_embed.py OUT.npy FILE N [overrides]

DeepSpeed on CPU JIT-compiles a shared-memory all-reduce kernel on first use (minutes on a
2-core machine, cached in ~/.cache/torch_extensions). Unless FM_TEST_DS_SHM=1 we skip that CPU-only
fast path; DeepSpeed then runs its collectives through torch.distributed (gloo) — the path it takes
wherever the kernel is unavailable, and the shape of the NCCL path on GPUs.
"""
import os
import sys

import numpy as np

if os.environ.get("FM_TEST_DS_SHM") != "1":
    import importlib
    # by module path: the attribute deepspeed.comm.torch is PyTorch itself (re-exported by `import *`)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None

import anndata as ad  # noqa: E402
from accelerate.utils import extract_model_from_parallel  # noqa: E402

import fm  # noqa: E402
from fm.config import load_config  # noqa: E402
from fm.paths import recipe_path  # noqa: E402
from fm.pretrain import run_pretraining  # noqa: E402
from fm.tokenizer import CellTokenizer  # noqa: E402


def main(out_npy: str, h5ad: str, n_cells: str, *overrides: str) -> None:
    result = run_pretraining(load_config(recipe_path("debug"), list(overrides)))
    model = extract_model_from_parallel(result.model)  # the module inside the DeepSpeed engine
    model.cell_tokenizer = CellTokenizer.from_pretrained(result.export_dir)
    adata = ad.read_h5ad(h5ad)[: int(n_cells)].copy()
    emb = fm.embed(adata, model, batch_size=32)  # every rank: ZeRO-3 gathers parameters collectively
    if int(os.environ.get("RANK", "0")) == 0:
        np.save(out_npy, emb)


if __name__ == "__main__":
    main(*sys.argv[1:])
