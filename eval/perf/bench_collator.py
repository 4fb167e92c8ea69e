"""Training collator throughput: scGPT's DataCollator vs our CellCollator (numpy path, compiled path).

Tokenised cells/s on real cells (bin, select genes, mask, pad), batch 32, max_genes 1200, mask_ratio 0.4,
repetitions interleaved (scGPT, numpy, compiled, scGPT, ...) so machine load hits the three alike; the
table shows each method's median over repetitions and the ratios of medians.

(a) scGPT: its own `scgpt/data_collator.py` (and the `binning` of `scgpt/preprocess.py` it imports), read
    from a checkout or git mirror (--scgpt) and loaded as standalone modules, so scGPT's package __init__
    (and its heavy dependencies) is not needed: `scgpt` is stubbed by a bare package with a logger. Its
    settings are those of scGPT's pretraining script: pad_token_id = <pad> id, pad_value -2, mask_value -1,
    mlm_probability = mask_ratio, max_length = max_genes + 1 (the <cls> token), sampling=True,
    keep_first_n_tokens=1. Its input is what scGPT's dataset hands it: per cell a dict of torch tensors
    `genes` (<cls> then the expressed genes' ids) and `expressions` (pad_value then the raw counts; the
    collator bins them per cell). Those dicts are built before the timed call (the collator bins in
    place, so each repetition gets fresh copies). Without a checkout, `scgpt_collate` of bench_corpus.py
    (a per-cell numpy transcription) stands in and the table says so.
(b) ours, numpy path (FM_COLLATOR=numpy), (c) ours, compiled path (fm._kernels, numba): CellCollator(train=True)
    on the tokenizer's rows of the same cells.

    OMP_NUM_THREADS=1 python eval/perf/bench_collator.py --reps 7
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np

MIRROR = Path("/work/.mirror/bowang-lab+scGPT/repo")
FILES = {"pbmc3k": ("pbmc3k_seurat_hvg2000_labeled.h5ad", None),
         "kang": ("kang2018_muscat_1556c_labeled.h5ad", None),
         "citeseq": ("citeseq_pbmc1k_10x_scarf.h5ad", "gene_ids")}


def _scgpt_source(root: Path, rel: str) -> str:
    """A file of an scGPT checkout, or of a git directory without a work tree (HEAD)."""
    if (root / rel).is_file():
        return (root / rel).read_text()
    res = subprocess.run(["git", "-C", str(root), "show", f"HEAD:{rel}"], capture_output=True, text=True)
    if res.returncode:
        raise FileNotFoundError(f"{rel} not found in {root}: {res.stderr.strip()}")
    return res.stdout


def load_scgpt_collator(root: Path):
    """scGPT's DataCollator class from `root`, with `scgpt` stubbed (logger only) and scgpt.preprocess loaded
    from source (its scanpy / anndata imports are stubbed too when those packages are absent)."""
    pkg = types.ModuleType("scgpt")
    pkg.__path__ = []
    pkg.logger = logging.getLogger("scgpt")
    sys.modules["scgpt"] = pkg
    for name in ("scanpy", "anndata"):
        if importlib.util.find_spec(name) is None:  # binning() uses neither
            stub = types.ModuleType(name)
            stub.AnnData = object
            sys.modules[name] = stub
            if name == "scanpy":
                get = types.ModuleType("scanpy.get")
                get._get_obs_rep = get._set_obs_rep = None
                stub.get = get
                sys.modules["scanpy.get"] = get
    for mod, rel in (("scgpt.preprocess", "scgpt/preprocess.py"), ("scgpt.data_collator", "scgpt/data_collator.py")):
        m = types.ModuleType(mod)
        m.__package__ = "scgpt"
        m.__file__ = str(root / rel)
        sys.modules[mod] = m
        exec(compile(_scgpt_source(root, rel), str(root / rel), "exec"), m.__dict__)
        setattr(pkg, mod.split(".")[1], m)
    return sys.modules["scgpt.data_collator"].DataCollator


def load_rows(path: Path, gene_key: str | None) -> list[dict]:
    import anndata as ad

    from fm.tokenizer import CellTokenizer

    tok = CellTokenizer(gene_key=gene_key) if gene_key else CellTokenizer()
    cells = tok.encode(ad.read_h5ad(path))
    return [cells[i] for i in range(len(cells))]


def scgpt_examples(batch: list[dict], cls_id: int, pad_value: float) -> list[dict]:
    import torch

    return [{"genes": torch.from_numpy(np.concatenate([[cls_id], r["gene_ids"]]).astype(np.int64)),
             "expressions": torch.from_numpy(np.concatenate([[pad_value], r["counts"]]).astype(np.float32))}
            for r in batch]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scgpt", default=str(MIRROR) if MIRROR.exists() else None,
                   help="scGPT checkout or git directory (default: the mirror, if present); 'none' = scgpt_collate")
    p.add_argument("--files", default="pbmc3k,kang,citeseq")
    p.add_argument("--data", default=None, help="directory of the h5ad files (default: fm.paths.data_dir()/h5ad)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-genes", type=int, default=1200)
    p.add_argument("--mask-ratio", type=float, default=0.4)
    p.add_argument("--reps", type=int, default=5, help="interleaved repetitions; each is one pass over all cells")
    p.add_argument("--threads", default="1", help="comma-separated collator thread counts for the compiled path "
                   "(fm._kernels.THREADS, i.e. FM_COLLATOR_THREADS): one column each, run interleaved")
    args = p.parse_args()

    import torch

    from fm import _kernels
    from fm.data.collator import CellCollator
    from fm.paths import data_dir

    data = Path(args.data) if args.data else data_dir() / "h5ad"
    scgpt_root = Path(args.scgpt) if args.scgpt and args.scgpt != "none" else None
    baseline = "scGPT DataCollator" if scgpt_root else "scgpt_collate (transcription)"
    if scgpt_root:
        DataCollator = load_scgpt_collator(scgpt_root)
        # scGPT's pretraining settings (examples/pretrain.py): <cls> kept first, max_length counts it
        scgpt = DataCollator(do_padding=True, pad_token_id=0, pad_value=-2, do_mlm=True, do_binning=True,
                             mlm_probability=args.mask_ratio, mask_value=-1, max_length=args.max_genes + 1,
                             sampling=True, keep_first_n_tokens=1)
    else:
        sys.path.insert(0, str(Path(__file__).parent))
        from bench_corpus import scgpt_collate
    ours = CellCollator(max_genes=args.max_genes, mask_ratio=args.mask_ratio, train=True)

    _kernels.ENABLED = True
    t = time.perf_counter()
    ours([{"gene_ids": np.arange(3, dtype=np.int32), "counts": np.ones(3, np.float32), "conditions": [],
           "index": 0}])
    first_call = time.perf_counter() - t

    print(f"# collator throughput (tokenised cells/s), batch {args.batch_size}, max_genes {args.max_genes}, "
          f"mask_ratio {args.mask_ratio}, {args.reps} interleaved repetitions, median; baseline: {baseline}"
          f"{' from ' + str(scgpt_root) if scgpt_root else ''}; torch threads {torch.get_num_threads()}; "
          f"first compiled call in this process (JIT compile or on-disk cache load) {first_call:.2f} s\n")
    threads = [int(t) for t in args.threads.split(",")]
    compiled = [f"compiled{t}" for t in threads]
    label = {c: "ours compiled" + (f" ({t} thr)" if len(threads) > 1 or t != 1 else "") for c, t in zip(compiled, threads)}
    print(f"| file | cells | genes/cell | {baseline} | ours numpy | " + " | ".join(label[c] for c in compiled)
          + " | numpy / baseline | " + " | ".join(f"{label[c][5:]} / baseline" for c in compiled)
          + " | compiled / numpy |")
    print("| --- | ---: | ---: | ---: | ---: | " + " | ".join("---:" for _ in compiled) + " | ---: | "
          + " | ".join("---:" for _ in compiled) + " | ---: |")
    for name in args.files.split(","):
        fname, gene_key = FILES[name]
        rows = load_rows(data / fname, gene_key)
        bs = args.batch_size
        batches = [rows[i:i + bs] for i in range(0, len(rows) - bs + 1, bs)]
        n_cells = len(batches) * bs
        rates = {"base": [], "numpy": [], **{c: [] for c in compiled}}
        for rep in range(args.reps + 1):  # rep 0: warm-up, not counted
            for method in rates:
                if method == "base":
                    if scgpt_root:
                        inputs = [scgpt_examples(b, 1, -2.0) for b in batches]  # fresh: binned in place
                        fn = scgpt
                    else:
                        rng = np.random.default_rng(rep)
                        inputs = batches
                        def fn(b, rng=rng):
                            return scgpt_collate(b, args.max_genes, mask_ratio=args.mask_ratio, rng=rng)
                else:
                    _kernels.ENABLED = method != "numpy"
                    _kernels.THREADS = int(method[8:]) if method != "numpy" else 1
                    inputs, fn = batches, ours
                t = time.perf_counter()
                for b in inputs:
                    fn(b)
                dt = time.perf_counter() - t
                if rep:
                    rates[method].append(n_cells / dt)
        med = {k: float(np.median(v)) for k, v in rates.items()}
        genes = np.mean([len(r["gene_ids"]) for r in rows])
        print(f"| {name} | {n_cells} | {genes:.0f} | {med['base']:,.0f} | {med['numpy']:,.0f} | "
              + " | ".join(f"{med[c]:,.0f}" for c in compiled) + f" | {med['numpy'] / med['base']:.1f}x | "
              + " | ".join(f"{med[c] / med['base']:.1f}x" for c in compiled)
              + f" | {med[compiled[0]] / med['numpy']:.1f}x |", flush=True)
    load = os.getloadavg()
    print(f"\nload average at the end: {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} on {os.cpu_count()} CPUs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
