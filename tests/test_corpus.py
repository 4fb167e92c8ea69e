"""Corpus build: every count-valued h5ad of the shared data (human + mouse; real data only), exact
round-trip, resume, bad inputs skipped or stopped with their path, no half-written shard; pretraining
from a corpus (these on the real small files when present, else conftest's generated stand-ins)."""
import json
import shutil

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from conftest import is_real, tiny_overrides
from fm.cli import main
from fm.config import load_config
from fm.data.corpus import build_corpus, load_manifest
from fm.data.streaming import CorpusDataset
from fm.paths import data_dir, recipe_path
from fm.vocab import GeneVocab

SCALED = "10x_pbmc68k_reduced.h5ad"  # X is scaled, not counts
LOW_MATCH = "pbmc3k_seurat_13714g_labeled.h5ad"  # 13% named genes: below the default 20% match


class Interrupt(BaseException):
    """Simulated Ctrl-C / kill: not an input error, so the build does not catch it."""


@pytest.fixture(scope="module")
def real_corpus(tmp_path_factory):
    h5ad = data_dir() / "h5ad"
    if not h5ad.is_dir():
        pytest.skip(f"real data directory {h5ad} not found (set FM_DATA_DIR)")
    out = tmp_path_factory.mktemp("corpus") / "real"
    assert main(["corpus", "build", "--input", str(h5ad), "--output", str(out), "--gene-key", "gene_ids",
                 "--on-error", "skip", "--workers", "1", "--conditions", "batch"]) == 0
    return out


def _file_rows(path, rows, gene_key=None):
    """Independent reference: {vocab id: count} of some rows, straight from the file."""
    a = ad.read_h5ad(path)
    names = a.var[gene_key] if gene_key and gene_key in a.var else a.var_names
    vocab = GeneVocab.default()
    ids = vocab.lookup(pd.Index(names.astype(str)), species=vocab.detect_species(pd.Index(names.astype(str))))
    x = sp.csr_matrix(a.X[rows])
    out = []
    for i in range(len(rows)):
        r = x.getrow(i)
        out.append({int(ids[c]): float(v) for c, v in zip(r.indices, r.data) if ids[c] >= 0 and v != 0})
    return out


def test_every_count_file_in_one_corpus(real_corpus):
    m = load_manifest(real_corpus)
    files = sorted((data_dir() / "h5ad").glob("*.h5ad"))
    skipped = {s["path"].split("/")[-1]: s["error"] for s in m["skipped"]}
    assert set(skipped) == {SCALED, LOW_MATCH}, skipped
    assert "negative values" in skipped[SCALED] and "below the minimum" in skipped[LOW_MATCH]
    used = [f for f in files if f.name not in skipped]
    n_inputs = sum(ad.read_h5ad(f, backed="r").n_obs for f in used)
    filtered = sum(s["n_filtered"] for s in m["sources"])
    assert filtered == 1, "one mouse cell has no counts in vocabulary genes (filter: min_genes=1)"
    assert m["n_cells"] == n_inputs - filtered == sum(s["n_cells"] for s in m["shards"])
    assert {s["species"] for s in m["sources"]} == {"human", "mouse"}
    assert len(m["vocab_sha256"]) == 64 and m["conditions"]["batch"][0] == "<unknown>"


def test_counts_round_trip_exactly(real_corpus):
    m = load_manifest(real_corpus)
    ds = CorpusDataset(real_corpus)
    rng = np.random.default_rng(0)
    for shard, lo in zip(m["shards"], ds.offsets[:-1]):
        src = next(s for s in m["sources"] if s["source_id"] == shard["source_id"])
        if src["n_filtered"]:
            continue  # row positions shift after a filtered cell; the unfiltered sources check the mapping
        pick = np.sort(rng.choice(shard["n_cells"], 5, replace=False))
        ref = _file_rows(src["path"], shard["rows"][0] + pick, src["gene_key"])
        for r, expected in zip(pick, ref):
            row = ds[int(lo + r)]
            assert np.all(np.diff(row["gene_ids"]) > 0)
            assert dict(zip(row["gene_ids"].tolist(), row["counts"].tolist())) == expected


def test_corpus_loads_with_hf_datasets(real_corpus):
    datasets = pytest.importorskip("datasets")
    d = datasets.load_from_disk(str(real_corpus))
    assert len(d) == load_manifest(real_corpus)["n_cells"]
    ds = CorpusDataset(real_corpus)
    assert d[123]["gene_ids"] == ds[123]["gene_ids"].tolist()


def test_rebuild_is_idempotent_and_other_params_refused(real_corpus, tmp_path):
    before = (real_corpus / "manifest.json").read_text()
    build_corpus([data_dir() / "h5ad"], real_corpus, conditions=["batch"], gene_key="gene_ids", on_error="skip")
    assert (real_corpus / "manifest.json").read_text() == before
    with pytest.raises(FileExistsError, match="other inputs or parameters"):
        build_corpus([data_dir() / "h5ad"], real_corpus, gene_key="gene_ids", on_error="skip")


def test_resumed_build_equals_uninterrupted(tmp_path, small_h5ad_path, batch_h5ad_path):
    pbmc_path, kang_path = small_h5ad_path, batch_h5ad_path
    # 6 shards either way: 2638 + 1556 real cells, or 600 + 400 generated ones
    kw = dict(conditions=["sample"], shard_size=700 if is_real(pbmc_path) else 170)
    full = build_corpus([pbmc_path, kang_path], tmp_path / "full", **kw)
    calls = []

    def hook(path):
        calls.append(path)
        if len(calls) == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        build_corpus([pbmc_path, kang_path], tmp_path / "cut", hook=hook, **kw)
    assert not (tmp_path / "cut" / "manifest.json").exists() and not list((tmp_path / "cut").glob("*.tmp"))
    done = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cut").glob("*.arrow")}
    assert len(done) == 3
    resumed = build_corpus([pbmc_path, kang_path], tmp_path / "cut", **kw)
    assert all((tmp_path / "cut" / n).stat().st_mtime_ns == t for n, t in done.items()), "finished shards kept"
    assert json.dumps(resumed, sort_keys=True) == json.dumps(full, sort_keys=True)
    for shard in full["shards"]:
        assert (tmp_path / "full" / shard["file"]).read_bytes() == (tmp_path / "cut" / shard["file"]).read_bytes()


def _bad_inputs(tmp_path, pbmc_path):
    good = tmp_path / "in" / "a_good.h5ad"
    good.parent.mkdir()
    shutil.copy(pbmc_path, good)
    data = pbmc_path.read_bytes()
    (tmp_path / "in" / "b_truncated.h5ad").write_bytes(data[: len(data) // 3])
    a = ad.read_h5ad(pbmc_path)[:300].copy()
    x = a.X.toarray()
    x[250:] += 0.5  # counts in the first shard, non-counts later: fails after a shard was written
    ad.AnnData(sp.csr_matrix(x), obs=a.obs, var=a.var).write_h5ad(tmp_path / "in" / "c_noncount.h5ad")
    ad.AnnData(sp.csr_matrix(x[:50].round()), var=pd.DataFrame(index=[f"NOT_A_GENE_{i}" for i in range(x.shape[1])])
               ).write_h5ad(tmp_path / "in" / "d_nogenes.h5ad")
    return tmp_path / "in"


def test_bad_inputs_skip_and_stop(tmp_path, small_h5ad_path):
    inputs = _bad_inputs(tmp_path, small_h5ad_path)
    m = build_corpus([inputs], tmp_path / "skip", on_error="skip", shard_size=100)
    errors = {s["path"].split("/")[-1]: s["error"] for s in m["skipped"]}
    assert set(errors) == {"b_truncated.h5ad", "c_noncount.h5ad", "d_nogenes.h5ad"}
    assert "cannot read" in errors["b_truncated.h5ad"] and "non-integer" in errors["c_noncount.h5ad"]
    assert "below the minimum" in errors["d_nogenes.h5ad"]
    assert all(str(inputs) in e for e in errors.values()), "each error names its path"
    n_good = ad.read_h5ad(small_h5ad_path, backed="r").n_obs  # pbmc3k: 2638
    assert m["n_cells"] == n_good and {p.name[:10] for p in (tmp_path / "skip").glob("*.arrow")} == {"data-00000"}
    assert not list((tmp_path / "skip").glob("*.tmp"))
    for bad in ("b_truncated.h5ad", "c_noncount.h5ad", "d_nogenes.h5ad"):
        out = tmp_path / f"stop_{bad}"
        with pytest.raises(ValueError, match=bad):
            build_corpus([inputs / "a_good.h5ad", inputs / bad], out, on_error="stop", shard_size=100)
        assert not (out / "manifest.json").exists() and not list(out.glob("*.tmp"))
        assert not list(out.glob("data-00001-*")), "the failed input leaves no shard"
    assert main(["corpus", "build", "--input", str(inputs / "c_noncount.h5ad"), "--output", str(tmp_path / "cli"),
                 "--workers", "1"]) == 2


def test_pretrain_from_corpus(tmp_path, batch_h5ad_path):
    corpus = tmp_path / "corpus"
    build_corpus([batch_h5ad_path], corpus, conditions=["sample"], shard_size=400)
    cfg = load_config(recipe_path("debug"), tiny_overrides(tmp_path / "run", [corpus], 4, **{"data.val_fraction": 0.1}))
    from fm.pretrain import run_pretraining
    result = run_pretraining(cfg)
    assert result.step == 4 and result.export_dir is not None
    import fm
    model = fm.load(result.export_dir)
    assert model.config.condition_keys == ["sample"] and model.config.condition_vocab_sizes == [5]
    assert (tmp_path / "run" / "eval_log.jsonl").is_file()


_KILL_SCRIPT = """
import sys, time
import fm.data.corpus as corpus
original = corpus.write_shard
def slow(*args, **kwargs):  # workers inherit this (fork): each shard takes a while
    time.sleep(1.0)
    return original(*args, **kwargs)
corpus.write_shard = slow
corpus.build_corpus(sys.argv[1:3], sys.argv[3], shard_size=50, workers=2, progress=False)
"""


def _children(pid: int) -> list[int]:
    from pathlib import Path

    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid: int) -> bool:
    from pathlib import Path

    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not __import__("os").path.isdir("/proc"), reason="reads process parents from /proc (Linux)")
def test_killed_build_leaves_no_workers(tmp_path, small_h5ad_path, batch_h5ad_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "corpus"
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(small_h5ad_path), str(batch_h5ad_path), str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while len(workers := _children(proc.pid)) < 2 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert len(workers) >= 2, "the build did not start its workers"
        time.sleep(1.0)  # they are writing shards now
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 10
        while any(_alive(w) for w in workers) and time.time() < deadline:
            time.sleep(0.2)
        assert not any(_alive(w) for w in workers), "workers outlived their killed parent"
        shards = {p.name: p.stat().st_size for p in out.glob("*.arrow*")}
        time.sleep(1.5)
        assert {p.name: p.stat().st_size for p in out.glob("*.arrow*")} == shards, "something still writes shards"
    finally:
        for w in _children(proc.pid):
            os.kill(w, signal.SIGKILL)


def test_build_reads_counts_from_a_layer_or_raw(tmp_path, small_h5ad_path):
    counts = ad.read_h5ad(small_h5ad_path)[:120].copy()
    logged = counts.copy()
    logged.X = np.log1p(logged.X)  # what a processed file keeps in X
    logged.layers["counts"] = counts.X.copy()
    logged.raw = counts.copy()
    logged.write_h5ad(tmp_path / "processed.h5ad")
    counts.write_h5ad(tmp_path / "counts.h5ad")
    with pytest.raises(ValueError, match="layer="):
        build_corpus([tmp_path / "processed.h5ad"], tmp_path / "from_x", shard_size=50)
    reference = build_corpus([tmp_path / "counts.h5ad"], tmp_path / "ref", shard_size=50)
    for name, kw in {"layer": {"layer": "counts"}, "raw": {"use_raw": True}}.items():
        manifest = build_corpus([tmp_path / "processed.h5ad"], tmp_path / name, shard_size=50, **kw)
        assert manifest["n_cells"] == reference["n_cells"] and manifest["nnz"] == reference["nnz"]
    assert main(["corpus", "build", "--input", str(tmp_path / "processed.h5ad"), "--output", str(tmp_path / "cli"),
                 "--layer", "counts", "--workers", "1", "--quiet"]) == 0
