"""Core speed benchmark of the scfm stack: tokenization, embedding and training throughput.

On real cells (FM_DATA_DIR/h5ad; a generated dataset, with a printed note, when a file is absent):

1. Tokenization, cells/s: ``CellTokenizer.encode`` end to end (gene matching + validation + CSR);
   the training ``CellCollator`` over the encoded cells (binning + gene sampling + masking +
   padding); ``bin_csr`` alone; scGPT's per-cell reference binning (``scgpt_binning_reference``,
   one dense row at a time, rows densified beforehand as scGPT does); speed-ups over the reference.
2. Embedding, cells/s: ``fm.embed`` end to end with a randomly initialised model.
3. Training: forward + backward + grad-norm clip + AdamW step of ``ScFMForMaskedExpression`` on
   pre-collated training batches, after warm-up steps; real gene tokens/s (attention_mask sum) and
   cells/s; on CUDA also MFU; peak memory (CUDA: max_memory_allocated; CPU: peak RSS of the process
   during the measurement, reset through /proc/self/clear_refs).

Model sizes, max_genes, batch size and lr come from recipes/pretrain/<config>.yaml, so the numbers
track the recipes. Every measurement is time-boxed (a minimum number of repeats and of seconds).

    python eval/perf/bench_core.py --configs debug,base --precisions fp32,bf16 --device cpu
    python eval/perf/bench_core.py --device cuda --csv perf_h100.csv
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import gc
import os
import resource
import time
from dataclasses import dataclass

import anndata as ad
import numpy as np
import torch
from torch import nn

import fm
from fm.binning import bin_csr, scgpt_binning_reference
from fm.config import load_config
from fm.data.collator import CellCollator
from fm.paths import data_dir, recipe_path
from fm.pretrain import build_model
from fm.synthetic import synthetic_anndata
from fm.tokenizer import CellTokenizer

# (label, file in data_dir()/h5ad, gene_key, genes of the synthetic fallback)
PBMC3K = ("pbmc3k-hvg2000", "pbmc3k_seurat_hvg2000_labeled.h5ad", None, 2000)
CITESEQ = ("citeseq-pbmc1k-36k", "citeseq_pbmc1k_10x_scarf.h5ad", "gene_ids", 20000)
# Dense peak TFLOP/s of an H100/H200 SXM: bf16 989; fp32 67 (IEEE, PyTorch's default), 495 if TF32 is on.
PEAK_TFLOPS = {"bf16": 989.0, "fp32": 67.0, "tf32": 495.0}
BIG_MODEL = 10e6  # non-embedding parameters above which CPU training uses batch 4 and fewer steps
COLUMNS = ["config", "data", "precision", "tokens/cell", "encode cells/s", "collate cells/s",
           "bin_csr cells/s", "scGPT ref cells/s", "collate x ref", "bin_csr x ref", "embed cells/s",
           "embed n", "train batch", "train tokens/s", "train cells/s", "MFU %", "peak mem MiB"]


@dataclass
class Budget:
    tok_s: float  # seconds per tokenization measurement (at least)
    embed_s: float  # target seconds of the measured fm.embed call
    train_s: float  # seconds of measured training steps (at least) ...
    train_max_s: float  # ... and at most, once one step is done
    steps: int  # measured training steps, at least (small models; big CPU models use fewer)
    warmup: int


def repeat(fn, min_reps: int, min_s: float, max_s: float = float("inf"), sync=lambda: None):
    """Call fn() until >= min_reps calls and >= min_s seconds, or max_s seconds: (results, seconds)."""
    out, t0 = [], time.perf_counter()
    while True:
        out.append(fn())
        sync()
        dt = time.perf_counter() - t0
        if (len(out) >= min_reps and dt >= min_s) or dt >= max_s:
            return out, dt


def autocast(device: str, precision: str):
    """bf16: torch.autocast on the device (weights stay fp32, as in mixed-precision training)."""
    return torch.autocast(device, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def load_data(spec):
    label, name, gene_key, n_genes = spec
    path = data_dir() / "h5ad" / name
    if path.is_file():
        return label, ad.read_h5ad(path), gene_key
    print(f"note: {path} not found; using fm.synthetic.synthetic_anndata(n_genes={n_genes}) instead")
    return f"synthetic-{n_genes}g", synthetic_anndata(n_cells=800, n_genes=n_genes), None


def bench_dataset(adata, gene_key, b: Budget) -> dict:
    """Precision- and config-independent measurements: encode, bin_csr, scGPT reference."""
    tok = CellTokenizer(gene_key=gene_key)
    res, dt = repeat(lambda: tok.encode(adata), 3, b.tok_s)
    cells = res[-1]
    out = {"cells": cells, "encode": len(cells) * len(res) / dt}
    res, dt = repeat(lambda: bin_csr(cells.indptr, cells.counts, tok.n_bins), 3, b.tok_s)
    out["bin_csr"] = len(cells) * len(res) / dt
    keep = tok.match_genes(adata).vocab_ids >= 0
    dense = adata.X[:, keep]
    dense = np.asarray(dense.toarray() if hasattr(dense, "toarray") else dense, dtype=np.float32)
    rng = np.random.default_rng(0)

    def reference_pass():
        for row in dense:
            scgpt_binning_reference(row, tok.n_bins, rng)
        return len(dense)
    res, dt = repeat(reference_pass, 1, b.tok_s)
    out["reference"] = sum(res) / dt
    return out


def bench_collate(cells, max_genes: int, batch: int, b: Budget) -> float:
    rows = [cells[i] for i in range(len(cells))]
    collator = CellCollator(max_genes=max_genes, train=True)

    def collate_all():
        for lo in range(0, len(rows), batch):
            collator(rows[lo:lo + batch])
        return len(rows)
    res, dt = repeat(collate_all, 3, b.tok_s)
    return sum(res) / dt


def bench_embed(model, adata, gene_key, precision, device, batch, min_cells, b: Budget, sync):
    """fm.embed cells/s: a small warm-up call sizes one measured call of about b.embed_s seconds."""
    model.cell_tokenizer = CellTokenizer(gene_key=gene_key)

    def run(n: int) -> float:
        sub = adata[:n].copy()
        t0 = time.perf_counter()
        with autocast(device, precision):
            fm.embed(sub, model, batch_size=batch)
        sync()
        return time.perf_counter() - t0

    n = min(adata.n_obs, 2 if device == "cpu" else batch)
    dt = run(n)  # warm-up; it overestimates the time per cell, so grow n while a call is too short
    while True:
        n = int(np.clip(n * b.embed_s / dt, min(min_cells, adata.n_obs), adata.n_obs))
        dt = run(n)
        if dt >= b.embed_s / 2 or n == adata.n_obs:
            return n / dt, n


def non_embedding_params(model: nn.Module) -> int:
    emb = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in emb)


def peak_tflops(device: str, precision: str, override: float | None) -> float | None:
    if override:
        return override
    if device != "cuda" or not any(g in torch.cuda.get_device_name() for g in ("H100", "H200")):
        return None
    tf32 = torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"
    return PEAK_TFLOPS["tf32" if precision == "fp32" and tf32 else precision]


def bench_train(model, cells, max_genes, batch, lr, precision, device, steps, warmup, b: Budget, sync, peak):
    """Training step throughput on pre-collated batches (collation is measured separately)."""
    collator = CellCollator(max_genes=max_genes, train=True, pad_token_id=model.config.pad_token_id)
    n_batches = max(1, min(8, len(cells) // batch))
    batches = [collator([cells[i] for i in range(k * batch, min((k + 1) * batch, len(cells)))])
               for k in range(n_batches)]
    n_params, cfg = non_embedding_params(model), model.config
    stats = []  # per batch: (real tokens, cells, model FLOPs)
    for bt in batches:
        tokens = int(bt["attention_mask"].sum())
        seq = bt["gene_ids"].shape[1] + cfg.n_prefix
        stats.append((tokens, bt["gene_ids"].shape[0],
                      6 * n_params * tokens + 12 * cfg.n_layers * cfg.d_model * seq * tokens))
    batches = [{k: v.to(device) for k, v in bt.items()} for bt in batches]
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    counter = iter(range(10**9))

    def step():
        i = next(counter) % len(batches)
        with autocast(device, precision):
            loss = model(**batches[i]).loss
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return stats[i]

    for _ in range(warmup):
        step()
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        with contextlib.suppress(OSError):  # resets the peak RSS (Linux >= 4.0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
    res, dt = repeat(step, steps, b.train_s, b.train_max_s, sync)
    tokens, n_cells, flops = (sum(x) for x in zip(*res))
    if device == "cuda":
        mem = torch.cuda.max_memory_allocated() / 2**20
    else:
        mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    del opt
    model.zero_grad(set_to_none=True)
    return {"tokens": tokens / dt, "cells": n_cells / dt, "mem": mem,
            "mfu": 100 * flops / dt / (peak * 1e12) if peak else None}


def fmt(x) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, str):
        return x
    if isinstance(x, (int, np.integer)) or abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.3g}"


def machine_info(device: str) -> list[str]:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), cpu)
    lines = [f"date: {datetime.date.today()}",
             f"CPU: {cpu}, {os.cpu_count()} logical cores; torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads; load average at start {os.getloadavg()[0]:.2f}"]
    if device == "cuda":
        lines.append(f"GPU: {torch.cuda.get_device_name()}, CUDA {torch.version.cuda}")
    return lines


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="debug,base", help="pretrain recipe names, comma-separated")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="shorter measurements (smoke test)")
    p.add_argument("--wide-configs", default="base",
                   help="configs also run on the 36k-gene citeseq file (cells fill max_genes)")
    p.add_argument("--peak-tflops", type=float, default=None, help="GPU peak for MFU (default: H100/H200)")
    p.add_argument("--csv", default=None, help="also write the table to this CSV file")
    args = p.parse_args(argv)
    device, cuda = args.device, args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    b = Budget(0.5, 1.0, 1.0, 15.0, 2, 1) if args.quick else Budget(2.0, 3.0, 3.0, 60.0, 5, 3)
    if cuda:
        b.steps, b.warmup = 2 * b.steps, 2 * b.warmup
    configs = [c for c in args.configs.split(",") if c]
    precisions = [x for x in args.precisions.split(",") if x]
    if set(precisions) - {"fp32", "bf16"}:
        p.error(f"--precisions: fp32 and/or bf16, got {args.precisions}")
    wide = set(args.wide_configs.split(",")) & set(configs)
    print("\n".join(machine_info(device)), flush=True)
    wall0, cpu0 = time.perf_counter(), time.process_time()

    datasets = {spec[0]: load_data(spec) for spec in [PBMC3K] + ([CITESEQ] if wide else [])}
    dataset_stats, rows = {}, []
    for name in configs:
        cfg = load_config(recipe_path(name))
        max_genes, lr = cfg.data.max_genes, cfg.train.lr
        model = build_model(cfg, CellTokenizer()).to(device)
        big = non_embedding_params(model) > BIG_MODEL and not cuda
        train_batch = 4 if big else cfg.train.batch_size
        steps, warmup = (max(1, b.steps // 2), 1) if big else (b.steps, b.warmup)
        for spec in [PBMC3K] + ([CITESEQ] if name in wide else []):
            label, adata, gene_key = datasets[spec[0]]
            if label not in dataset_stats:
                dataset_stats[label] = bench_dataset(adata, gene_key, b)
            ds = dataset_stats[label]
            cells = ds["cells"]
            tokens_per_cell = float(np.minimum(np.diff(cells.indptr), max_genes).mean())
            collate = bench_collate(cells, max_genes, cfg.train.batch_size, b)
            for precision in precisions:
                print(f"... {name} / {label} / {precision}", flush=True)
                emb, n_emb = bench_embed(model, adata, gene_key, precision, device, 256 if cuda else 64,
                                         64 if cuda else 8, b, sync)
                tr = bench_train(model, cells, max_genes, train_batch, lr, precision, device, steps, warmup, b,
                                 sync, peak_tflops(device, precision, args.peak_tflops))
                rows.append(dict(zip(COLUMNS, [
                    name, label, precision, tokens_per_cell, ds["encode"], collate, ds["bin_csr"],
                    ds["reference"], collate / ds["reference"], ds["bin_csr"] / ds["reference"], emb, n_emb,
                    train_batch, tr["tokens"], tr["cells"], tr["mfu"], tr["mem"]])))
                gc.collect()
        del model
        gc.collect()

    share = 100 * (time.process_time() - cpu0) / ((time.perf_counter() - wall0) * torch.get_num_threads())
    print("\n| " + " | ".join(COLUMNS) + " |")
    print("|" + "|".join("---" if c in COLUMNS[:3] else "---:" for c in COLUMNS) + "|")
    for r in rows:
        print("| " + " | ".join(fmt(r[c]) for c in COLUMNS) + " |")
    peak_note = "MFU: n/a (CPU)" if not cuda else (
        "MFU peak: " + ", ".join(f"{x} {peak_tflops(device, x, args.peak_tflops)} TFLOP/s" for x in precisions))
    print(f"\nmemory: {'torch.cuda.max_memory_allocated' if cuda else 'process peak RSS'} during training; "
          f"{peak_note}; FLOPs = 6 x non-embedding params x real tokens + 12 x layers x d_model x padded "
          "length x real tokens. Tokenization columns do not depend on precision (measured once). "
          f"Load average at end {os.getloadavg()[0]:.2f}; this process got {share:.0f}% of "
          f"{torch.get_num_threads()} threads' wall time (below 100% on CPU: other load, or serial Python).")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        print(f"wrote {args.csv}")
    return rows


if __name__ == "__main__":
    main()
