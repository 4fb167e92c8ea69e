"""Padding (issue 13): share of padding tokens and throughput, bucketed/grouped vs plain batches.

On the three small real files (FM_DATA_DIR/h5ad), a randomly initialised model (fp32, CPU by default;
d_model 256, 4 layers, 8 heads, d_ff 1024, max_genes 1200, zero_fraction 0.25, batch 32):

- padding share (exact, over the whole file, no model run): 1 - real gene tokens / padded tokens of
  every batch of the plan. Embed plans: `run_batched`'s batches (chunks of 4096 cells) in row order
  padded to a multiple of 8 (the engine before issue 13), in row order unrounded, and length-bucketed.
  Training plans (one epoch, training collator): ShardedBatchSampler (random), LengthGroupedBatchSampler
  (grouped), and packing (cells of the random order concatenated into rows of max_genes + 1 tokens,
  first fit, each cell with its own <cls>).
- speed, interleaved (mode A batch, mode B batch, … repeated) on batches drawn at random from each plan:
  embed cells/s (backbone forward, inference mode) for row order pad 8, bucketed pad 1, bucketed pad 8
  (the same batches rounded up to 8: does alignment buy anything on CPU?); training real tokens/s of a
  full step (ScFMForMaskedExpression loss, backward, AdamW) for random vs grouped batches; and backbone
  forward + backward (embeddings → blocks → norm → GEP head, MSE on the masked values) for grouped
  batches vs packed rows with a block-diagonal SDPA boolean mask (B, 1, T, T).

    OMP_NUM_THREADS=1 python eval/perf/bench_padding.py            # the table in RESULTS.md
    python eval/perf/bench_padding.py --embed-batches 2 --train-steps 1 --files pbmc3k_seurat_hvg2000_labeled.h5ad
"""
from __future__ import annotations

import argparse
import time

import anndata as ad
import numpy as np
import torch

from fm.config import RunConfig
from fm.data.collator import CellCollator, collator_settings
from fm.inference import inference_collator
from fm.paths import data_dir
from fm.pretrain import build_model, build_tokenizer, encoded_genes
from fm.train import LengthGroupedBatchSampler, ShardedBatchSampler

FILES = ["pbmc3k_seurat_hvg2000_labeled.h5ad", "kang2018_muscat_1556c_labeled.h5ad", "citeseq_pbmc1k_10x_scarf.h5ad"]


def padding_share(batches, lengths, multiple=1):
    real = sum(int(lengths[b].sum()) for b in batches)
    padded = sum(-(-int(lengths[b].max()) // multiple) * multiple * len(b) for b in batches)
    return 1 - real / padded


def embed_plans(lengths, batch, chunk=4096):
    plain, bucketed = [], []
    for lo in range(0, len(lengths), chunk):
        idx = np.arange(lo, min(lo + chunk, len(lengths)))
        order = idx[np.argsort(lengths[idx], kind="stable")]
        plain += [idx[i:i + batch] for i in range(0, idx.size, batch)]
        bucketed += [order[i:i + batch] for i in range(0, idx.size, batch)]
    return plain, bucketed


def pack(order, lengths, capacity):
    """First fit over `order`: rows of cells whose tokens (+ 1 prefix each) fit in `capacity`."""
    rows, fill = [], []
    for i in order:
        need = int(lengths[i]) + 1
        for r, f in enumerate(fill):
            if f + need <= capacity:
                rows[r].append(i)
                fill[r] += need
                break
        else:
            rows.append([i])
            fill.append(need)
    return rows, fill


def packed_forward(model, batch, rows_of_cells, capacity):
    """Backbone over packed rows: per-cell prefix + real tokens concatenated, block-diagonal attention."""
    enc = model.scfm
    P = enc.config.n_prefix
    x = enc.embeddings(batch["gene_ids"], batch["values"], batch["condition_ids"])  # (B, P + L, D)
    real = torch.cat([torch.ones(x.shape[0], P, dtype=torch.bool), batch["attention_mask"]], 1)
    n = real.sum(1)
    R, D = len(rows_of_cells), x.shape[-1]
    T = max(int(sum(n[c] for c in cells)) for cells in rows_of_cells)
    seg = torch.full((R, T), -1, dtype=torch.long)
    where_b, where_t, dst_r, dst_t = [], [], [], []
    for r, cells in enumerate(rows_of_cells):
        t = 0
        for j, c in enumerate(cells):
            k = int(n[c])
            where_b.append(torch.full((k,), c)); where_t.append(torch.arange(k))
            dst_r.append(torch.full((k,), r)); dst_t.append(torch.arange(t, t + k))
            seg[r, t:t + k] = j
            t += k
    wb, wt, dr, dt = (torch.cat(v) for v in (where_b, where_t, dst_r, dst_t))
    packed = x.new_zeros(R, T, D).index_put((dr, dt), x[wb, wt])
    mask = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] >= 0)
    mask |= torch.eye(T, dtype=torch.bool)  # padding rows attend to themselves: no NaN
    mask = mask[:, None]
    for layer in enc.layers:
        packed = layer(packed, mask)
    packed = enc.norm(packed)
    out = x.new_zeros(x.shape).index_put((wb, wt), packed[dr, dt])
    return out


def backbone_loss(model, batch, hidden):
    P = model.scfm.config.n_prefix
    pred = model.gep_head(hidden[:, P:])
    target = batch["labels"] / (model.config.n_bins - 1)
    m = batch["masked_positions"]
    return ((pred - target)[m] ** 2).mean()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", default=",".join(FILES))
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--max-genes", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--embed-batches", type=int, default=2, help="timed batches per embed mode and file")
    ap.add_argument("--train-steps", type=int, default=2, help="timed steps per training mode and file")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    table = []
    for name in args.files.split(","):
        a = ad.read_h5ad(data_dir() / "h5ad" / name)
        cfg = RunConfig()
        cfg.model.d_model, cfg.model.n_layers, cfg.model.n_heads, cfg.model.d_ff = args.d_model, args.layers, 8, 4 * args.d_model
        cfg.data.max_genes = args.max_genes
        tok = build_tokenizer(cfg)
        cells = tok.encode(a)
        model = build_model(cfg, tok, encoded_genes(cells, len(tok.vocab)))
        inf = inference_collator(model, "cpu")
        inf8 = CellCollator(**collator_settings(model.config), train=False, pad_to_multiple_of=8)
        tr = CellCollator(**collator_settings(model.config), train=True, pad_to_multiple_of=1)
        li, lt = inf.token_counts(cells), tr.token_counts(cells)
        plain, bucketed = embed_plans(li, args.batch)
        random = [np.array(b) for b in ShardedBatchSampler(len(cells), args.batch, seed=0, epoch=0)]
        grouped = [np.array(b) for b in LengthGroupedBatchSampler(lt, args.batch, seed=0, epoch=0)]
        capacity = args.max_genes + model.config.n_prefix
        order = np.concatenate(random)
        packed_rows, fill = pack(order, lt, capacity)
        row = {"file": name.split("_")[0], "cells": len(cells), "mean tokens": float(li.mean()),
               "embed pad %: rows ×8": 100 * padding_share(plain, li, 8), "rows": 100 * padding_share(plain, li),
               "bucketed": 100 * padding_share(bucketed, li),
               "train pad %: random": 100 * padding_share(random, lt), "grouped": 100 * padding_share(grouped, lt),
               "packed": 100 * (1 - sum(lt[order]) / (len(packed_rows) * capacity)),
               "cells/row": len(order) / len(packed_rows)}

        # embed speed, interleaved
        enc = model.scfm.eval()
        picks = {"rows ×8": (plain, inf8), "bucketed": (bucketed, inf), "bucketed ×8": (bucketed, inf8)}
        chosen = {k: rng.choice(len(v[0]), args.embed_batches, replace=False) for k, v in picks.items()}
        # same bucketed batches for pad 1 and pad 8
        chosen["bucketed ×8"] = chosen["bucketed"]
        spent = {k: [0.0, 0] for k in picks}
        with torch.inference_mode():
            enc(**inf([cells[i] for i in bucketed[0]]))  # warm-up
            for j in range(args.embed_batches):
                for k, (plan, col) in picks.items():
                    b = col([cells[i] for i in plan[chosen[k][j]]])
                    t0 = time.perf_counter()
                    enc(**b)
                    spent[k][0] += time.perf_counter() - t0
                    spent[k][1] += b["gene_ids"].shape[0]
        for k, (t, n) in spent.items():
            row[f"embed cells/s {k}"] = n / t

        # training speed, interleaved: full step (random vs grouped), backbone fwd+bwd (grouped vs packed)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        tr_picks = {"random": random, "grouped": grouped}
        tchosen = {k: rng.choice(len(v), args.train_steps, replace=False) for k, v in tr_picks.items()}
        # packing: the cells of grouped batches' size worth of packed rows (same cells count per step)
        per_step = max(1, round(args.batch / row["cells/row"]))
        pchosen = rng.choice(len(packed_rows) - per_step, args.train_steps, replace=False)
        tok_time = {k: [0.0, 0] for k in ("step random", "step grouped", "bb grouped", "bb packed")}
        for j in range(args.train_steps + 1):  # the first round warms up
            for k in ("random", "grouped"):
                b = tr([cells[i] for i in tr_picks[k][tchosen[k][j % args.train_steps]]])
                t0 = time.perf_counter()
                loss = model(**b).loss
                loss.backward()
                opt.step(); opt.zero_grad(set_to_none=True)
                if j:
                    tok_time[f"step {k}"][0] += time.perf_counter() - t0
                    tok_time[f"step {k}"][1] += int(b["attention_mask"].sum())
            b = tr([cells[i] for i in grouped[tchosen["grouped"][j % args.train_steps]]])
            t0 = time.perf_counter()
            inputs = {k: b[k] for k in ("gene_ids", "values", "attention_mask", "condition_ids")}
            backbone_loss(model, b, model.scfm(**inputs).last_hidden_state).backward()
            if j:
                tok_time["bb grouped"][0] += time.perf_counter() - t0
                tok_time["bb grouped"][1] += int(b["attention_mask"].sum())
            model.zero_grad(set_to_none=True)
            rows = packed_rows[pchosen[j % args.train_steps]:pchosen[j % args.train_steps] + per_step]
            flat = [c for r in rows for c in r]
            b = tr([cells[i] for i in flat])
            pos = {c: i for i, c in enumerate(flat)}
            t0 = time.perf_counter()
            hidden = packed_forward(model, b, [[pos[c] for c in r] for r in rows], capacity)
            backbone_loss(model, b, hidden).backward()
            if j:
                tok_time["bb packed"][0] += time.perf_counter() - t0
                tok_time["bb packed"][1] += int(b["attention_mask"].sum())
            model.zero_grad(set_to_none=True)
        for k, (t, n) in tok_time.items():
            row[f"train tok/s {k}"] = n / t
        table.append(row)
        print(row, flush=True)

    keys = list(table[0])
    print("\n| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in table:
        print("| " + " | ".join(f"{v:.1f}" if isinstance(v, float) else str(v) for v in row.values()) + " |")


if __name__ == "__main__":
    main()
