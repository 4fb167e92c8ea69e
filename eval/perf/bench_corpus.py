"""Corpus benchmarks: build cost and peak memory against corpus size, loader throughput, and our
vectorised collator against a per-cell reimplementation of scGPT's collator binning.

1. Build: `fm corpus synth` (generate negative-binomial cells + write shards) and `fm corpus build`
   (read h5ad files backed, validate, map genes, write shards; the inputs are K links to one
   10⁴-cell synthetic h5ad, so 10⁶ cells need no 10⁶-cell file) at each size. Every build runs in a
   fresh process; peak RSS is the largest of that process and its workers (getrusage maxrss).
2. Loader: `CorpusDataset.batch_sampler` + torch DataLoader + `CellCollator` (train: bin, sample
   max_genes, mask, pad) over the largest synthetic corpus, in tokenized cells/s; also reading alone.
3. Baseline: the same cells through `scgpt_collate` below — scGPT's DataCollator logic one cell at a
   time in numpy (per-cell quantile binning with random ties, random truncation to max_length,
   random masking, padding), rows already in memory. Speed-up = ours / baseline.

    nice python eval/perf/bench_corpus.py --sizes 10000,100000,1000000 --workers 2 --out /tmp/bench_corpus
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

_CHILD = r"""
import json, resource, sys, time
args = json.loads(sys.argv[1])
from fm.data.corpus import build_corpus
from fm.data.synth_corpus import synth_corpus
t = time.perf_counter()  # imports (torch via fm, ~5 s) are not part of the build
if args["mode"] == "synth":
    m = synth_corpus(args["out"], args["n"], n_genes=args["genes"], workers=args["workers"], shard_size=args["shard"])
else:
    m = build_corpus(args["inputs"], args["out"], workers=args["workers"], shard_size=args["shard"])
dt = time.perf_counter() - t
rss = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
print(json.dumps({"n_cells": m["n_cells"], "seconds": dt, "peak_rss_mb": rss / 1024, "nnz": m["nnz"]}))
"""


def run_build(mode: str, n: int, out: Path, workers: int, genes: int, shard: int, inputs=None) -> dict:
    args = {"mode": mode, "n": n, "out": str(out), "workers": workers, "genes": genes, "shard": shard,
            "inputs": [str(p) for p in inputs or []]}
    res = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(args)], capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(res.stderr[-3000:])
    row = json.loads(res.stdout.strip().splitlines()[-1])
    row["disk_mb"] = sum(p.stat().st_size for p in out.glob("*.arrow")) / 2**20
    return row


def h5ad_inputs(root: Path, n: int, genes: int) -> list[Path]:
    """n/10⁴ links to one 10⁴-cell synthetic h5ad (distinct paths = distinct sources)."""
    from fm.synthetic import synthetic_anndata

    base = root / "synthetic_10k.h5ad"
    if not base.is_file():
        synthetic_anndata(n_cells=10_000, n_genes=genes, seed=1).write_h5ad(base)
    links = root / f"links_{n}"
    links.mkdir(exist_ok=True)
    paths = []
    for i in range(max(n // 10_000, 1)):
        p = links / f"part_{i:04d}.h5ad"
        if not p.exists():
            p.symlink_to(base)
        paths.append(p)
    return paths


def scgpt_collate(rows: list[dict], max_length: int, n_bins: int = 51, mask_ratio: float = 0.4,
                  rng: np.random.Generator | None = None):
    """scGPT's DataCollator (do_binning, sampling, mlm masking, padding), one cell at a time."""
    import torch

    from fm.binning import scgpt_binning_reference

    rng = rng or np.random.default_rng(0)
    genes_out, values_out, labels_out = [], [], []
    for row in rows:
        genes, values = np.asarray(row["gene_ids"], np.int64), np.asarray(row["counts"], np.float32)
        values = scgpt_binning_reference(values, n_bins, rng).astype(np.float32)
        if len(genes) > max_length:  # _sample_or_truncate_plus_pad: random subset
            idx = rng.choice(len(genes), max_length, replace=False)
            genes, values = genes[idx], values[idx]
        labels = values.copy()
        n_mask = int(np.ceil(len(values) * mask_ratio))  # random_mask_value
        values[rng.permutation(len(values))[:n_mask]] = -1
        pad = max_length - len(genes)
        genes_out.append(torch.from_numpy(np.concatenate([genes, np.zeros(pad, np.int64)])))
        values_out.append(torch.from_numpy(np.concatenate([values, np.full(pad, -2, np.float32)])))
        labels_out.append(torch.from_numpy(np.concatenate([labels, np.full(pad, -2, np.float32)])))
    return torch.stack(genes_out), torch.stack(values_out), torch.stack(labels_out)


def bench_loader(corpus: Path, batch_size: int, max_genes: int, seconds: float) -> dict:
    from torch.utils.data import DataLoader

    from fm.data.collator import CellCollator
    from fm.data.streaming import CorpusDataset

    ds = CorpusDataset(corpus)
    sampler = ds.batch_sampler(batch_size, 1, 0, seed=0, epoch=0)
    collator = CellCollator(max_genes=max_genes, train=True)
    out = {}
    for label, fn in (("read", lambda rows: rows), ("read+collate", collator)):
        loader = DataLoader(ds, batch_sampler=sampler, collate_fn=fn)
        n, t = 0, time.perf_counter()
        for batch in loader:
            n += batch_size
            if time.perf_counter() - t > seconds:
                break
        out[label] = n / (time.perf_counter() - t)
    # the same cells in memory through both collators
    rows = ds.__getitems__(next(iter(sampler)))
    rows = [dict(r, gene_ids=np.array(r["gene_ids"]), counts=np.array(r["counts"])) for r in rows]
    for label, fn in (("ours collate", lambda: collator(rows)), ("scGPT per-cell collate", lambda: scgpt_collate(rows, max_genes))):
        n, t = 0, time.perf_counter()
        while time.perf_counter() - t < seconds / 2:
            fn()
            n += len(rows)
        out[label] = n / (time.perf_counter() - t)
    from fm.binning import bin_csr, scgpt_binning_reference
    indptr = np.concatenate([[0], np.cumsum([len(r["counts"]) for r in rows])])
    flat = np.concatenate([r["counts"] for r in rows])
    rng = np.random.default_rng(0)
    for label, fn in (("ours bin_csr (binning only)", lambda: bin_csr(indptr, flat)),
                      ("scGPT per-cell binning only", lambda: [scgpt_binning_reference(r["counts"], 51, rng) for r in rows])):
        n, t = 0, time.perf_counter()
        while time.perf_counter() - t < seconds / 2:
            fn()
            n += len(rows)
        out[label] = n / (time.perf_counter() - t)
    out["mean_genes_per_cell"] = float(np.mean([len(r["gene_ids"]) for r in rows]))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="10000,100000,1000000")
    p.add_argument("--modes", default="synth,build")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--shard-size", type=int, default=10_000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-genes", type=int, default=1200)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--out", default="/tmp/bench_corpus", help="scratch directory (corpora are deleted after use)")
    p.add_argument("--keep", action="store_true", help="keep the corpora")
    p.add_argument("--loader-only", default=None, help="only the loader benchmark, on this corpus")
    args = p.parse_args()
    if args.loader_only:
        return print_loader(Path(args.loader_only), args)
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"# corpus build, {args.workers} workers, {args.genes} genes, shard {args.shard_size} cells, "
          f"{os.cpu_count()} CPUs\n")
    print("| mode | cells | seconds | cells/s | peak RSS (MB) | nnz/cell | shards on disk (MB) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    loader_corpus = None
    for mode in args.modes.split(","):
        for n in sizes:
            out = root / f"{mode}_{n}"
            if out.exists():
                subprocess.run(["rm", "-rf", str(out)], check=True)
            inputs = h5ad_inputs(root, n, args.genes) if mode == "build" else None
            r = run_build(mode, n, out, args.workers, args.genes, args.shard_size, inputs)
            print(f"| {mode} | {r['n_cells']} | {r['seconds']:.1f} | {r['n_cells'] / r['seconds']:.0f} | "
                  f"{r['peak_rss_mb']:.0f} | {r['nnz'] / r['n_cells']:.0f} | {r['disk_mb']:.0f} |", flush=True)
            if mode == "synth" and n == max(sizes):
                loader_corpus = out
            elif not args.keep:
                subprocess.run(["rm", "-rf", str(out)], check=True)
    if loader_corpus is not None:
        print_loader(loader_corpus, args)
        if not args.keep:
            subprocess.run(["rm", "-rf", str(loader_corpus)], check=True)
    return 0


def print_loader(corpus: Path, args) -> int:
    r = bench_loader(corpus, args.batch_size, args.max_genes, args.seconds)
    print(f"\n# loader on {corpus.name} (batch {args.batch_size}, max_genes {args.max_genes}, "
          f"{r['mean_genes_per_cell']:.0f} genes/cell)\n")
    print("| path | tokenized cells/s |\n| --- | ---: |")
    for k in ("read", "read+collate", "ours collate", "scGPT per-cell collate", "ours bin_csr (binning only)",
              "scGPT per-cell binning only"):
        print(f"| {k} | {r[k]:.0f} |")
    print(f"\nspeed-up, ours (read from corpus + collate) vs scGPT per-cell collate (rows in memory): "
          f"{r['read+collate'] / r['scGPT per-cell collate']:.1f}x; collate alone: "
          f"{r['ours collate'] / r['scGPT per-cell collate']:.1f}x; binning alone: "
          f"{r['ours bin_csr (binning only)'] / r['scGPT per-cell binning only']:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
