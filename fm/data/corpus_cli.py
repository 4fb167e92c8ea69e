"""`fm corpus build | synth | info`: the corpus subcommands (wired into fm/cli.py by one call)."""
from __future__ import annotations

import json
import time


def _summary(manifest: dict, seconds: float) -> str:
    lines = [f"{manifest['n_cells']} cells in {manifest['n_shards']} shards, {manifest['nnz']} nonzero entries "
             f"({seconds:.1f} s, {manifest['n_cells'] / max(seconds, 1e-9):.0f} cells/s)"]
    for s in manifest["sources"]:
        lines.append(f"  {s['path']}: {s['n_cells']} cells ({s['n_filtered']} filtered), {s.get('species', '?')}"
                     + (f", {s['genes_matched']}/{s['genes_total']} genes" if "genes_matched" in s else ""))
    for s in manifest["skipped"]:
        lines.append(f"  SKIPPED {s['path']}: {s['error']}")
    return "\n".join(lines)


def _cmd_build(args) -> int:
    from fm.data.corpus import build_corpus

    t = time.perf_counter()
    manifest = build_corpus(args.input, args.output, conditions=[c for c in args.conditions.split(",") if c],
                            gene_key=args.gene_key, min_genes=args.min_genes, shard_size=args.shard_size,
                            workers=args.workers, on_error=args.on_error, min_matched_fraction=args.min_match,
                            progress=False if args.quiet else None, layer=args.layer, use_raw=args.use_raw,
                            allow_non_counts=args.allow_non_counts)
    print(_summary(manifest, time.perf_counter() - t))
    print(f"wrote {args.output}/manifest.json")
    return 0


def _cmd_synth(args) -> int:
    from fm.data.synth_corpus import synth_corpus

    t = time.perf_counter()
    manifest = synth_corpus(args.output, args.cells, n_genes=args.genes, n_types=args.cell_types,
                            n_batches=args.batches, seed=args.seed, shard_size=args.shard_size, workers=args.workers,
                            conditions=[c for c in args.conditions.split(",") if c], fit=args.fit)
    print(_summary(manifest, time.perf_counter() - t))
    print(f"wrote {args.output}/manifest.json")
    return 0


def _cmd_info(args) -> int:
    from fm.data.corpus import load_manifest

    manifest = load_manifest(args.corpus)
    brief = {k: v for k, v in manifest.items() if k not in ("shards",)}
    print(json.dumps(brief, indent=1))
    return 0


def add_corpus_parser(sub) -> None:
    """Register `fm corpus …` on the top-level subparsers."""
    corpus = sub.add_parser("corpus", help="build, generate or inspect a sharded training corpus")
    csub = corpus.add_subparsers(dest="corpus_command", required=True)

    p = csub.add_parser("build", help="h5ad/zarr files or directories → Arrow shards + manifest.json (resumable)")
    p.add_argument("--input", nargs="+", required=True, help=".h5ad/.zarr files or directories of them")
    p.add_argument("--output", required=True, help="corpus directory (re-run the same command to resume)")
    p.add_argument("--conditions", default="", help="obs columns stored as condition ids, e.g. batch,assay")
    p.add_argument("--gene-key", default=None, help="var column with symbols/Ensembl IDs, used where a file has it")
    p.add_argument("--layer", default=None, help="read counts from adata.layers[LAYER] of every file instead of X")
    p.add_argument("--use-raw", action="store_true", help="read counts and genes from adata.raw of every file")
    p.add_argument("--allow-non-counts", action="store_true", help="accept non-integer values (binned as they are)")
    p.add_argument("--min-genes", type=int, default=1,
                   help="drop cells with fewer nonzero vocabulary genes (default 1: empty cells are dropped)")
    p.add_argument("--min-match", type=float, default=0.2, help="stop/skip a file with fewer genes in the vocabulary")
    p.add_argument("--shard-size", type=int, default=10_000, help="input rows per shard")
    p.add_argument("--workers", type=int, default=2, help="files encoded in parallel (processes)")
    p.add_argument("--on-error", choices=("skip", "stop"), default="stop",
                   help="a bad input (corrupt, non-count, no vocabulary genes): leave it out, or stop")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bar (it is shown only when stderr is a terminal; FM_PROGRESS=1/0 overrides)")
    p.set_defaults(func=_cmd_build)

    p = csub.add_parser("synth", help="generated negative-binomial cells straight to shards")
    p.add_argument("--cells", type=int, required=True, help="number of cells to generate")
    p.add_argument("--genes", type=int, default=2000, help="genes per cell panel (real human symbols; default 2000)")
    p.add_argument("--cell-types", type=int, default=5, help="distinct cell types (obs label cell_type)")
    p.add_argument("--batches", type=int, default=2, help="batches with their own technical effect (obs batch)")
    p.add_argument("--output", required=True, help="corpus directory to write")
    p.add_argument("--seed", type=int, default=0, help="same seed, same cells")
    p.add_argument("--shard-size", type=int, default=10_000, help="cells per shard")
    p.add_argument("--workers", type=int, default=2, help="shards generated in parallel (processes)")
    p.add_argument("--conditions", default="", help="make labels condition tokens: batch and/or cell_type")
    p.add_argument("--fit", default=None, help="an h5ad whose gene means, library sizes and dispersion to mimic")
    p.set_defaults(func=_cmd_synth)

    p = csub.add_parser("info", help="print a corpus manifest (without the shard list)")
    p.add_argument("corpus", help="corpus directory (holding manifest.json)")
    p.set_defaults(func=_cmd_info)
