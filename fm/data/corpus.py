"""Corpus build: many h5ad/zarr files (or generated cells) → Arrow shards + manifest.json, out of core.

Layout of CORPUS/ (a Hugging Face `datasets` directory: `datasets.load_from_disk(CORPUS)` works):
  data-SSSSS-KKKKK.arrow   shard K of source S: Arrow IPC stream, one row per cell —
                           gene_ids list<int32> (vocab ids, sorted), counts list<float32> (raw),
                           conditions list<int32> (ids into manifest["conditions"][key]; 0 = unknown),
                           source_id int32 (index into manifest["sources"]), cell_id string
                           (+ label columns such as cell_type/batch for synthetic corpora)
  manifest.json            n_cells, shards (cells each, in global-index order), vocab hash,
                           condition mappings, per-source stats, skipped inputs, gene_ids (the
                           vocab ids any source measured: a model's gene table); written last
  build.json               the build's inputs and parameters: a re-run with the same ones resumes
  state.json, dataset_info.json   for datasets.load_from_disk

Conditions are stored as ids with their category lists in the manifest (not strings): ids are what
training needs, and a fine-tune re-maps them through the lists (see streaming.CorpusDataset).
Shard K of a source holds its input rows [K·shard_size, (K+1)·shard_size) minus filtered cells, so a
shard is a pure function of (input, parameters): an interrupted build keeps its finished shards and
redoes only the rest; every shard is written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import json
import logging
import os
import threading
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import pyarrow as pa

from fm.progress import progress_bar
from fm.tokenizer import UNKNOWN_CONDITION, CellTokenizer, EncodedCells, subset_cells

log = logging.getLogger("fm")
MANIFEST, BUILD = "manifest.json", "build.json"
FORMAT = {"name": "scfm-corpus", "version": 1}


def row_schema(labels: Sequence[str] = ()) -> pa.Schema:
    return pa.schema([pa.field("gene_ids", pa.list_(pa.int32())), pa.field("counts", pa.list_(pa.float32())),
                      pa.field("conditions", pa.list_(pa.int32())), pa.field("source_id", pa.int32()),
                      pa.field("cell_id", pa.string())] + [pa.field(k, pa.string()) for k in labels])


def to_record_batch(cells: EncodedCells, source_id: int, schema: pa.Schema, labels: dict | None = None) -> pa.RecordBatch:
    n, c = cells.conditions.shape
    lists = [pa.ListArray.from_arrays(pa.array(cells.indptr.astype(np.int32)), pa.array(cells.gene_ids.astype(np.int32))),
             pa.ListArray.from_arrays(pa.array(cells.indptr.astype(np.int32)), pa.array(cells.counts.astype(np.float32))),
             pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32) * c),
                                      pa.array(cells.conditions.ravel().astype(np.int32)))]
    cols = lists + [pa.array(np.full(n, source_id, np.int32)), pa.array(cells.obs_names.astype(str))]
    cols += [pa.array(np.asarray(labels[f.name]).astype(str)) for f in schema if f.name in (labels or {})]
    return pa.RecordBatch.from_arrays(cols, schema=schema)


def write_shard(path: Path, schema: pa.Schema, batches: Iterable[pa.RecordBatch]) -> dict:
    """Stream record batches into `path` atomically (temp name, then rename); returns cells and nnz."""
    tmp = path.with_name(path.name + ".tmp")
    n = nnz = 0
    try:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            for batch in batches:
                writer.write_batch(batch)
                n += batch.num_rows
                nnz += len(batch.column(0).values)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return {"n_cells": n, "nnz": nnz}


def read_shard(path: Path) -> pa.Table:
    """A shard as an Arrow table over a memory map (nothing is read until touched)."""
    return pa.ipc.open_stream(pa.memory_map(str(path), "r")).read_all()


def shard_stats(path: Path) -> dict:
    table = read_shard(path)
    return {"n_cells": table.num_rows, "nnz": sum(len(c.values) for c in table.column("gene_ids").chunks)}


def expand_inputs(inputs: Sequence) -> list:
    """Files (.h5ad, .zarr), directories of them (sorted), or in-memory AnnData objects."""
    out = []
    for item in inputs:
        if not isinstance(item, (str, os.PathLike)):
            out.append(item)  # an AnnData
            continue
        p = Path(item)
        if p.is_dir() and p.suffix != ".zarr":
            found = sorted(list(p.glob("*.h5ad")) + list(p.glob("*.zarr")))
            if not found:
                raise FileNotFoundError(f"{p}: no .h5ad or .zarr files in this directory")
            out.extend(found)
        elif p.exists():
            out.append(p)
        else:
            raise FileNotFoundError(f"corpus input not found: {p}")
    return out


def open_input(item, backed: bool = True):
    """AnnData for a path (h5ad backed, zarr lazily) or the object itself; errors name the path."""
    if not isinstance(item, Path):
        return item
    if item.suffix == ".zarr":
        import anndata as ad
        try:
            return ad.read_zarr(item)
        except Exception as e:
            raise ValueError(f"{item}: cannot read this zarr store ({type(e).__name__}: {e})") from e
    from fm.data.sources import open_anndata
    return open_anndata(item, backed=backed)


def _name(item, i: int) -> str:
    return str(item) if isinstance(item, Path) else f"<AnnData #{i}>"


def _fingerprint(item, i: int) -> dict:
    if isinstance(item, Path):
        st = item.stat()
        return {"path": str(item.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return {"path": _name(item, i), "shape": list(item.shape)}


def _file_tokenizer(adata, gene_key, keys, categories, min_match, reading: dict | None = None
                    ) -> tuple[CellTokenizer, list[int]]:
    """Tokenizer for one file: gene_key if the file has that var column, its own condition columns; `reading`:
    where the counts are (layer / use_raw) and allow_non_counts (CellTokenizer.with_input)."""
    present = [j for j, k in enumerate(keys) if k in adata.obs.columns]
    use_key = gene_key if gene_key and gene_key in adata.var.columns else None
    tok = CellTokenizer(condition_keys=[keys[j] for j in present], condition_categories=categories,
                        gene_key=use_key, min_matched_fraction=min_match)
    tok = tok.with_input(**(reading or {}))
    return tok, present


def _shard_path(out: Path, source_id: int, k: int) -> Path:
    return out / f"data-{source_id:05d}-{k:05d}.arrow"


def _build_source(job: dict, hook: Callable | None = None, done: Callable | None = None) -> dict:
    """Encode one input into its shards (skipping finished ones); an error is returned, not raised.
    `done(source_id, rows)` after each shard (progress; in a worker process: a queue to the parent)."""
    done = done or _WORKER_DONE
    out, sid, name = Path(job["out"]), job["source_id"], job["name"]
    try:
        adata = open_input(job["item"])
        tok, present = _file_tokenizer(adata, job["gene_key"], job["keys"], job["categories"], job["min_match"],
                                      job["reading"])
        schema = row_schema()
        shards = []
        for k, lo in enumerate(range(0, adata.n_obs, job["shard_size"])):
            hi = min(lo + job["shard_size"], adata.n_obs)
            path = _shard_path(out, sid, k)
            if path.is_file():
                stats = shard_stats(path)
            else:
                def batches(lo=lo, hi=hi):
                    for part in tok.iter_encoded(adata[lo:hi], source=name, chunk_size=job["chunk_size"], drop_empty=True):
                        keep = np.flatnonzero(np.diff(part.indptr) >= job["min_genes"])
                        part = part if keep.size == len(part) else subset_cells(part, keep)
                        full = np.zeros((len(part), len(job["keys"])), np.int64)
                        full[:, present] = part.conditions
                        part.conditions = full
                        yield to_record_batch(part, sid, schema)
                stats = write_shard(path, schema, batches())
                if hook is not None:
                    hook(path)
            shards.append({"file": path.name, "source_id": sid, "rows": [lo, hi], **stats})
            if done is not None:
                done(sid, hi - lo)
        match = tok.match_genes(adata, name)
        if getattr(adata, "isbacked", False):
            adata.file.close()
        measured = np.unique(match.vocab_ids[match.vocab_ids >= 0])
        return {"shards": shards, "gene_ids": measured, "species": match.species, "genes_matched": match.n_matched,
                "genes_total": match.n_total, "gene_key": tok.gene_key, "n_obs": int(adata.n_obs)}
    except Exception as e:  # any input problem: reported with its path; the caller skips or stops
        msg = str(e) if name in str(e) else f"{name}: {e}"
        return {"error": f"{type(e).__name__}: {msg}"}


def _remove_source_shards(out: Path, sid: int) -> None:
    for p in out.glob(f"data-{sid:05d}-*.arrow"):
        p.unlink()


def _check_build(out: Path, build: dict) -> None:
    """Refuse to mix two different builds in one directory; otherwise resume."""
    out.mkdir(parents=True, exist_ok=True)
    for tmp in out.glob("*.tmp"):  # left by a killed process: never a finished shard
        tmp.unlink()
    path = out / BUILD
    if path.is_file():
        old = json.loads(path.read_text())
        if old != build:
            raise FileExistsError(f"{out} holds a corpus built from other inputs or parameters ({path}); "
                                  "choose another --output or delete it")
    else:
        _atomic_write(path, build)


def _atomic_write(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


_WORKER_DONE: Callable | None = None
"""In a build worker process: puts (source_id, rows) on the parent's progress queue."""


def _init_worker(queue, parent: int) -> None:
    global _WORKER_DONE
    _WORKER_DONE = (lambda sid, rows: queue.put((sid, rows))) if queue is not None else None
    die_with_parent(parent)


def die_with_parent(parent: int, poll_s: float = 0.5) -> None:
    """Make this worker process end when its parent does, however the parent dies (kill -9 included): a pool's
    workers otherwise live on as orphans and keep writing shards. Linux: the kernel sends SIGKILL on the parent's
    death (prctl PR_SET_PDEATHSIG); everywhere: a daemon thread exits when the parent pid changes. `parent`: the
    pid the pool was made in (read there: a parent dead before this runs is then noticed too)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux / no glibc: the thread below does it
        pass
    if os.getppid() != parent:  # the parent died before the prctl took effect
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            threading.Event().wait(poll_s)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="fm-parent-watch").start()


def _drain(queue, done: Callable) -> None:
    """Parent-side thread: forward the workers' shard counts to `done` until the None sentinel."""
    for item in iter(queue.get, None):
        done(*item)


def _run_jobs(jobs: list[dict], worker: Callable, workers: int, hook: Callable | None, done: Callable | None = None):
    """Yield (job, result) in job order; several processes when workers > 1. `done(source_id, rows)`
    is called in this process as each shard finishes, whichever process wrote it."""
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            yield job, worker(job, hook) if done is None else worker(job, hook, done)
        return
    # fork: workers inherit the imports (spawn re-imports torch per worker, ~10 s on a busy 2-core box);
    # inputs are opened only inside the workers, so no HDF5 handle crosses the fork
    ctx = get_context("fork" if "fork" in get_all_start_methods() else "spawn")
    queue = ctx.SimpleQueue() if done is not None else None
    drain = threading.Thread(target=_drain, args=(queue, done), daemon=True) if queue is not None else None
    if drain is not None:
        drain.start()
    try:
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                 initargs=(queue, os.getpid())) as pool:
            futures = [pool.submit(worker, job) for job in jobs]
            try:
                for job, f in zip(jobs, futures):
                    yield job, f.result()
            finally:
                for f in futures:
                    f.cancel()
    finally:
        if drain is not None:
            queue.put(None)
            drain.join()


def build_corpus(inputs: Sequence, output: str | Path, conditions: Sequence[str] = (), gene_key: str | None = None,
                 min_genes: int = 1, shard_size: int = 10_000, workers: int = 1, on_error: str = "stop",
                 min_matched_fraction: float = 0.2, chunk_size: int = 2048, hook: Callable | None = None,
                 progress: bool | None = None, layer: str | None = None, use_raw: bool = False,
                 allow_non_counts: bool = False) -> dict:
    """Build (or resume) a corpus; returns the manifest. See the module docstring for the layout.

    Filters: cells with fewer than `min_genes` nonzero vocabulary genes are dropped (counted per source).
    `gene_key`: var column used when a file has it, else var_names. `on_error`: 'skip' reports a bad
    input (with its path) and leaves it out; 'stop' raises. `hook(shard_path)` runs after each shard
    (tests use it to simulate an interruption). `progress`: a bar of input cells on stderr as shards
    finish (None: when stderr is a TTY; fm.progress). `layer` / `use_raw`: counts in adata.layers[layer] or
    adata.raw of every file; `allow_non_counts`: bin non-integer values as they are (as fm.embed's keywords).
    """
    reading = {"layer": layer, "use_raw": use_raw, "allow_non_counts": allow_non_counts or None}
    if on_error not in ("skip", "stop"):
        raise ValueError(f"on_error must be 'skip' or 'stop', got {on_error!r}")
    out, keys = Path(output), list(conditions)
    items = expand_inputs(inputs)
    build = {"format": FORMAT, "inputs": [_fingerprint(it, i) for i, it in enumerate(items)], "conditions": keys,
             "gene_key": gene_key, "min_genes": min_genes, "shard_size": shard_size,
             "min_matched_fraction": min_matched_fraction,
             **({"reading": {k: v for k, v in reading.items() if v}} if any(reading.values()) else {})}
    _check_build(out, build)
    vocab_tok = CellTokenizer(condition_keys=keys)
    skipped, jobs = [], []
    for sid, item in enumerate(items):  # plan: open each input, check its genes, fit condition categories
        name = _name(item, sid)
        try:
            adata = open_input(item)
            tok, present = _file_tokenizer(adata, gene_key, keys, {}, min_matched_fraction, reading)
            tok.match_genes(adata, name)
            missing = [k for k in keys if k not in adata.obs.columns]
            if missing:
                log.warning("%s: obs has no %s; those conditions are '%s' for its cells", name, missing, UNKNOWN_CONDITION)
            vocab_tok.condition_keys = [keys[j] for j in present]
            vocab_tok.fit_conditions(adata.obs, name)
            n_obs = int(adata.n_obs)
            if getattr(adata, "isbacked", False):
                adata.file.close()
        except Exception as e:
            skipped.append(_fail(out, sid, name, f"{type(e).__name__}: {e}", on_error))
            continue
        jobs.append({"item": item, "source_id": sid, "name": name, "out": str(out), "gene_key": gene_key, "keys": keys,
                     "min_match": min_matched_fraction, "reading": reading, "shard_size": shard_size, "min_genes": min_genes,
                     "chunk_size": chunk_size, "n_obs": n_obs})
    categories = {k: vocab_tok.condition_categories.get(k, [UNKNOWN_CONDITION]) for k in keys}
    for job in jobs:
        job["categories"] = categories
    in_process = any(not isinstance(j["item"], Path) for j in jobs)  # AnnData objects are not shipped to workers
    sources, shards, genes = [], [], []
    with progress_bar(sum(j["n_obs"] for j in jobs), "corpus build", "cells", progress) as bar:
        counted, lock = dict.fromkeys((j["source_id"] for j in jobs), 0), threading.Lock()

        def done(sid: int, rows: int) -> None:  # from the drain thread when workers > 1
            with lock:
                if counted[sid] is not None:  # None: the source's result is in, all its rows counted
                    counted[sid] += rows
                    bar.update(rows)

        for job, res in _run_jobs(jobs, _build_source, 1 if in_process else workers, hook, done):
            with lock:  # the rest of the source at once (a failed one, or counts still in the queue)
                bar.update(job["n_obs"] - counted[job["source_id"]])
                counted[job["source_id"]] = None
            _collect(job, res, out, on_error, skipped, sources, shards, genes)
    return finish_manifest(out, shards, sources, skipped, keys, categories, vocab_tok.vocab,
                           filters={"min_genes": min_genes, "min_matched_fraction": min_matched_fraction},
                           gene_ids=np.unique(np.concatenate(genes)) if genes else np.zeros(0, np.int64))


def _collect(job: dict, res: dict, out: Path, on_error: str, skipped: list, sources: list, shards: list,
             genes: list) -> None:
    """One finished source into the manifest's lists (or into `skipped`, with its shards removed)."""
    if "error" in res:
        skipped.append(_fail(out, job["source_id"], job["name"], res["error"], on_error))
        return
    sh = res.pop("shards")
    genes.append(res.pop("gene_ids"))
    shards.extend(sh)
    n_cells = sum(s["n_cells"] for s in sh)
    sources.append({"source_id": job["source_id"], "path": job["name"], **res, "n_cells": n_cells,
                    "n_filtered": res["n_obs"] - n_cells, "nnz": sum(s["nnz"] for s in sh), "n_shards": len(sh)})
    log.info("%s: %d cells (%d filtered) in %d shards", job["name"], n_cells, res["n_obs"] - n_cells, len(sh))


def _fail(out: Path, sid: int, name: str, error: str, on_error: str) -> dict:
    _remove_source_shards(out, sid)  # a skipped input leaves no shards behind
    if on_error == "stop":
        raise ValueError(f"{error} (stopped; pass --on-error skip to leave this input out)")
    log.error("skipping %s — %s", name, error)
    return {"source_id": sid, "path": name, "error": error}


def finish_manifest(out: Path, shards: list[dict], sources: list[dict], skipped: list[dict], keys: list[str],
                    categories: dict, vocab, filters: dict, labels: Sequence[str] = (), extra: dict | None = None,
                    gene_ids: np.ndarray | None = None) -> dict:
    """Write manifest.json (last, atomically) and the datasets files; returns the manifest.

    `gene_ids`: the sorted vocab ids the sources measured, kept so pretraining sizes its gene table
    without scanning every shard (corpus_genes)."""
    shards = sorted(shards, key=lambda s: s["file"])
    manifest = {"format": FORMAT, "n_cells": sum(s["n_cells"] for s in shards), "n_shards": len(shards),
                "nnz": sum(s["nnz"] for s in shards), "vocab_sha256": vocab.sha256, "vocab_size": len(vocab),
                "condition_keys": keys, "conditions": categories, "labels": list(labels), "filters": filters,
                "shards": shards, "sources": sources, "skipped": skipped, **(extra or {})}
    if gene_ids is not None:
        manifest["gene_ids"] = [int(i) for i in gene_ids]
    value = lambda t: {"dtype": t, "_type": "Value"}  # noqa: E731  (datasets' Features JSON, without importing it)
    features = {"gene_ids": {"feature": value("int32"), "_type": "List"},
                "counts": {"feature": value("float32"), "_type": "List"},
                "conditions": {"feature": value("int32"), "_type": "List"},
                "source_id": value("int32"), "cell_id": value("string"), **{k: value("string") for k in labels}}
    _atomic_write(out / "dataset_info.json", {"description": "scfm corpus (see manifest.json)", "features": features})
    _atomic_write(out / "state.json", {"_data_files": [{"filename": s["file"]} for s in shards],
                                       "_fingerprint": vocab.sha256[:16] + f"{manifest['n_cells']:x}",
                                       "_format_columns": None, "_format_kwargs": {}, "_format_type": None,
                                       "_output_all_columns": False, "_split": None})
    _atomic_write(out / MANIFEST, manifest)
    return manifest


def load_manifest(path: str | Path) -> dict:
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise FileNotFoundError(f"{path}: no {MANIFEST} — not a finished corpus (build it with `fm corpus build`, "
                                "or re-run the same build to resume it)")
    return json.loads((path / MANIFEST).read_text())


def corpus_genes(path: str | Path) -> np.ndarray:
    """Sorted vocab ids of the genes a corpus holds: the manifest's `gene_ids`, or, for a corpus built before
    manifests kept them, the union of the genes its shards store (a scan; only expressed genes are stored)."""
    manifest = load_manifest(path)
    if "gene_ids" in manifest:
        return np.asarray(manifest["gene_ids"], dtype=np.int64)
    log.warning("%s: manifest has no gene_ids (an older build); scanning %d shards for the genes of the "
                "gene table — rebuild the corpus to skip this", path, len(manifest["shards"]))
    seen = np.zeros(manifest["vocab_size"], dtype=bool)
    for shard in manifest["shards"]:
        for chunk in read_shard(Path(path) / shard["file"]).column("gene_ids").chunks:
            seen[chunk.values.to_numpy()] = True
    return np.flatnonzero(seen).astype(np.int64)


def is_corpus(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()
