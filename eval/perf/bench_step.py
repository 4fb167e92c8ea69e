"""Training-step time split into forward / backward / optimizer, per AdamW implementation and gene-table size.

Whole-human size by default (d_model 512, 12 layers, 8 heads, d_ff 512: scGPT's released size), real cells
(pbmc3k; a generated file when the shared data is absent), training CellCollator batches, fp32 on CPU. The
implementations are timed interleaved (one step of each in turn, repeated), medians reported, so machine
load hits them alike. "full" = one gene row per vocabulary id (~136k, the table before compact tables),
"compact" = the file's genes (what pretraining builds now).

    python eval/perf/bench_step.py --batch-size 8 --max-genes 1200 --repeats 5
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from fm.configuration_scfm import ScFMConfig
from fm.data.collator import CellCollator
from fm.modeling_scfm import ScFMForMaskedExpression
from fm.tokenizer import CellTokenizer

IMPLEMENTATIONS = {"for-loop (torch default on CPU)": {"foreach": False}, "foreach": {"foreach": True},
                   "fused": {"fused": True}}


def cells(path: str | None, n: int):
    import anndata as ad

    from fm.paths import h5ad_path

    file = path or h5ad_path("pbmc3k_seurat_hvg2000_labeled.h5ad")
    if not __import__("os").path.exists(file):
        from fm.synthetic import synthetic_anndata

        print("(shared data absent: a generated dataset)")
        adata = synthetic_anndata(n_cells=n, n_genes=2000, seed=0)
    else:
        adata = ad.read_h5ad(file)[:n].copy()
    return CellTokenizer().encode(adata)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-genes", type=int, default=1200)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--d-ff", type=int, default=512)
    args = p.parse_args(argv)
    enc = cells(args.data, args.batch_size)
    batch = CellCollator(max_genes=args.max_genes, train=True)([enc[i] for i in range(len(enc))])
    genes = np.unique(enc.gene_ids)
    vocab = 136_000
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size} × "
          f"{batch['gene_ids'].shape[1]} tokens ({int(batch['attention_mask'].sum())} real), d_model {args.d_model}, "
          f"{args.layers} layers, d_ff {args.d_ff}, fp32\n")
    print("| gene table | AdamW | forward s | backward s | optimizer s | step s |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for table_name, table in (("full (136k rows)", None), (f"compact ({len(genes) + 16} rows)",
                                                            np.union1d(np.arange(16), genes).tolist())):
        torch.manual_seed(0)
        config = ScFMConfig(vocab_size=vocab, gene_table=table, d_model=args.d_model, n_layers=args.layers,
                            n_heads=8, d_ff=args.d_ff, dropout=0.0, max_genes=args.max_genes)
        models = {k: ScFMForMaskedExpression(config) for k in IMPLEMENTATIONS}
        for m in models.values():
            m.load_state_dict(models["fused"].state_dict())
        opts = {k: torch.optim.AdamW(models[k].parameters(), lr=1e-4, **kw) for k, kw in IMPLEMENTATIONS.items()}
        times = {k: [] for k in IMPLEMENTATIONS}
        for rep in range(args.repeats + 1):
            for k in IMPLEMENTATIONS:
                t0 = time.perf_counter()
                loss = models[k](**batch).loss
                t1 = time.perf_counter()
                loss.backward()
                t2 = time.perf_counter()
                opts[k].step()
                opts[k].zero_grad(set_to_none=True)
                t3 = time.perf_counter()
                if rep:  # the first round warms up (allocations, optimizer state)
                    times[k].append((t1 - t0, t2 - t1, t3 - t2))
        for k, v in times.items():
            f, b, o = (statistics.median(x[i] for x in v) for i in range(3))
            print(f"| {table_name} | {k} | {f:.3f} | {b:.3f} | {o:.3f} | {f + b + o:.3f} |")
        del models, opts


if __name__ == "__main__":
    main()
