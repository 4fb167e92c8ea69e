"""Streaming a corpus: ranks read disjoint shards covering the corpus, order fixed by (seed, epoch),
resumed epochs equal the tail of uninterrupted ones; synthetic corpora resume and keep labels."""
import numpy as np
import pytest

from fm.data.collator import CellCollator
from fm.data.synth_corpus import synth_corpus
from fm.data.streaming import CorpusDataset


class Interrupt(BaseException):
    pass


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "c"
    synth_corpus(out, 700, n_genes=300, n_types=3, n_batches=2, shard_size=64, conditions=["batch"], chunk_size=50)
    return out


def _cells(sampler):
    return [i for batch in sampler for i in batch]


def test_synthetic_corpus_labels_and_rows(synth):
    ds = CorpusDataset(synth)
    m = ds.manifest
    assert len(ds) == m["n_cells"] == 700 and m["n_shards"] == 11 and m["labels"] == ["cell_type", "batch"]
    assert m["conditions"]["batch"] == ["<unknown>", "batch_0", "batch_1"]
    from fm.data.corpus import read_shard
    t = read_shard(synth / m["shards"][1]["file"])
    row = ds[64 + 5]
    assert row["gene_ids"].tolist() == t.column("gene_ids")[5].as_py() and row["index"] == 69
    assert m["conditions"]["batch"][row["conditions"][0]] == t.column("batch")[5].as_py()
    assert all(np.diff(r["gene_ids"]).min() > 0 for r in ds.__getitems__([0, 300, 699]))


@pytest.mark.parametrize("n_cells, batch", [(640, 16), (700, 8)])
def test_two_ranks_disjoint_and_cover_the_corpus(tmp_path, synth, n_cells, batch):
    path = synth if n_cells == 700 else tmp_path / "even"
    if n_cells == 640:
        synth_corpus(path, 640, n_genes=100, shard_size=64, chunk_size=64)
    ds = CorpusDataset(path, shuffle_buffer=100)
    s0, s1 = (ds.batch_sampler(batch, 2, r, seed=1, epoch=0) for r in (0, 1))
    assert len(s0) == len(s1) == (n_cells // 2) // batch
    c0, c1 = _cells(s0), _cells(s1)
    assert not set(c0) & set(c1) and len(set(c0)) == len(c0)
    parts = [{(s, r) for s, a, b in smp.parts() for r in range(a, b)} for smp in (s0, s1)]
    assert not parts[0] & parts[1], "ranks read disjoint (shard, row) ranges"
    whole = {(s, r) for s in range(len(ds.sizes)) for r in range(ds.sizes[s])}
    assert len(whole - (parts[0] | parts[1])) == n_cells % (2 * batch)
    if n_cells == 640:
        assert set(c0) | set(c1) == set(range(640))
        shards0 = {s for s, _, _ in s0.parts()}
        assert shards0.isdisjoint({s for s, _, _ in s1.parts()}), "even shards: whole shards per rank"
    assert c0 != sorted(c0), "shuffled within the buffer"


def test_order_is_a_function_of_seed_and_epoch(synth):
    ds = CorpusDataset(synth, shuffle_buffer=50)
    a = _cells(ds.batch_sampler(8, 1, 0, seed=3, epoch=1))
    assert a == _cells(CorpusDataset(synth, shuffle_buffer=50).batch_sampler(8, 1, 0, seed=3, epoch=1))
    assert a != _cells(ds.batch_sampler(8, 1, 0, seed=3, epoch=2))
    assert a != _cells(ds.batch_sampler(8, 1, 0, seed=4, epoch=1))


@pytest.mark.parametrize("start", [0, 1, 6, 7, 40])
def test_resumed_epoch_is_the_tail(synth, start):
    ds = CorpusDataset(synth, shuffle_buffer=50)
    for world, rank in ((1, 0), (2, 1)):
        full = list(ds.batch_sampler(8, world, rank, seed=2, epoch=3))
        resumed = ds.batch_sampler(8, world, rank, seed=2, epoch=3, start_batch=start)
        assert len(resumed) == max(len(full) - start, 0)
        assert list(resumed) == full[start:]


def test_holdout_is_disjoint_and_stable(synth):
    ds = CorpusDataset(synth, val_fraction=0.2, split_seed=5)
    val = ds.heldout()
    assert 80 < len(val) < 200
    train = _cells(ds.batch_sampler(8, 2, 0, 0, 0)) + _cells(ds.batch_sampler(8, 2, 1, 0, 0))
    assert not set(train) & set(val.indices.tolist())
    assert val[0]["index"] == val.indices[0]
    batch = CellCollator(max_genes=32)(val.__getitems__([0, 1, 2]))
    assert batch["gene_ids"].shape[0] == 3


def test_synthetic_build_resumes_identically(tmp_path):
    kw = dict(n_genes=200, shard_size=40, chunk_size=30)
    full = synth_corpus(tmp_path / "full", 200, **kw)
    n = []

    def hook(path):
        n.append(path)
        if len(n) == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        synth_corpus(tmp_path / "cut", 200, hook=hook, **kw)
    assert not (tmp_path / "cut" / "manifest.json").exists()
    assert synth_corpus(tmp_path / "cut", 200, **kw) == full
    for s in full["shards"]:
        assert (tmp_path / "full" / s["file"]).read_bytes() == (tmp_path / "cut" / s["file"]).read_bytes()


def test_synthetic_fit_to_real_file(tmp_path, small_h5ad_path):
    m = synth_corpus(tmp_path / "fit", 100, fit=small_h5ad_path, shard_size=100, chunk_size=50)
    src = m["sources"][0]
    assert m["n_cells"] > 90 and 0.01 < src["dispersion"] < 10 and 100 < src["library_mean"] < 10000


def test_synthetic_anndata_options():
    """include forces genes in; proteins and spatial are drawn after the counts (counts unchanged);
    an isotype control stays low in every type; neighbours in space share types more than chance."""
    from fm.synthetic import synthetic_anndata

    plain = synthetic_anndata(n_cells=300, n_genes=200, n_types=3, seed=4)
    full = synthetic_anndata(n_cells=300, n_genes=200, n_types=3, seed=4, proteins=["CD3", "CD19", "IgG1_control"],
                             spatial=True)
    assert (plain.X != full.X).nnz == 0 and list(plain.var_names) == list(full.var_names)
    adt = full.obsm["protein_counts"]
    assert list(adt.columns) == ["CD3", "CD19", "IgG1_control"] and adt.index.equals(full.obs_names)
    assert (adt.to_numpy() >= 0).all() and (adt.to_numpy() % 1 == 0).all()
    by_type = adt.groupby(full.obs["cell_type"].to_numpy()).mean()
    assert (by_type["IgG1_control"] < by_type[["CD3", "CD19"]].max(1)).all()
    xy = full.obsm["spatial"]
    assert xy.shape == (300, 2) and xy.min() >= 0 and xy.max() <= 100
    nearest = np.argsort(((xy[:, None] - xy[None]) ** 2).sum(-1), axis=1)[:, 1]
    types = full.obs["cell_type"].to_numpy()
    assert (types[nearest] == types).mean() > 0.5  # chance: about 1/3
    forced = synthetic_anndata(n_cells=10, n_genes=200, seed=4, include=["B2M", "IL1B"])
    assert {"B2M", "IL1B"} <= set(forced.var_names) and forced.n_vars == 200
    with pytest.raises(ValueError, match="NOTAGENE"):
        synthetic_anndata(n_cells=10, n_genes=200, include=["NOTAGENE"])


def test_collator_fast_sort_path_changes_nothing(synth, monkeypatch):
    from fm.data import collator as C
    rows = CorpusDataset(synth).__getitems__(list(range(0, 700, 7)))
    col = CellCollator(max_genes=40, seed=3, epoch=2)
    fast = col(rows)
    monkeypatch.setattr(C, "_fast_hashed_order", lambda row, keys: None)
    slow = col(rows)
    assert all(np.array_equal(fast[k].numpy(), slow[k].numpy()) for k in fast)
