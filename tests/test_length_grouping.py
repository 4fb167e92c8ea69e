"""Padding (issue 13): length-bucketed inference gives every cell its own result (unbucketed up to float
rounding, bitwise-deterministic), the collator's token counts are the widths it pads to, and the
length-grouped samplers (in memory and streamed) are deterministic, cover each cell once per epoch,
shard evenly and resume on the same batch."""
import numpy as np
import pytest
import torch

import fm
from fm.data.collator import CellCollator, pad_multiple
from fm.data.streaming import CorpusDataset
from fm.data.synth_corpus import synth_corpus
from fm.inference import inference_collator, run_batched
from fm.train import LengthGroupedBatchSampler, ShardedBatchSampler, make_batch_sampler


def _padding_share(batches, lengths):
    real = sum(int(lengths[b].sum()) for b in batches)
    padded = sum(int(lengths[b].max()) * len(b) for b in batches)
    return 1 - real / padded


def test_bucketed_embeddings_match_unbucketed(tiny_model_dir, pbmc_small):
    model = fm.load(tiny_model_dir)
    bucketed, _ = run_batched(pbmc_small, model, lambda m, b: m.scfm(**b).cell_embedding,
                              width=model.config.d_model, batch_size=16)
    plain, _ = run_batched(pbmc_small, model, lambda m, b: m.scfm(**b).cell_embedding,
                           width=model.config.d_model, batch_size=16, bucket=False)
    # the same cell padded to another width differs in the last bits only (SDPA reduces over the padded
    # key length on CPU) — so does batch_size 16 vs 200 without bucketing
    np.testing.assert_allclose(bucketed, plain, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(fm.embed(pbmc_small, model, batch_size=16), bucketed)  # embed buckets
    np.testing.assert_array_equal(fm.embed(pbmc_small, model, batch_size=16), bucketed)  # deterministic


def test_outputs_land_on_their_own_rows(tiny_model_dir, pbmc_small):
    """fn's row i belongs to the batch's i-th cell: an exact per-cell integer (its token count) comes back
    in the cell's own row, with drop_empty holes and several chunks; buckets cut padding."""
    model = fm.load(tiny_model_dir)
    a = pbmc_small.copy()
    x = a.X.tolil()
    x[[3, 50], :] = 0  # empty cells: dropped, rows stay 0
    a.X = x.tocsr()
    seen = []

    def tokens(m, batch):
        mask = batch["attention_mask"]
        seen.append((int(mask.sum()), mask.numel()))
        return mask.sum(1, keepdim=True).float().expand(-1, 3)

    out, kept = run_batched(a, model, tokens, width=3, batch_size=8, chunk_size=70, drop_empty=True)
    collator = inference_collator(model)
    cells = model.cell_tokenizer.for_config(model.config).encode(a, drop_empty=True)
    expected = np.zeros(a.n_obs)
    expected[kept] = collator.token_counts(cells)
    assert not kept[[3, 50]].any() and kept.sum() == a.n_obs - 2
    np.testing.assert_array_equal(out[:, 0], expected)
    assert 1 - sum(s for s, _ in seen) / sum(n for _, n in seen) < 0.05, "bucketed: under 5 % padding"


@pytest.mark.parametrize("train", [False, True])
def test_token_counts_are_the_collated_lengths(small_h5ad_path, train):
    import anndata as ad
    from fm.tokenizer import CellTokenizer

    cells = CellTokenizer().encode(ad.read_h5ad(small_h5ad_path)[:300])
    collator = CellCollator(max_genes=400, zero_fraction=0.25, train=train, pad_to_multiple_of=1)
    batch = collator([cells[i] for i in range(len(cells))])
    np.testing.assert_array_equal(batch["attention_mask"].sum(1).numpy(), collator.token_counts(cells))
    assert batch["gene_ids"].shape[1] == collator.token_counts(cells).max()
    assert pad_multiple("cpu") == 1 and pad_multiple(torch.device("cuda", 0)) == 8
    assert CellCollator(pad_to_multiple_of=8)([cells[0]])["gene_ids"].shape[1] % 8 == 0


def _lengths(n=1000, seed=0):
    return np.random.default_rng(seed).integers(50, 1200, n)


def test_grouped_sampler_deterministic_covers_and_cuts_padding():
    lengths = _lengths()
    s = LengthGroupedBatchSampler(lengths, 16, seed=3, epoch=1)
    batches = list(s)
    assert batches == list(LengthGroupedBatchSampler(lengths, 16, seed=3, epoch=1))
    assert batches != list(LengthGroupedBatchSampler(lengths, 16, seed=3, epoch=2))
    assert len(batches) == len(s) == 1000 // 16 and all(len(b) == 16 for b in batches)
    cells = [i for b in batches for i in b]
    assert len(set(cells)) == len(cells), "each cell at most once per epoch"
    random = list(ShardedBatchSampler(1000, 16, seed=3, epoch=1))
    assert set(cells) == {i for b in random for i in b}, "the same cells as the random sampler (same drop)"
    assert max(lengths[batches[0]]) == lengths[cells].max(), "the longest batch first"
    assert _padding_share(batches, lengths) < 0.05 < _padding_share(random, lengths)
    sizes = [int(lengths[b].mean()) for b in batches]
    assert sizes != sorted(sizes) and sizes != sorted(sizes, reverse=True), "batch order shuffled"


def test_grouped_sampler_shards_evenly_and_resumes():
    lengths = _lengths(1003)
    one = list(LengthGroupedBatchSampler(lengths, 32, seed=5, epoch=0))
    ranks = [list(LengthGroupedBatchSampler(lengths, 16, 2, r, seed=5, epoch=0)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == len(one) == 1003 // 32
    for b, r0, r1 in zip(one, *ranks):
        assert sorted(r0 + r1) == sorted(b), "2 × 16 sees the global batches of 1 × 32"
        assert abs(max(lengths[r0]) - max(lengths[r1])) <= np.ptp(lengths[b]), "ranks pad alike"
    for r in (0, 1):
        resumed = make_batch_sampler(list(range(1003)), 16, 2, r, 5, 0, 7, lengths, length_grouping=True)
        assert len(resumed) == len(ranks[r]) - 7 and list(resumed) == ranks[r][7:]


def test_grouped_corpus_stream(tmp_path):
    synth_corpus(tmp_path / "c", 700, n_genes=300, n_types=3, shard_size=64, chunk_size=50)
    ds = CorpusDataset(tmp_path / "c", shuffle_buffer=100)
    n_genes = ds.n_genes(np.arange(len(ds)))
    assert [len(ds[i]["gene_ids"]) for i in (0, 63, 64, 699)] == n_genes[[0, 63, 64, 699]].tolist()
    for rank in (0, 1):
        plain = ds.batch_sampler(8, 2, rank, seed=1, epoch=0)
        grouped = ds.batch_sampler(8, 2, rank, seed=1, epoch=0, length_grouping=True)
        g = list(grouped)
        assert len(g) == len(plain) and sorted(i for b in g for i in b) == sorted(i for b in plain for i in b)
        assert g == list(ds.batch_sampler(8, 2, rank, seed=1, epoch=0, length_grouping=True))
        assert _padding_share(g, n_genes) < _padding_share(list(plain), n_genes) / 2
        for start in (3, 50, len(g) - 1):
            assert list(ds.batch_sampler(8, 2, rank, seed=1, epoch=0, start_batch=start, length_grouping=True)) == g[start:]
