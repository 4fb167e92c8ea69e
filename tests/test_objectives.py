"""Pretraining objectives that shape the cell embedding: whole-cell expression decoding (WCED) targets,
gene-subset views and their contrastive loss."""
import numpy as np
import torch

from fm.data.collator import CellCollator
from fm.modeling_scfm import ScFMConfig, ScFMForMaskedExpression
from fm.objectives import view_contrastive_loss
from fm.preprocessing import TARGET_SUM
from fm.tokenizer import CellTokenizer


def _cells(pbmc_small):
    return CellTokenizer().encode(pbmc_small)


def test_whole_cell_targets_are_log_normalised_panel_genes(pbmc_small):
    cells = _cells(pbmc_small)
    rows = [cells[i] for i in range(8)]
    batch = CellCollator(max_genes=64, seed=0, decode_genes=100)(rows)
    ids, targets, weights = batch["decode_gene_ids"], batch["decode_targets"], batch["decode_weights"]
    assert ids.shape == (100,) and targets.shape == weights.shape == (8, 100)
    assert torch.all(ids[1:] > ids[:-1])  # sorted, distinct panel genes
    assert weights.all()  # one file: every chosen gene was measured in every cell
    for i, row in enumerate(rows):
        expected = dict(zip(row["gene_ids"].tolist(), np.log1p(row["counts"] / row["counts"].sum() * TARGET_SUM)))
        want = np.array([expected.get(g, 0.0) for g in ids.tolist()], dtype=np.float32)
        np.testing.assert_allclose(targets[i].numpy(), want, rtol=1e-5)
    assert (targets > 0).any() and (targets == 0).any()  # expressed and unexpressed genes both decoded


def test_views_share_cells_but_not_genes(pbmc_small):
    cells = _cells(pbmc_small)
    rows = [cells[i] for i in range(6)]
    col = CellCollator(max_genes=256, seed=0, views=2, view_keep=0.5, decode_genes=32)
    batch = col(rows)
    assert batch["gene_ids"].shape[0] == 12 and batch["view_of"].tolist() == list(range(6)) * 2
    assert torch.equal(batch["decode_targets"][:6], batch["decode_targets"][6:])
    for i in range(6):
        a = set(batch["gene_ids"][i][batch["attention_mask"][i]].tolist())
        b = set(batch["gene_ids"][i + 6][batch["attention_mask"][i + 6]].tolist())
        n_expr = len(rows[i]["gene_ids"])
        assert a != b and len(a) <= int(np.ceil(n_expr * 0.5)) + 64  # half the expressed genes (+ zero genes)
    again = col(rows)
    assert all(torch.equal(batch[k], again[k]) for k in batch)  # deterministic


def test_contrastive_loss_prefers_matching_views():
    torch.manual_seed(0)
    z = torch.randn(8, 16)
    view_of = torch.arange(4).repeat(2)
    matched = view_contrastive_loss(torch.cat([z[:4], z[:4] + 0.01 * torch.randn(4, 16)]), view_of, 0.1)
    shuffled = view_contrastive_loss(torch.cat([z[:4], z[4:]]), view_of, 0.1)
    assert matched < 0.1 < shuffled


def test_pretraining_model_trains_every_objective(pbmc_small):
    cells = _cells(pbmc_small)
    config = ScFMConfig(vocab_size=160_000, d_model=32, n_layers=1, n_heads=2, d_ff=64, max_genes=64,
                        pooling="mean", wced_genes=64, contrastive_weight=0.5)
    model = ScFMForMaskedExpression(config)
    batch = CellCollator(max_genes=64, seed=0, views=2, view_keep=0.5, decode_genes=64)([cells[i] for i in range(8)])
    out = model(**batch)
    assert out.wced_loss is not None and out.contrastive_loss is not None and out.gep_loss is not None
    expected = out.gep_loss + out.mvc_loss + out.wced_loss + 0.5 * out.contrastive_loss
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    assert model.wced_head.query.weight.grad.abs().sum() > 0
    assert model.contrastive_head[0].weight.grad.abs().sum() > 0


def test_thinned_views_are_shallower_copies(pbmc_small):
    cells = _cells(pbmc_small)
    rows = [cells[i] for i in range(8)]
    col = CellCollator(max_genes=512, zero_fraction=0.0, seed=0, views=2, view_thinning=0.8)
    thinned = col._thinned(rows, 1)
    for row, thin in zip(rows, thinned):
        assert set(thin["gene_ids"].tolist()) <= set(row["gene_ids"].tolist())
        assert 0 < thin["counts"].sum() <= row["counts"].sum() + len(row["counts"])
    assert sum(t["counts"].sum() for t in thinned) < sum(r["counts"].sum() for r in rows)
    assert all(np.array_equal(a["counts"], b["counts"]) for a, b in zip(thinned, col._thinned(rows, 1)))
    batch = col(rows)
    assert batch["attention_mask"][8:].sum() < batch["attention_mask"][:8].sum()


def test_coexpression_rows_follow_the_corpus(pbmc_small):
    from fm.gene_init import coexpression_rows, init_gene_table_from_corpus
    from fm.pretrain import encoded_genes, gene_table

    tokenizer = CellTokenizer()
    cells = tokenizer.encode(pbmc_small)
    genes, rows = coexpression_rows(cells, dim=16, seed=0)
    np.testing.assert_array_equal(genes, np.unique(cells.gene_ids))
    assert rows.shape == (len(genes), 16)
    np.testing.assert_allclose(np.sqrt((rows ** 2).sum(1).mean()), 1.0, rtol=1e-4)
    np.testing.assert_array_equal(rows, coexpression_rows(cells, dim=16, seed=0)[1])  # deterministic
    # genes that go up and down together get similar rows: the row cosine tracks the expression correlation
    x = np.zeros((len(cells), len(genes)))
    for i in range(len(cells)):
        row = cells[i]
        x[i, np.searchsorted(genes, row["gene_ids"])] = np.log1p(row["counts"] / row["counts"].sum() * 1e4)
    top = np.argsort(-x.var(0))[:20]
    corr = np.corrcoef(x[:, top].T)[np.triu_indices(20, 1)]
    unit = rows[top] / np.linalg.norm(rows[top], axis=1, keepdims=True)
    cos = (unit @ unit.T)[np.triu_indices(20, 1)]
    assert np.corrcoef(corr, cos)[0, 1] > 0.5

    for table in (gene_table(encoded_genes(cells, len(tokenizer.vocab)), tokenizer), None):  # compact, full
        config = ScFMConfig(vocab_size=len(tokenizer.vocab), gene_table=table, d_model=16, n_layers=1,
                            n_heads=2, d_ff=32, max_genes=64)
        model = ScFMForMaskedExpression(config)
        specials = torch.arange(16)
        before = model.scfm.embeddings.embed_genes(specials).detach().clone()
        init_gene_table_from_corpus(model, cells, seed=0)
        emb = model.scfm.embeddings
        assert torch.equal(emb.embed_genes(specials), before)  # special tokens keep their rows
        np.testing.assert_allclose(emb.embed_genes(torch.from_numpy(genes)).detach().numpy(), rows, rtol=1e-6)
