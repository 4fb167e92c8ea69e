"""`fm corpus synth`: generated cells written straight to corpus shards, one seeded shard at a time.

Shard k is drawn from `np.random.default_rng([seed, k])` in sub-chunks of `chunk_size` cells, so
memory is bounded by a sub-chunk (dense cells × genes for the gamma-Poisson draw), shards can be
built in any order or in parallel, and an interrupted build resumes to the identical corpus.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from fm.data.corpus import (FORMAT, _check_build, _run_jobs, _shard_path, finish_manifest, row_schema, shard_stats,
                            to_record_batch, write_shard)
from fm.synthetic import SyntheticModel
from fm.tokenizer import UNKNOWN_CONDITION, EncodedCells
from fm.vocab import GeneVocab

log = logging.getLogger("fm")
LABELS = ("cell_type", "batch")


def _label_names(model: SyntheticModel) -> dict[str, list[str]]:
    return {"cell_type": [f"type_{t}" for t in range(model.n_types)],
            "batch": [f"batch_{b}" for b in range(model.n_batches)]}


def _synth_shard(job: dict, hook: Callable | None = None) -> dict:
    out, k, model = Path(job["out"]), job["shard"], job["model"]
    path = _shard_path(out, 0, k)
    lo, hi = job["rows"]
    if path.is_file():
        return {"file": path.name, "source_id": 0, "rows": [lo, hi], **shard_stats(path)}
    vocab = GeneVocab.default()
    ids = vocab.lookup(model.genes.astype(str), species="human")
    if (ids < 0).any():
        raise ValueError(f"synthetic genes outside the vocabulary: {model.genes[ids < 0][:5].tolist()}")
    order = np.argsort(ids, kind="stable")
    names = _label_names(model)
    cond_ids = {key: {c: i for i, c in enumerate(job["categories"][key])} for key in job["keys"]}
    schema = row_schema(LABELS)

    def batches():
        rng = np.random.default_rng([job["seed"], k])
        for start in range(lo, hi, job["chunk_size"]):
            n = min(job["chunk_size"], hi - start)
            x, cell_type, batch = model.sample(n, rng)
            x = x[:, order].tocsr()
            x.sort_indices()
            labels = {"cell_type": np.array(names["cell_type"])[cell_type], "batch": np.array(names["batch"])[batch]}
            conds = np.stack([np.array([cond_ids[key][v] for v in labels[key]]) for key in job["keys"]], 1) \
                if job["keys"] else np.zeros((n, 0), np.int64)
            cells = EncodedCells(x.indptr.astype(np.int64), ids[order][x.indices].astype(np.int32), x.data, conds,
                                 np.array([f"synth_{i}" for i in range(start, start + n)], dtype=object))
            keep = np.flatnonzero(np.diff(cells.indptr) >= job["min_genes"])
            if keep.size < n:
                from fm.tokenizer import subset_cells
                cells = subset_cells(cells, keep)
                labels = {key: v[keep] for key, v in labels.items()}
            yield to_record_batch(cells, 0, schema, labels)

    stats = write_shard(path, schema, batches())
    if hook is not None:
        hook(path)
    return {"file": path.name, "source_id": 0, "rows": [lo, hi], **stats}


def synth_corpus(output: str | Path, n_cells: int, n_genes: int = 2000, n_types: int = 5, n_batches: int = 2,
                 seed: int = 0, shard_size: int = 10_000, workers: int = 1, conditions: Sequence[str] = (),
                 fit: str | Path | None = None, chunk_size: int = 1000, min_genes: int = 1,
                 hook: Callable | None = None) -> dict:
    """Write (or resume) a synthetic corpus; labels `cell_type` and `batch` are string columns.

    `conditions` may name 'batch' and/or 'cell_type' to make them condition tokens. `fit`: an h5ad
    whose per-gene mean profile, library size and dispersion replace the random ones.
    """
    keys = list(conditions)
    bad = sorted(set(keys) - set(LABELS))
    if bad:
        raise ValueError(f"synthetic conditions must be among {LABELS}, got {bad}")
    if fit is not None:
        from fm.data.corpus import open_input
        adata = open_input(Path(fit))
        model = SyntheticModel.fit(adata, n_types, n_batches, seed)
        vocab = GeneVocab.default()
        ids = vocab.lookup(model.genes.astype(str), species="human")
        keep = ids >= 0
        _, first = np.unique(ids[keep], return_index=True)
        cols = np.flatnonzero(keep)[first]  # genes in the vocabulary, one column per vocab id
        model = SyntheticModel(model.genes[cols], model.programs[:, cols], model.batch_effect[:, cols],
                               model.dispersion, model.library_mean, model.library_sigma)
    else:
        model = SyntheticModel.draw(n_genes, n_types, n_batches, seed)
    out = Path(output)
    build = {"format": FORMAT, "synthetic": {"n_cells": n_cells, "n_genes": int(model.genes.size), "n_types": n_types,
                                             "n_batches": n_batches, "seed": seed, "fit": str(fit) if fit else None,
                                             "chunk_size": chunk_size},
             "conditions": keys, "shard_size": shard_size, "min_genes": min_genes}
    _check_build(out, build)
    categories = {k: [UNKNOWN_CONDITION] + _label_names(model)[k] for k in keys}
    jobs = [{"out": str(out), "shard": k, "rows": [lo, min(lo + shard_size, n_cells)], "model": model, "seed": seed,
             "keys": keys, "categories": categories, "chunk_size": chunk_size, "min_genes": min_genes}
            for k, lo in enumerate(range(0, n_cells, shard_size))]
    shards = [res for _, res in _run_jobs(jobs, _synth_shard, workers, hook)]
    n_kept = sum(s["n_cells"] for s in shards)
    source = {"source_id": 0, "path": f"synthetic(seed={seed}{', fit=' + str(fit) if fit else ''})",
              "species": "human", "n_obs": n_cells, "n_cells": n_kept, "n_filtered": n_cells - n_kept,
              "nnz": sum(s["nnz"] for s in shards), "n_shards": len(shards),
              "dispersion": model.dispersion, "library_mean": model.library_mean}
    log.info("synthetic corpus %s: %d cells in %d shards", out, n_kept, len(shards))
    ids = GeneVocab.default().lookup(model.genes.astype(str), species="human")
    return finish_manifest(out, shards, [source], [], keys, categories, GeneVocab.default(),
                           filters={"min_genes": min_genes}, labels=LABELS, extra={"synthetic": build["synthetic"]},
                           gene_ids=np.unique(ids[ids >= 0]))
