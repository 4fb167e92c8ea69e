"""LoRA vs full fine-tuning (task.lora): trainable-parameter share, training-step time and peak memory, and
annotation macro-F1 on pbmc3k — so the choice of fine-tuning mode rests on numbers, not folklore.

Quality: exactly `fm eval eval/annotation.yaml`'s fm_finetune method (fm.eval.tasks.annotation: its seeded
stratified 70/30 split, HVGs from the train split, recipes/finetune/annotation.yaml with the suite's
caps.finetune budget, last weights, fm.annotate of the test cells, sklearn macro-F1), once as is and once
with task.lora.r added. Nothing is selected on the test split.

Cost: one training step (forward, backward, AdamW over the trainable parameters; batch of pbmc3k cells
through the LabeledCellCollator) timed in a fresh subprocess per mode (median of --repeats after 3 warm-up
steps), with the largest rise of the current RSS during training (activations + gradients + optimizer
state), for the checkpoint's size and for scGPT's size (d_model 512, 12 layers, random weights).

    OMP_NUM_THREADS=1 python eval/perf/bench_lora.py --model runs/eval_debug/model --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

PBMC = {"name": "pbmc3k", "file": "h5ad/pbmc3k_seurat_hvg2000_labeled.h5ad", "label_key": "cell_type",
        "split": {"kind": "random", "test_size": 0.3}}
WARMUP = 3
"""Untimed first steps (oneDNN and allocator warm-up make the first two several times slower)."""
SCGPT_SIZE = {"d_model": 512, "n_layers": 12, "n_heads": 8, "d_ff": 2048}


def quality(model: str, seeds: list[int], steps: int, r: int, output: Path, arms=("full", "lora"),
            lora_lr: float | None = None) -> list[dict]:
    """Test macro-F1 / accuracy of fm_finetune (full) and the same with task.lora.r=r (and train.lr=lora_lr:
    an lr chosen on validation cells, eval/sweeps/annotation_lr.py), per seed."""
    lora_mode = (f"lora r={r}", {"task.lora.r": r})
    if lora_lr is not None:
        lora_mode = (f"lora r={r} lr={lora_lr:g}", {"task.lora.r": r, "train.lr": lora_lr})
    modes = [m for m in (("full", {}), lora_mode) if m[0].split()[0] in arms]
    from fm.eval.context import EvalContext
    from fm.eval.tasks.annotation import _fm_finetune, prepare, score
    from fm.paths import data_dir

    rows = []
    for seed in seeds:
        p = None
        for mode, extra in modes:
            caps = {"n_hvg": 2000, "finetune": {"train.max_steps": steps, "train.eval_every": 0, **extra}}
            ctx = EvalContext(output / mode.replace(" ", "_").replace("=", ""), "cpu", [Path(model)], data_dir(), caps, controls=False)
            p = p or prepare(PBMC, seed, ctx)
            t0 = time.perf_counter()
            pred = _fm_finetune(p, ctx, Path(model))
            s = score(p, pred)
            log = (ctx.output_dir / "finetune" / f"annotation_{PBMC['name']}_seed{seed}_{ctx.model_label(Path(model))}"
                   / "train_log.csv").read_text().strip().splitlines()
            last = dict(zip(log[0].split(","), log[-1].split(",")))  # the loop's own clock: elapsed / steps
            rows.append({"mode": mode, "seed": seed, "macro_f1": s["macro_f1"], "accuracy": s["accuracy"],
                         "runtime_s": time.perf_counter() - t0,
                         "loop_step_s": float(last["elapsed_s"]) / int(last["step"])})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def interleaved_step_time(model: str, size: str, r: int, batch_size: int, max_genes: int, repeats: int) -> dict:
    """Median step time of full and LoRA fine-tuning, their steps alternated in one process, so machine load
    (shared cores) hits both alike; the separate-process numbers of step_cost give the memory."""
    setups = {mode: _setup(model, mode, size, r, batch_size, max_genes) for mode in ("full", "lora")}
    times = {mode: [] for mode in setups}
    for i in range(repeats + WARMUP):
        for mode, (net, opt, batches) in setups.items():
            t0 = time.perf_counter()
            net(**batches[i % len(batches)]).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times[mode].append(time.perf_counter() - t0)
    return {mode: statistics.median(t[WARMUP:]) for mode, t in times.items()}


def _setup(model: str, mode: str, size: str, r: int, batch_size: int, max_genes: int):
    """(model in train mode, AdamW over its trainable parameters, 4 training batches of pbmc3k cells)."""
    import anndata as ad
    import torch
    from transformers import AutoConfig

    from fm import lora
    from fm.config import LoraSettings
    from fm.data import LabeledCellCollator
    from fm.data.collator import collator_settings
    from fm.heads.annotation import ScFMForAnnotation
    from fm.paths import data_dir
    from fm.tokenizer import CellTokenizer
    from fm.train import _param_groups

    torch.set_num_threads(1)  # as fm eval (caps.threads): two threads on busy shared cores are several times slower
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(model)
    config.update({"num_labels": 9, "id2label": {i: str(i) for i in range(9)}, "label2id": {str(i): i for i in range(9)},
                   "max_genes": max_genes, **(SCGPT_SIZE if size == "scgpt" else {})})
    net = (ScFMForAnnotation(config) if size == "scgpt" else
           ScFMForAnnotation.from_pretrained(model, config=config))
    if mode != "full":
        net = lora.apply_lora(net, LoraSettings(r=r))
    adata = ad.read_h5ad(data_dir() / PBMC["file"], backed="r")[: batch_size * 4].to_memory()  # no peak from the file
    cells = CellTokenizer.from_pretrained(model).encode(adata)
    collator = LabeledCellCollator(**{**collator_settings(net.config), "max_genes": max_genes})
    batches = [collator([dict(cells[i], label=i % 9) for i in range(lo, lo + batch_size)])
               for lo in range(0, batch_size * 4, batch_size)]
    opt = torch.optim.AdamW(_param_groups(net, 0.01), lr=1e-3, fused=True)
    net.train()
    return net, opt, batches


def _rss_mb() -> float:
    """Current resident set size (Linux /proc; peak RSS is useless here: loading the model peaks higher)."""
    import os

    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def step_cost(model: str, mode: str, size: str, r: int, batch_size: int, max_genes: int, repeats: int) -> dict:
    """One mode's step time and memory (own process): the largest rise of the current RSS over its value before
    training, sampled after each forward (activations held) and each optimizer step (gradients, AdamW state)."""
    net, opt, batches = _setup(model, mode, size, r, batch_size, max_genes)
    n_train = sum(p.numel() for p in net.parameters() if p.requires_grad)
    n_all = sum(p.numel() for n, p in net.named_parameters() if ".lora_" not in n and "modules_to_save" not in n)
    rss0, rss_max, times = _rss_mb(), 0.0, []
    for i in range(repeats + WARMUP):
        t0 = time.perf_counter()
        loss = net(**batches[i % len(batches)]).loss
        rss_max = max(rss_max, _rss_mb())
        loss.backward()
        opt.step()
        rss_max = max(rss_max, _rss_mb())
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return {"mode": mode, "size": size, "batch_size": batch_size, "trainable": n_train, "params": n_all,
            "share": n_train / n_all, "step_s": statistics.median(times[WARMUP:]), "rss_before_mb": rss0,
            "peak_rss_mb": rss_max, "train_rss_mb": rss_max - rss0}


def summary(cost: list[dict], rows: list[dict]) -> str:
    import numpy as np

    lines = [("| size (batch) | mode | trainable params | share | grads + AdamW state (MB) | step time, interleaved (s) "
              "| step time, own process (s) | RSS in training (MB) | RSS added by training (MB) |"),
             "|---|---|---|---|---|---|---|---|---|"]
    for c in cost:  # fp32: a gradient and AdamW's two moments per trainable parameter = 12 bytes
        lines.append(f"| {c['size']} ({c['batch_size']}) | {c['mode']} | {c['trainable']:,} of {c['params']:,} | "
                     f"{100 * c['share']:.2f} % | {12 * c['trainable'] / 2**20:.1f} | {c['paired_step_s']:.3f} | {c['step_s']:.3f} | "
                     f"{c['peak_rss_mb']:.0f} | {c['train_rss_mb']:.0f} |")
    if rows:
        lines += ["", "| mode | test macro-F1 | test accuracy | training loop s/step | fine-tune + annotate (s) | seeds |",
                  "|---|---|---|---|---|---|"]
        for mode in dict.fromkeys(r["mode"] for r in rows):
            sel = [r for r in rows if r["mode"] == mode]
            f1, acc, step, t = (np.array([r[k] for r in sel]) for k in ("macro_f1", "accuracy", "loop_step_s", "runtime_s"))
            sd = (lambda x: x.std(ddof=1) if len(x) > 1 else 0.0)
            lines.append(f"| {mode} | {f1.mean():.3f} ± {sd(f1):.3f} | {acc.mean():.3f} ± {sd(acc):.3f} | "
                         f"{step.mean():.3f} ± {sd(step):.3f} | {t.mean():.0f} | {len(sel)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="runs/eval_debug/model")
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=300, help="fine-tuning budget (eval/annotation.yaml's cpu caps)")
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--scgpt-batch-size", type=int, default=4, help="step-cost batch at scGPT's size (1 CPU core)")
    ap.add_argument("--max-genes", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--sizes", nargs="*", default=["checkpoint", "scgpt"])
    ap.add_argument("--output", default="runs/bench_lora")
    ap.add_argument("--arms", nargs="*", default=["full", "lora"], help="quality arms to run")
    ap.add_argument("--lora-lr", type=float, help="train.lr of the LoRA arm (default: the recipe's, as full)")
    ap.add_argument("--step-cost", nargs=2, metavar=("MODE", "SIZE"), help=argparse.SUPPRESS)  # the subprocess
    args = ap.parse_args()
    if args.step_cost:
        print(json.dumps(step_cost(args.model, *args.step_cost, args.r, args.batch_size, args.max_genes,
                                   args.repeats)))
        return
    cost = []
    for size in args.sizes:
        batch = args.scgpt_batch_size if size == "scgpt" else args.batch_size
        paired = interleaved_step_time(args.model, size, args.r, batch, args.max_genes, args.repeats)
        for mode in ("full", f"lora r={args.r}"):
            out = subprocess.run([sys.executable, __file__, "--model", args.model, "--r", str(args.r),
                                  "--batch-size", str(args.scgpt_batch_size if size == "scgpt" else args.batch_size),
                                  "--max-genes", str(args.max_genes),
                                  "--repeats", str(args.repeats), "--step-cost", mode.split()[0], size],
                                 check=True, capture_output=True, text=True).stdout
            cost.append({**json.loads(out.strip().splitlines()[-1]), "mode": mode,
                         "paired_step_s": paired[mode.split()[0]]})
            print(json.dumps(cost[-1]), flush=True)
    rows = (quality(args.model, args.seeds, args.steps, args.r, Path(args.output), args.arms, args.lora_lr)
            if args.seeds else [])
    print(summary(cost, rows))


if __name__ == "__main__":
    main()
