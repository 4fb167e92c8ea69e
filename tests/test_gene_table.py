"""The compact gene table (issue 11, item 2): a model has embedding rows only for the special tokens and
the genes of its pretraining data, addressed by global vocabulary ids through ScFMEmbeddings.embed_genes;
its tokenizer drops (and reports) vocabulary genes without a row; old full-table checkpoints load as before."""
from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pytest
import torch

import fm
from fm.data.corpus import build_corpus, corpus_genes
from fm.data.synth_corpus import synth_corpus
from fm.modeling_scfm import ScFMConfig, ScFMForMaskedExpression, ScFMModel
from fm.tokenizer import CellTokenizer
from fm.vocab import GeneVocab

N_SPECIAL = GeneVocab.n_special


def _tiny_config(**kw) -> ScFMConfig:
    return ScFMConfig(**{"vocab_size": len(GeneVocab.default()), "d_model": 16, "n_heads": 2, "n_layers": 1,
                         "d_ff": 32, "max_genes": 64, **kw})


def _file_genes(adata, tokenizer=None) -> np.ndarray:
    match = (tokenizer or CellTokenizer()).match_genes(adata)
    return np.sort(match.vocab_ids[match.vocab_ids >= 0])


def _as_ensembl(adata: ad.AnnData) -> ad.AnnData:
    """The same cells with var_names = the Ensembl IDs of their symbols (genes outside the vocabulary dropped)."""
    ids = CellTokenizer().match_genes(adata).vocab_ids
    out = adata[:, ids >= 0].copy()
    out.var_names = GeneVocab.default().tokens[ids[ids >= 0]].astype(str)
    return out


def test_embed_genes_maps_vocab_ids_to_rows():
    table = list(range(N_SPECIAL)) + [100, 2000, 70_000]
    emb = ScFMForMaskedExpression(_tiny_config(gene_table=table)).scfm.embeddings
    assert emb.gene.num_embeddings == len(table) and emb.gene.padding_idx == 0
    rows = emb.embed_genes(torch.tensor([[100, 2000, 70_000, 1]]))
    torch.testing.assert_close(rows[0], emb.gene.weight[[N_SPECIAL, N_SPECIAL + 1, N_SPECIAL + 2, 1]])
    assert emb.embed_genes(torch.tensor([101])).abs().sum() == 0, "an id without a row reads the zero pad row"
    with pytest.raises(ValueError, match="distinct"):
        _tiny_config(gene_table=[0, 1, 2, 2000, 2000])
    with pytest.raises(ValueError, match="special token ids \\[1\\]"):
        _tiny_config(gene_table=[0, 100])
    # an imported checkpoint keeps its own row order: rows are found through the id, not the position
    shuffled = ScFMForMaskedExpression(_tiny_config(gene_table=[2000, 1, 100, 0])).scfm.embeddings
    assert shuffled.gene.padding_idx == 3
    torch.testing.assert_close(shuffled.embed_genes(torch.tensor([100, 2000])), shuffled.gene.weight[[2, 0]])


def test_symbols_and_ensembl_ids_read_the_same_rows(pbmc_small, caplog):
    genes = _file_genes(pbmc_small)
    table = np.union1d(np.arange(N_SPECIAL), genes[::2])  # half the file's genes have rows
    tokenizer = CellTokenizer(gene_table=table)
    by_symbol = tokenizer.encode(pbmc_small)
    by_id = tokenizer.encode(_as_ensembl(pbmc_small))
    assert np.isin(by_symbol.gene_ids, table).all(), "genes without a row never reach the model"
    np.testing.assert_array_equal(by_symbol.gene_ids, by_id.gene_ids)
    np.testing.assert_array_equal(by_symbol.counts, by_id.counts)
    dropped = [r.getMessage() for r in caplog.records if "not in this model's gene table" in r.getMessage()]
    assert len(dropped) == 2 and f"{genes.size - genes[::2].size} of its {genes.size} vocabulary genes" in dropped[0]
    assert "e.g. [" in dropped[0] and "they are dropped" in dropped[0]


def test_too_few_genes_in_the_table_is_an_actionable_error(pbmc_small):
    genes = _file_genes(pbmc_small)
    elsewhere = np.setdiff1d(np.arange(100_000, 101_000), genes)  # model genes this file does not measure
    tokenizer = CellTokenizer(gene_table=np.union1d(np.arange(N_SPECIAL), np.concatenate([genes[:10], elsewhere])))
    with pytest.raises(ValueError, match=r"only 10 of its \d+ vocabulary genes \(human\) are genes this model was "
                                         r"pretrained on .*allow_untrained_genes = True"):
        tokenizer.match_genes(pbmc_small)
    # few of the file's genes but all of the model's: fine (a panel-pretrained model reading a wide file)
    panel = CellTokenizer(gene_table=np.union1d(np.arange(N_SPECIAL), genes[:10]))
    assert panel.match_genes(pbmc_small).n_matched == 10


def test_pretrained_table_is_the_corpus_genes_and_round_trips(tiny_model_dir, small_h5ad_path, pbmc_small, tmp_path):
    model = fm.load(tiny_model_dir)
    genes = _file_genes(ad.read_h5ad(small_h5ad_path, backed="r"))
    expected = np.union1d(np.arange(N_SPECIAL), genes)
    np.testing.assert_array_equal(model.config.gene_table, expected)
    assert model.scfm.embeddings.gene.num_embeddings == expected.size
    np.testing.assert_array_equal(model.cell_tokenizer.gene_table, expected)
    np.testing.assert_array_equal(CellTokenizer.from_pretrained(tiny_model_dir).gene_table, expected)  # fine-tuning's
    assert "gene_index" not in "".join(model.state_dict()), "config.gene_table is the one copy"
    first = fm.embed(pbmc_small.copy(), model)
    model.save_pretrained(tmp_path / "again")
    model.cell_tokenizer.save_pretrained(tmp_path / "again")
    again = fm.load(tmp_path / "again")
    np.testing.assert_array_equal(fm.embed(pbmc_small.copy(), again), first)
    np.testing.assert_array_equal(fm.embed(pbmc_small.copy(), model), first)  # deterministic


def test_full_table_checkpoint_without_gene_table_key_loads(tmp_path, pbmc_small):
    torch.manual_seed(0)
    model = ScFMModel(_tiny_config()).eval()
    model.save_pretrained(tmp_path)
    CellTokenizer().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("gene_table")  # as written before compact tables existed
    (tmp_path / "config.json").write_text(json.dumps(config))
    old = fm.load(tmp_path)
    assert old.config.gene_table is None and old.embeddings.gene_index is None
    assert old.embeddings.gene.num_embeddings == len(GeneVocab.default())
    assert old.cell_tokenizer.gene_table is None
    torch.testing.assert_close(old.embeddings.gene.weight, model.embeddings.gene.weight, rtol=0, atol=0)
    model.cell_tokenizer = CellTokenizer()
    np.testing.assert_array_equal(fm.embed(pbmc_small.copy(), old), fm.embed(pbmc_small.copy(), model))


def test_inference_uses_the_model_table_whatever_tokenizer_is_attached(tiny_model_dir, pbmc_small):
    model = fm.load(tiny_model_dir)
    expected = fm.embed(pbmc_small.copy(), model)
    model.cell_tokenizer = CellTokenizer()  # a bare tokenizer knows no table: the engine takes the model's
    np.testing.assert_array_equal(fm.embed(pbmc_small.copy(), model), expected)


def test_corpus_manifest_lists_its_genes_and_old_corpora_are_scanned(tmp_path, pbmc_small):
    built = build_corpus([pbmc_small], tmp_path / "built", shard_size=100)
    np.testing.assert_array_equal(built["gene_ids"], _file_genes(pbmc_small))  # measured, expressed or not
    out = tmp_path / "synth"
    manifest = synth_corpus(out, n_cells=300, n_genes=150, shard_size=100, seed=3)
    listed = np.asarray(manifest["gene_ids"])
    assert listed.size == 150 and (np.diff(listed) > 0).all()
    np.testing.assert_array_equal(corpus_genes(out), listed)
    manifest.pop("gene_ids")  # a corpus built before manifests listed genes
    (out / "manifest.json").write_text(json.dumps(manifest))
    scanned = corpus_genes(out)
    assert np.isin(scanned, listed).all() and scanned.size > 0.9 * listed.size  # only expressed genes are stored


def test_pretrain_from_corpus_sizes_the_table_from_the_manifest(tmp_path):
    from conftest import tiny_overrides
    from fm.config import load_config
    from fm.paths import recipe_path
    from fm.pretrain import run_pretraining

    out = tmp_path / "synth"
    manifest = synth_corpus(out, n_cells=200, n_genes=120, shard_size=100, seed=4)
    cfg = load_config(recipe_path("debug"), tiny_overrides(tmp_path / "run", [out], 2))
    model = run_pretraining(cfg).model
    np.testing.assert_array_equal(model.config.gene_table, np.union1d(np.arange(N_SPECIAL), manifest["gene_ids"]))
    full = load_config(recipe_path("debug"), tiny_overrides(tmp_path / "full", [out], 1) + ["model.gene_table=full"])
    assert run_pretraining(full).model.config.gene_table is None
    with pytest.raises(ValueError, match="model.gene_table"):
        load_config(recipe_path("debug"), ["model.gene_table=some"])
