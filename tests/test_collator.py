"""The collator: shapes, masking, deterministic sampling independent of batch composition."""
import numpy as np
import pytest
import torch

from fm.data.collator import CellCollator
from fm.tokenizer import CellTokenizer
from fm.value_encoding import BinEncoding


@pytest.fixture()
def cells(pbmc_small):
    return CellTokenizer().encode(pbmc_small)


def test_train_batch_shapes_and_masking(cells):
    col = CellCollator(max_genes=64, mask_ratio=0.4, seed=1)
    batch = col([cells[i] for i in range(16)])
    b, width = batch["gene_ids"].shape
    assert b == 16 and width % 8 == 0 and width <= 64
    lengths = np.minimum(np.diff(cells.indptr[:17]), 64)
    assert batch["attention_mask"].sum(1).tolist() == lengths.tolist()
    masked = batch["masked_positions"]
    assert not (masked & ~batch["attention_mask"]).any()
    assert masked.sum(1).tolist() == np.maximum(np.rint(lengths * 0.4), 1).astype(int).tolist()
    assert (batch["values"][masked] == col.mask_value_id).all()
    assert (batch["values"][~batch["attention_mask"]] == col.pad_value_id).all()
    real = batch["attention_mask"] & ~masked
    assert batch["values"][real].min() >= 1 and batch["values"][real].max() <= 50
    assert (batch["labels"][masked] >= 1).all()


def test_sampling_depends_on_cell_not_batch(cells):
    col = CellCollator(max_genes=32, seed=3)
    alone = col([cells[5]])
    together = col([cells[i] for i in (9, 5, 2)])
    n = int(alone["attention_mask"].sum())
    genes_alone = set(alone["gene_ids"][0, :n].tolist())
    genes_together = set(together["gene_ids"][1][together["attention_mask"][1]].tolist())
    assert genes_alone == genes_together
    assert set(alone["gene_ids"][0][alone["masked_positions"][0]].tolist()) == \
        set(together["gene_ids"][1][together["masked_positions"][1]].tolist())
    col.epoch = 1
    assert set(col([cells[5]])["gene_ids"][0, :n].tolist()) != genes_alone  # a new epoch, new sample


def test_inference_keeps_most_expressed_genes(cells):
    col = CellCollator(max_genes=10, train=False)
    batch = col([cells[0]])
    row = cells[0]
    top = row["gene_ids"][np.lexsort((row["gene_ids"], -row["counts"]))[:10]]
    assert batch["gene_ids"][0][batch["attention_mask"][0]].tolist() == top.tolist()
    assert "labels" not in batch
    again = col([cells[0]])
    assert all(torch.equal(batch[k], again[k]) for k in batch)


def test_bins_are_computed_over_the_whole_cell(cells):
    row = cells[3]
    full_bins = BinEncoding(51).encode(np.array([0, len(row["counts"])]), row["counts"])
    batch = CellCollator(max_genes=16, train=False)([row])
    chosen = batch["gene_ids"][0][batch["attention_mask"][0]].numpy()
    expected = full_bins[np.searchsorted(row["gene_ids"], chosen)]
    np.testing.assert_array_equal(batch["values"][0][batch["attention_mask"][0]].numpy(), expected)


def test_zero_genes_come_from_the_panel_and_are_unexpressed(cells):
    col = CellCollator(max_genes=64, zero_fraction=0.25, seed=2)
    rows = [cells[i] for i in range(8)]
    assert all("panel" in r for r in rows)
    batch = col(rows)
    for i, r in enumerate(rows):
        real = batch["attention_mask"][i]
        genes = batch["gene_ids"][i][real].numpy()
        labels = batch["labels"][i][real].numpy()
        zero = genes[labels == 0]
        assert len(zero) == 16 and len(set(genes.tolist())) == len(genes)
        assert np.isin(zero, r["panel"]).all() and not np.isin(zero, r["gene_ids"]).any()
        assert (labels > 0).sum() == min(len(r["gene_ids"]), 48)
    infer = CellCollator(max_genes=64, zero_fraction=0.25, train=False)
    a, b = infer(rows[:3]), infer([rows[1]])
    n = int(b["attention_mask"][0].sum())
    assert a["gene_ids"][1][:n].tolist() == b["gene_ids"][0][:n].tolist(), "independent of the batch"


@pytest.mark.parametrize("seed", [1, 2, 7])
def test_inference_tokens_do_not_depend_on_the_seed(cells, seed):
    """A fine-tune's validation pass (its collator seeded with train.seed) and fm.annotate / fm.embed
    (seed 0) show a cell the same genes — its zero genes included — whatever the run's seed."""
    from fm.data.collator import LabeledCellCollator

    rows = [{**cells[i], "label": 0} for i in range(12)]
    validation = LabeledCellCollator(max_genes=64, zero_fraction=0.25, seed=seed)(rows)
    inference = CellCollator(max_genes=64, zero_fraction=0.25, train=False)(rows)
    for key in ("gene_ids", "values", "attention_mask"):
        torch.testing.assert_close(validation[key], inference[key])
    assert (inference["values"][inference["attention_mask"]] == 0).sum() >= 12 * 16 - 16, "zero genes present"
