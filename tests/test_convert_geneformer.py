"""Geneformer import (fm/convert/geneformer.py, fm/modeling_bert.py): the tiny V1 fixture's reference outputs from
its stored input_ids and from the raw h5ad through our tokenizer + collator, the export round trip, determinism,
fine-tuning a head on the imported backbone, and bad inputs (no dictionaries, pickled objects, missing keys)."""
from __future__ import annotations

import json
import pickle
import shutil

import anndata as ad
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import fm
from fm.convert.common import REPORT_FILE, CheckpointFormatError
from fm.convert.geneformer import convert_geneformer, load_geneformer
from fm.inference import inference_collator

from conftest import CITESEQ, PBMC, fixture_path, real_file

TOL = 1e-5


@pytest.fixture(scope="module")
def gf_dir():
    return fixture_path("geneformer_tiny")


@pytest.fixture(scope="module")
def reference(gf_dir):
    return dict(np.load(gf_dir / "reference.npz"))


@pytest.fixture(scope="module")
def imported(gf_dir):
    return load_geneformer(gf_dir)


@pytest.fixture(scope="module")
def converted(gf_dir, tmp_path_factory):
    return convert_geneformer(gf_dir, tmp_path_factory.mktemp("gf") / "model")


@pytest.fixture(scope="module")
def citeseq16():
    adata = ad.read_h5ad(real_file(CITESEQ))[:16].copy()
    return adata


def _gene_ids(model, input_ids, attention_mask):
    """Geneformer token ids (= word-embedding rows) → our vocabulary ids, as the collator hands them in."""
    table = torch.tensor(model.config.gene_table)
    ids, mask = torch.from_numpy(input_ids), torch.from_numpy(attention_mask).bool()
    return torch.where(mask, table[ids], torch.zeros_like(ids)), mask


def test_reference_outputs_from_stored_input_ids(imported, reference):
    model, _, report = imported
    assert report["version"] == "V1" and report["architecture"] == "ScFMBertForMaskedLM"
    assert not model.training and next(model.parameters()).dtype == torch.float32
    gene_ids, mask = _gene_ids(model, reference["input_ids"], reference["attention_mask"])
    with torch.no_grad():
        out = model(gene_ids, attention_mask=mask)
        np.testing.assert_allclose(out.cell_embedding.numpy(), reference["cell_emb_penultimate"], atol=TOL, rtol=0)
        np.testing.assert_allclose(out.logits[0, :5].numpy(), reference["logits_first_cell_first5"], atol=TOL, rtol=0)
        model.config.embedding_layer = 0  # Geneformer's emb_layer=0: the last layer
        try:
            last = model(gene_ids, attention_mask=mask).cell_embedding
        finally:
            model.config.embedding_layer = -1
    np.testing.assert_allclose(last.numpy(), reference["cell_emb_last"], atol=TOL, rtol=0)


def test_embed_from_h5ad_reproduces_geneformer_tokens(converted, reference, citeseq16):
    model = fm.load(converted)
    assert model.cell_tokenizer.gene_key is None  # the tokenizer finds var.gene_ids itself: the model's genes are IDs
    cells = model.cell_tokenizer.for_config(model.config).encode(citeseq16)
    batch = inference_collator(model)([cells[i] for i in range(len(cells))])
    row_of = {v: r for r, v in enumerate(model.config.gene_table)}
    for i in range(16):
        real = batch["attention_mask"][i].numpy()
        assert real[: real.sum()].all(), "tokens are left-aligned"
        ours = [row_of[int(g)] for g in batch["gene_ids"][i][real]]
        theirs = reference["input_ids"][i][reference["attention_mask"][i] == 1]
        assert ours == theirs.tolist(), f"cell {i}: token order differs from Geneformer's"
    emb = fm.embed(citeseq16, model, batch_size=16)
    np.testing.assert_allclose(emb, reference["cell_emb_penultimate"], atol=TOL, rtol=0)


def test_round_trip_and_auto_model(imported, converted, reference):
    model = imported[0]
    loaded = fm.load(converted)
    assert type(loaded) is type(model) and loaded.config.gene_table == model.config.gene_table
    assert json.loads((converted / REPORT_FILE).read_text())["n_genes"] == 25424
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    gene_ids, mask = _gene_ids(model, reference["input_ids"][:4], reference["attention_mask"][:4])
    from transformers import AutoModel

    backbone = AutoModel.from_pretrained(converted)  # model_type "scfm" with a bert backbone → ScFMBertModel
    assert type(backbone).__name__ == "ScFMBertModel"
    with torch.no_grad():
        a, b = model(gene_ids, attention_mask=mask), loaded(gene_ids, attention_mask=mask)
        c = backbone.eval()(gene_ids, attention_mask=mask)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.cell_embedding, b.cell_embedding)
    assert torch.equal(a.cell_embedding, c.cell_embedding)


def test_embed_deterministic_and_batch_independent(converted):
    adata = ad.read_h5ad(real_file(CITESEQ))[:16].copy()
    model = fm.load(converted)
    first = fm.embed(adata, model, batch_size=16)
    np.testing.assert_array_equal(first, fm.embed(adata, model, batch_size=16))
    np.testing.assert_allclose(fm.embed(adata, model, batch_size=3), first, atol=1e-6, rtol=0)


def test_finetune_annotation_on_imported_backbone(converted, tmp_path):
    adata = ad.read_h5ad(real_file(PBMC))[:200].copy()  # gene symbols: matched through our vocabulary
    clf = fm.finetune(converted, adata, task="annotation", output_dir=tmp_path / "ft", train__max_steps=3,
                      train__batch_size=16, train__progress=False, train__save_every=0, data__max_genes=64,
                      overrides={"task.min_cells_per_class": 1})
    assert type(clf).__name__ == "ScFMForAnnotation" and type(clf.scfm).__name__ == "ScFMBertModel"
    assert clf.config.backbone == "bert" and clf.config.max_genes == 64
    labels = fm.annotate(adata, clf)
    assert len(labels) == adata.n_obs and set(labels) <= set(clf.config.id2label.values()) | {"unknown"}


# ------------------------------------------------------------------ bad inputs


def _model_only(gf_dir, tmp_path):
    shutil.copytree(gf_dir / "model", tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_directory_without_dictionaries_or_files(gf_dir, tmp_path):
    ckpt = _model_only(gf_dir, tmp_path)
    with pytest.raises(CheckpointFormatError, match="no Geneformer dictionaries"):
        load_geneformer(ckpt)
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointFormatError, match="model.safetensors: missing"):
        load_geneformer(ckpt, dictionaries=gf_dir)
    with pytest.raises(CheckpointFormatError, match="config.json: missing"):
        load_geneformer(tmp_path / "nothing_here")


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))  # would create the marker file if unpickled


def test_pickled_dictionaries_plain_data_only(gf_dir, imported, tmp_path):
    ckpt = _model_only(gf_dir, tmp_path)
    tokens = json.loads((gf_dir / "token_dictionary.json").read_text())
    medians = {k: np.float64(v) for k, v in json.loads((gf_dir / "gene_median_dictionary.json").read_text()).items()}
    (ckpt / "token_dictionary_gc30M.pkl").write_bytes(pickle.dumps(tokens))
    (ckpt / "gene_median_dictionary_gc30M.pkl").write_bytes(pickle.dumps(medians))
    model, _, report = load_geneformer(ckpt)  # Geneformer's own format: numpy scalars allowed
    assert report["token_dictionary"].endswith("token_dictionary_gc30M.pkl")
    assert model.config.gene_medians == imported[0].config.gene_medians

    marker = tmp_path / "executed"
    (ckpt / "gene_median_dictionary_gc30M.pkl").write_bytes(pickle.dumps({"ENSG00000000003": _Payload(marker)}))
    with pytest.raises(CheckpointFormatError, match="refused"):
        load_geneformer(ckpt)
    assert not marker.exists()


def test_missing_and_unexpected_keys_are_named(gf_dir, tmp_path):
    ckpt = _model_only(gf_dir, tmp_path)
    state = load_file(ckpt / "model.safetensors")
    state.pop("bert.encoder.layer.1.output.dense.weight")
    state["bert.encoder.layer.2.output.dense.weight"] = torch.zeros(32, 64)
    save_file(state, ckpt / "model.safetensors")
    with pytest.raises(CheckpointFormatError) as err:
        load_geneformer(ckpt, dictionaries=gf_dir)
    assert "bert.encoder.layer.1.output.dense.weight" in str(err.value)
    assert "bert.encoder.layer.2.output.dense.weight" in str(err.value)


# ------------------------------------------------------------------ V2 (<cls>/<eos>), built from the V1 fixture


def _v2_checkpoint(gf_dir, out):
    """The tiny fixture as a V2 checkpoint: <cls>, <eos> appended to the token dictionary and word embeddings."""
    from transformers import BertConfig, BertForMaskedLM

    out.mkdir()
    tokens = json.loads((gf_dir / "token_dictionary.json").read_text())
    n = len(tokens)
    tokens.update({"<cls>": n, "<eos>": n + 1})
    (out / "token_dictionary.json").write_text(json.dumps(tokens))
    shutil.copy(gf_dir / "gene_median_dictionary.json", out / "gene_median_dictionary.json")
    state = load_file(gf_dir / "model" / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    word = state["bert.embeddings.word_embeddings.weight"]
    state["bert.embeddings.word_embeddings.weight"] = torch.cat([word, torch.randn(2, word.shape[1], generator=g)])
    state["cls.predictions.bias"] = torch.cat([state["cls.predictions.bias"], torch.zeros(2)])
    config = BertConfig.from_pretrained(gf_dir / "model")
    config.vocab_size = n + 2
    model = BertForMaskedLM(config)
    model.load_state_dict(state, strict=False)
    model.save_pretrained(out / "model")
    return out, tokens, model.eval()


def test_v2_cls_eos_and_pooling(gf_dir, citeseq16, tmp_path):
    import scipy.sparse as sp

    from fm.binning import rank_value_encode

    src, tokens, bert = _v2_checkpoint(gf_dir, tmp_path / "v2")
    model, _, report = load_geneformer(src)
    assert report["version"] == "V2" and model.config.add_cls_eos and model.config.pooling == "cls"
    assert model.config.max_genes == 2046
    # Geneformer V2's input, built independently: <cls> + rank-value tokens (2046 at most) + <eos>
    medians = json.loads((src / "gene_median_dictionary.json").read_text())
    ens = citeseq16.var["gene_ids"].astype(str).str.split(".").str[0]
    x = sp.csr_matrix(citeseq16.X)
    col_median = np.array([medians.get(e, np.nan) for e in ens])
    col_token = np.array([tokens.get(e, -1) for e in ens])
    indptr, cols = rank_value_encode(x.indptr, x.indices, x.data, np.asarray(x.sum(1)).ravel(), col_median, 2046)
    cells = [[tokens["<cls>"], *col_token[cols[indptr[i]:indptr[i + 1]]], tokens["<eos>"]] for i in range(16)]
    width = max(map(len, cells))
    ids = torch.tensor([c + [0] * (width - len(c)) for c in cells])
    mask = (torch.arange(width)[None] < torch.tensor([len(c) for c in cells])[:, None]).long()
    with torch.no_grad():
        hidden = bert(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
    genes = mask.clone()
    genes[:, 0] = 0
    genes[torch.arange(16), mask.sum(1) - 1] = 0
    cls_ref = hidden[:, 0].numpy()
    mean_ref = ((hidden * genes[..., None]).sum(1) / genes.sum(1, keepdim=True)).numpy()

    np.testing.assert_allclose(fm.embed(citeseq16, model, batch_size=16), cls_ref, atol=TOL, rtol=0)
    model.config.pooling = "mean"  # V2's emb_mode "cell": mean over genes, <cls>/<eos> excluded
    np.testing.assert_allclose(fm.embed(citeseq16, model, batch_size=5), mean_ref, atol=TOL, rtol=0)
