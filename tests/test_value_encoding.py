"""The value-encoding seam: bins unchanged bit for bit, rank/continuous as documented, each one
trains, and an exported model brings its encoding back through fm.load."""
import hashlib

import numpy as np
import pytest
import torch

import fm
from fm.binning import rank_value_encode
from fm.config import DataConfig, ModelConfig, load_config
from fm.configuration_scfm import ScFMConfig
from fm.data.collator import CellCollator
from fm.modeling_scfm import ScFMForMaskedExpression
from fm.paths import recipe_path
from fm.pretrain import run_pretraining
from fm.tokenizer import CellTokenizer
from fm.value_encoding import (BinEncoding, ContinuousEncoding, RankEncoding, ValueEncoding,
                               get_value_encoding)

from conftest import tiny_overrides

ENCODINGS = ("bins", "rank", "continuous")


@pytest.fixture()
def cells(pbmc_small):
    return CellTokenizer().encode(pbmc_small)


@pytest.fixture()
def real_cells(pbmc_path):
    """The real pbmc3k cells the golden digests were taken on (skips without the shared data)."""
    import anndata as ad

    return CellTokenizer().encode(ad.read_h5ad(pbmc_path)[:200].copy())


def _digest(batch: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(batch):
        t = batch[k].numpy()
        h.update(k.encode() + str(t.dtype).encode() + str(t.shape).encode())
        h.update(np.ascontiguousarray(t).tobytes())
    return h.hexdigest()


# sha256 of the batches of the first 64 pbmc3k-hvg2000 cells from the collator BEFORE this seam
# (commit a298f22, bin_csr called inline): the default encoding must reproduce them bit for bit.
GOLDEN = [
    (dict(max_genes=256, seed=1, zero_fraction=0.25, train=True),
     "d783429a75e9c57b35d27faa9211ab50a38462d55bd20a113e0fb4f40438e222"),
    (dict(max_genes=256, zero_fraction=0.25, train=False),
     "41af4e51a4d19d5a6a4745384ea1f16865bca3b06d435d64859a0165eda33a49"),
    (dict(max_genes=64, n_bins=11, train=True, seed=2),
     "96f6682f9c4c8e53ed87fb9a3c69157055ce83fec2fdcf672aca35810ec32910"),
]


@pytest.mark.parametrize("kwargs,golden", GOLDEN)
def test_bins_batches_are_bit_identical_to_before(real_cells, kwargs, golden):
    rows = [real_cells[i] for i in range(64)]
    assert _digest(CellCollator(**kwargs)(rows)) == golden
    n_bins = kwargs.get("n_bins", 51)
    assert _digest(CellCollator(**kwargs, value_encoding=BinEncoding(n_bins))(rows)) == golden


def test_rank_levels_on_a_hand_example():
    # cell 0: counts 5, 1, 3, 3 (ties by position); cell 1: empty; cell 2: a stored zero and one count
    indptr, counts = np.array([0, 4, 4, 6]), np.array([5, 1, 3, 3, 0, 7], np.float32)
    # K = 4 levels, m = 4: ranks 0, 3, 1, 2 -> 4 - (r * 4) // 4 = 4, 1, 3, 2; m = 1: rank 0 -> 4
    np.testing.assert_array_equal(RankEncoding(5).encode(indptr, counts), [4, 1, 3, 2, 0, 4])
    # m = 3 < K = 50: levels spread evenly from the top: 50 - (r * 50) // 3 = 50, 34, 17
    np.testing.assert_array_equal(RankEncoding(51).encode(np.array([0, 3]), np.array([9., 4., 1.])), [50, 34, 17])


def test_rank_order_is_geneformers(cells):
    """Ordering genes by level (ties broken by position) gives rank_value_encode's order with unit medians."""
    part = cells
    levels = RankEncoding(1_000_000).encode(part.indptr, part.counts)  # K >> m: one level per rank
    n_counts = np.add.reduceat(part.counts.astype(np.float64), part.indptr[:-1])
    ip, cols = rank_value_encode(part.indptr, part.gene_ids.astype(np.int64), part.counts, n_counts,
                                 np.ones(int(part.gene_ids.max()) + 1), max_len=10**6)
    for i in range(len(part)):
        lo, hi = part.indptr[i], part.indptr[i + 1]
        ours = part.gene_ids[lo:hi][np.argsort(-levels[lo:hi], kind="stable")]
        np.testing.assert_array_equal(ours, cols[ip[i]:ip[i + 1]])


def test_continuous_values_on_a_hand_example():
    indptr, counts = np.array([0, 3, 3, 4]), np.array([1, 3, 0, 2], np.float32)
    got = ContinuousEncoding().encode(indptr, counts)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, np.log1p([1e4 / 4, 3e4 / 4, 0, 1e4]).astype(np.float32), rtol=1e-6)


def test_protocol_registry_and_special_values():
    for name in ENCODINGS:
        enc = get_value_encoding(name, 21)
        assert isinstance(enc, ValueEncoding) and enc.name == name and enc.n_bins == 21
        assert ScFMConfig(value_encoding=name, n_bins=21).mask_value_id == enc.mask_value_id
    assert (BinEncoding(21).mask_value_id, BinEncoding(21).pad_value_id, BinEncoding(21).n_tokens) == (21, 22, 23)
    assert (ContinuousEncoding.mask_value_id, ContinuousEncoding.pad_value_id) == (-1.0, -2.0)
    with pytest.raises(ValueError, match="value_encoding"):
        get_value_encoding("log")
    with pytest.raises(ValueError, match="n_bins"):
        get_value_encoding(BinEncoding(11), 51)


def test_configs_validate_the_same_bounds():
    for bad in (dict(value_encoding="log"), dict(n_bins=1)):
        with pytest.raises(ValueError):
            ScFMConfig(**bad)
    with pytest.raises(ValueError, match="value_encoding"):
        DataConfig(value_encoding="log")
    with pytest.raises(ValueError, match="n_bins"):
        ModelConfig(n_bins=1)
    assert ModelConfig(n_bins=2).n_bins == ScFMConfig(n_bins=2).n_bins == 2


@pytest.mark.parametrize("name", ["rank", "continuous"])
def test_collator_batches_per_encoding(cells, name):
    rows = [cells[i] for i in range(8)]
    col = CellCollator(max_genes=64, zero_fraction=0.25, seed=1, value_encoding=name)
    batch = col(rows)
    real, masked = batch["attention_mask"], batch["masked_positions"]
    assert (batch["values"][masked] == col.mask_value_id).all()
    assert (batch["values"][~real] == col.pad_value_id).all()
    # labels = the encoding of the whole cell at the kept genes, as for bins
    enc = get_value_encoding(name)
    for i, r in enumerate(rows):
        full = enc.encode(np.array([0, len(r["counts"])]), r["counts"])
        genes = batch["gene_ids"][i][real[i]].numpy()
        labels = batch["labels"][i][real[i]].numpy()
        expressed = np.isin(genes, r["gene_ids"])
        want = full[np.searchsorted(r["gene_ids"], genes[expressed])]
        np.testing.assert_array_equal(labels[expressed], want.astype(np.float32))
        assert (labels[~expressed] == 0).all()
    dtype = torch.float32 if name == "continuous" else torch.int64
    assert batch["values"].dtype == dtype


def test_each_encoding_trains_a_tiny_model(cells):
    rows = [cells[i] for i in range(16)]
    inputs = {}
    for name in ENCODINGS:
        torch.manual_seed(0)
        config = ScFMConfig(vocab_size=len(CellTokenizer().vocab), value_encoding=name, d_model=32, n_heads=4,
                            n_layers=2, d_ff=64, max_genes=64)
        model = ScFMForMaskedExpression(config)
        continuous = name == "continuous"
        assert isinstance(model.scfm.embeddings.value, torch.nn.Embedding) != continuous
        collator = CellCollator(max_genes=64, seed=1, value_encoding=config.value_encoding)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses = []
        for epoch in range(3):
            collator.epoch = epoch
            batch = collator(rows)
            loss = model(**batch).loss
            loss.backward()
            if continuous:  # the learned <mask> vector (row 0) is used and trained
                assert model.scfm.embeddings.value.special.weight.grad[0].abs().sum() > 0
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        assert np.isfinite(losses).all()
        collator.epoch = 0
        inputs[name] = collator(rows)
    genes = inputs["bins"]["gene_ids"]
    assert all(torch.equal(inputs[n]["gene_ids"], genes) for n in ENCODINGS), "same genes and masks"
    assert not torch.equal(inputs["bins"]["labels"], inputs["rank"]["labels"])
    assert not torch.equal(inputs["bins"]["labels"], inputs["continuous"]["labels"])


def test_bins_model_keeps_its_parameter_names():
    names = set(ScFMForMaskedExpression(ScFMConfig(vocab_size=50, d_model=16, n_heads=2, n_layers=1,
                                                   d_ff=32)).state_dict())
    assert "scfm.embeddings.value.weight" in names and not any("special" in n for n in names)


def test_export_and_load_rebuild_the_encoding(tmp_path, small_h5ad_path, pbmc_small):
    cfg = load_config(recipe_path("debug"), tiny_overrides(tmp_path, [small_h5ad_path], steps=3,
                                                           **{"data.value_encoding": "continuous"}))
    result = run_pretraining(cfg)
    model = fm.load(result.export_dir)
    assert model.config.value_encoding == "continuous" and model.config.encoding == ContinuousEncoding(51)
    emb = fm.embed(pbmc_small[:20].copy(), model, batch_size=8)  # api builds the continuous collator
    assert emb.shape == (20, 32) and np.isfinite(emb).all()
