"""The Hugging Face model contract on tiny configs: our own equivalent of transformers' ConfigTester and
ModelTesterMixin (not vendored), over every ScFMFor* class. What generic tooling (Trainer, PEFT, pipelines,
torch.export / torch.compile) assumes of a PreTrainedModel is checked here, so a regression shows up as a
failing contract rather than in a user's script."""
from __future__ import annotations


import pytest
import torch

from fm.heads.annotation import ScFMForAnnotation
from fm.heads.batch_correction import ScFMForBatchCorrection
from fm.heads.cci import ScFMForCCI
from fm.heads.imputation import ScFMForImputation
from fm.heads.modality_prediction import ScFMForModalityPrediction
from fm.modeling_scfm import ScFMConfig, ScFMForMaskedExpression, ScFMModel

B, L, N_BINS, VOCAB = 3, 8, 5, 40
TINY = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=2, d_ff=64, n_bins=N_BINS, max_genes=16, dropout=0.0)


def _gene_inputs(pad: bool = True, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    gene_ids = torch.stack([torch.randperm(VOCAB - 3, generator=g)[:L] + 3 for _ in range(B)])
    values = torch.randint(0, N_BINS, (B, L), generator=g)
    values[:, 0] = N_BINS  # the bins encoding's <mask> value: scored by the masked-expression losses
    if pad:  # cells of 8, 5 and 3 genes
        gene_ids[1, 5:] = 0
        gene_ids[2, 3:] = 0
        values[gene_ids == 0] = N_BINS + 1  # <pad> value
    return {"gene_ids": gene_ids, "values": values, "attention_mask": gene_ids != 0}


def _labels_bins(inputs):
    return {"labels": torch.randint(0, N_BINS, (B, L), generator=torch.Generator().manual_seed(1))}


# class → (extra config, extra inputs (labels etc.) as a function of the gene inputs)
CASES = {
    "ScFMModel": (ScFMModel, {}, lambda x: {}),
    "ScFMForMaskedExpression": (ScFMForMaskedExpression, {}, _labels_bins),
    "ScFMForAnnotation": (ScFMForAnnotation, {"num_labels": 3}, lambda x: {"labels": torch.tensor([0, 2, 1])}),
    "ScFMForImputation": (ScFMForImputation, {}, lambda x: {
        "target_gene_ids": torch.tensor([[4, 5, 6, 0]] * B), "labels": torch.rand(B, 4)}),
    "ScFMForBatchCorrection": (ScFMForBatchCorrection, {
        "condition_keys": ["batch"], "condition_vocab_sizes": [3], "batch_key": "batch", "num_batches": 2},
        lambda x: {"condition_ids": torch.tensor([[1], [2], [1]]), "batch_labels": torch.tensor([0, 1, 0]),
                   **_labels_bins(x)}),
    "ScFMForModalityPrediction": (ScFMForModalityPrediction, {"protein_names": ["CD3", "CD4"]},
                                  lambda x: {"labels": torch.randn(B, 2)}),
    "ScFMForCCI": (ScFMForCCI, {"niche_genes": ["A", "B"], "num_labels": 3}, lambda x: {
        "receiver_types": torch.tensor([0, 1, 2]), "niche_composition": torch.full((B, 3), 1 / 3),
        "labels": torch.rand(B, 2)}),
}
NAMES = list(CASES)
# inputs a class needs besides gene_ids (CCI predicts a receiver of a given type from its niche)
REQUIRED = {"ScFMForCCI": ("receiver_types", "niche_composition"), "ScFMForBatchCorrection": ("condition_ids",)}


def _build(name, **overrides):
    cls, extra, _ = CASES[name]
    torch.manual_seed(0)
    return cls(ScFMConfig(**{**TINY, **extra, **overrides})).eval()


def _inputs(name, labels=False, pad=True):
    x = _gene_inputs(pad)
    more = CASES[name][2](x)
    if not labels:
        more.pop("labels", None)
        more.pop("batch_labels", None)
    return {**x, **more}


def _main(out):
    """The tensor every class returns: the backbone's cell embedding (niche embedding for CCI)."""
    return out.niche_embedding if hasattr(out, "niche_embedding") else out.cell_embedding


def _n_prefix(model):
    return model.config.n_prefix


# ---------------------------------------------------------------------------------------------- config


def test_config_round_trip(tmp_path):
    config = ScFMConfig(**TINY, num_labels=3, id2label={0: "B", 1: "T", 2: "NK"},
                        label2id={"B": 0, "T": 1, "NK": 2}, condition_keys=["batch"],
                        condition_vocab_sizes=[4])
    config.save_pretrained(tmp_path)
    again = ScFMConfig.from_pretrained(tmp_path)
    assert again.to_dict() == config.to_dict()
    assert ScFMConfig.from_json_file(tmp_path / "config.json").to_dict() == config.to_dict()
    assert again.num_labels == 3 and again.id2label == {0: "B", 1: "T", 2: "NK"} and again.label2id["NK"] == 2
    assert again.hidden_size == 32 and again.num_hidden_layers == 2 and again.num_attention_heads == 2
    assert ScFMConfig(**TINY, num_labels=5).num_labels == 5
    with pytest.raises(ValueError):
        ScFMConfig(**{**TINY, "n_heads": 5})


# ---------------------------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("name", NAMES)
def test_save_load_same_outputs(name, tmp_path):
    model = _build(name)
    x = _inputs(name)
    with torch.no_grad():
        before = model(**x)
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        after = loaded(**x)
    for key, value in before.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(after[key], value, rtol=0, atol=1e-6, msg=key)


@pytest.mark.parametrize("name", ["ScFMForAnnotation", "ScFMForCCI"])
def test_mismatched_size_load_then_main_input_call(name, tmp_path):
    _build(name).save_pretrained(tmp_path)
    model = type(_build(name)).from_pretrained(tmp_path, num_labels=5, ignore_mismatched_sizes=True).eval()
    assert model.config.num_labels == 5 and len(model.config.id2label) == 5
    x = {k: v for k, v in _inputs(name).items() if k in ("gene_ids",) + REQUIRED.get(name, ())}
    if name == "ScFMForCCI":
        x["receiver_types"], x["niche_composition"] = torch.tensor([0, 4, 2]), torch.full((B, 5), 0.2)
        assert model(**x).predictions.shape == (B, 2)
    else:
        assert model(**x).logits.shape == (B, 5)


@pytest.mark.parametrize("name", NAMES)
def test_main_input_only_and_input_ids_alias(name):
    """gene_ids alone runs (values default to <mask> at real genes, <pad> at padding); input_ids is gene_ids."""
    model = _build(name)
    x = _inputs(name)
    need = {k: x[k] for k in REQUIRED.get(name, ())}
    with torch.no_grad():
        only = model(gene_ids=x["gene_ids"], **need)
        unknown = torch.where(x["attention_mask"], N_BINS, N_BINS + 1)
        torch.testing.assert_close(_main(only), _main(model(gene_ids=x["gene_ids"], values=unknown, **need)))
        gene_ids = x.pop("gene_ids")
        torch.testing.assert_close(_main(model(input_ids=gene_ids, **x)), _main(model(gene_ids=gene_ids, **x)))
    with pytest.raises(ValueError, match="inputs_embeds"):
        model(inputs_embeds=torch.zeros(B, L, 32), values=x["values"])


def test_peft_style_sequence_classification_call():
    """PeftModelForSequenceClassification.forward's call: input_ids, inputs_embeds=None, the output flags, labels."""
    model = _build("ScFMForAnnotation")
    x = _inputs("ScFMForAnnotation")
    out = model(input_ids=x["gene_ids"], attention_mask=x["attention_mask"], inputs_embeds=None,
                labels=torch.tensor([0, 1, 2]), output_attentions=None, output_hidden_states=None, return_dict=True,
                values=x["values"])
    assert out.loss is not None and out.logits.shape == (B, 3)
    assert model.main_input_name == "gene_ids"


# ---------------------------------------------------------------------------------------------- outputs


@pytest.mark.parametrize("name", NAMES)
def test_hidden_states_and_attentions(name):
    model = _build(name)
    x = _inputs(name)
    T, D, H, n = _n_prefix(model) + L, 32, 2, model.config.n_layers
    with torch.no_grad():
        plain = model(**x)
        out = model(**x, output_hidden_states=True, output_attentions=True)
    assert plain.get("hidden_states") is None and plain.get("attentions") is None
    assert len(out.hidden_states) == n + 1 and all(h.shape == (B, T, D) for h in out.hidden_states)
    assert len(out.attentions) == n and all(a.shape == (B, H, T, T) for a in out.attentions)
    for a in out.attentions:
        torch.testing.assert_close(a.sum(-1), torch.ones(B, H, T), atol=1e-5, rtol=0)
        assert float(a[1, :, :, _n_prefix(model) + 5:].abs().max()) == 0.0  # padded keys get no weight
    torch.testing.assert_close(_main(out), _main(plain), atol=1e-5, rtol=0)
    if name == "ScFMModel":
        torch.testing.assert_close(out.hidden_states[-1], out.last_hidden_state)
    model.config.output_hidden_states = True  # the config default, as transformers
    with torch.no_grad():
        assert len(model(**x).hidden_states) == n + 1
        assert model(**x, output_hidden_states=False).get("hidden_states") is None


@pytest.mark.parametrize("pad", [True, False])
@pytest.mark.parametrize("name", NAMES)
def test_eager_equals_sdpa(name, pad):
    model = _build(name)
    x = _inputs(name, pad=pad)
    with torch.no_grad():
        sdpa = model(**x, output_hidden_states=True)
        model.set_attn_implementation("eager")
        assert model.config._attn_implementation == "eager"
        eager = model(**x, output_hidden_states=True)
        model.set_attn_implementation("sdpa")
    torch.testing.assert_close(_main(eager), _main(sdpa), atol=1e-5, rtol=0)
    for a, b in zip(eager.hidden_states, sdpa.hidden_states):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_attn_implementation_from_pretrained(tmp_path):
    _build("ScFMModel").save_pretrained(tmp_path)
    model = ScFMModel.from_pretrained(tmp_path, attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    calls = []
    handle = torch.nn.functional.scaled_dot_product_attention
    try:
        torch.nn.functional.scaled_dot_product_attention = lambda *a, **k: calls.append(1) or handle(*a, **k)
        model(**_gene_inputs())
    finally:
        torch.nn.functional.scaled_dot_product_attention = handle
    assert not calls  # eager really runs: SDPA is never called


@pytest.mark.parametrize("name", NAMES)
def test_return_dict_false_and_determinism(name):
    model = _build(name)
    x = _inputs(name, labels=True)
    with torch.no_grad():
        out = model(**x)
        tup = model(**x, return_dict=False)
        again = model(**x)
    assert isinstance(tup, tuple) and len(tup) == len(out.to_tuple())
    for a, b in zip(tup, out.to_tuple()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(again.to_tuple(), out.to_tuple()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- training


def _loss(model, x):
    out = model(**x)
    return out.loss if out.get("loss") is not None else out.last_hidden_state.pow(2).mean()


@pytest.mark.parametrize("name", NAMES)
def test_backward_and_gradient_checkpointing(name):
    model = _build(name).train()
    x = _inputs(name, labels=True)
    loss = _loss(model, x)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    loss_ckpt = _loss(model, x)
    loss_ckpt.backward()
    torch.testing.assert_close(loss_ckpt, loss, rtol=1e-6, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("name", NAMES)
def test_bf16_weights_forward(name):
    model = _build(name).to(torch.bfloat16)
    x = _inputs(name, labels=True)
    if "niche_composition" in x:
        x["niche_composition"] = x["niche_composition"].to(torch.bfloat16)
    with torch.no_grad():
        out = model(**x)
    assert _main(out).dtype == torch.bfloat16
    if out.get("loss") is not None:
        assert torch.isfinite(out.loss)


def test_input_embeddings_get_set():
    model = _build("ScFMForAnnotation")
    emb = model.get_input_embeddings()
    assert emb is model.scfm.embeddings.gene and emb.weight.shape == (VOCAB, 32)
    new = torch.nn.Embedding(VOCAB, 32, padding_idx=0)
    model.set_input_embeddings(new)
    assert model.get_input_embeddings() is new and model.scfm.embeddings.gene is new


# ---------------------------------------------------------------------------------------------- problem_type


def test_annotation_problem_types():
    x = _inputs("ScFMForAnnotation")
    model = _build("ScFMForAnnotation")
    out = model(**x, labels=torch.tensor([0, 1, -100]))
    assert model.config.problem_type == "single_label_classification"
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits[:2], torch.tensor([0, 1])))

    model = _build("ScFMForAnnotation")  # float multi-hot labels: multi-label (inferred)
    multi = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    out = model(**x, labels=multi)
    assert model.config.problem_type == "multi_label_classification"
    torch.testing.assert_close(out.loss, torch.nn.functional.binary_cross_entropy_with_logits(out.logits, multi))

    model = _build("ScFMForAnnotation", num_labels=1)  # one output: regression (inferred)
    target = torch.tensor([0.5, -1.0, 2.0])
    out = model(**x, labels=target)
    assert model.config.problem_type == "regression"
    torch.testing.assert_close(out.loss, torch.nn.functional.mse_loss(out.logits.squeeze(-1), target))

    model = _build("ScFMForAnnotation", problem_type="regression")  # explicit, several outputs
    target = torch.randn(B, 3)
    out = model(**x, labels=target)
    torch.testing.assert_close(out.loss, torch.nn.functional.mse_loss(out.logits, target))


# ---------------------------------------------------------------------------------------------- export / compile


def test_torch_export_backbone():
    model = _build("ScFMModel")
    x = _gene_inputs()
    program = torch.export.export(model, args=(x["gene_ids"], x["values"]),
                                  kwargs={"attention_mask": x["attention_mask"]})
    with torch.no_grad():
        eager = model(**x)
        exported = program.module()(x["gene_ids"], x["values"], attention_mask=x["attention_mask"])
    torch.testing.assert_close(exported.last_hidden_state, eager.last_hidden_state, atol=1e-5, rtol=0)
    torch.testing.assert_close(exported.cell_embedding, eager.cell_embedding, atol=1e-5, rtol=0)


def test_compile_fullgraph_backbone():
    model = _build("ScFMModel")
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    x = _gene_inputs()
    with torch.no_grad():
        eager = model(**x)
        out = compiled(**x)
    torch.testing.assert_close(out.last_hidden_state, eager.last_hidden_state, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.cell_embedding, eager.cell_embedding, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------- integrations


def test_peft_lora_sequence_classification():
    """PEFT's SEQ_CLS wrapper calls forward(input_ids=…, inputs_embeds=None, labels=…, output flags, **kwargs)."""
    peft = pytest.importorskip("peft")
    model = _build("ScFMForAnnotation")
    lora = peft.get_peft_model(model, peft.LoraConfig(task_type="SEQ_CLS", target_modules=["qkv"], r=2,
                                                      modules_to_save=["classifier_head"]))
    x = _inputs("ScFMForAnnotation")
    out = lora(input_ids=x["gene_ids"], attention_mask=x["attention_mask"], values=x["values"],
               labels=torch.tensor([0, 1, 2]))
    out.loss.backward()
    assert out.logits.shape == (B, 3)
    assert any(p.grad is not None for n, p in lora.named_parameters() if "lora_" in n)


def test_bert_backbone_passes_output_flags():
    """An imported Geneformer (BERT backbone) head returns BertModel's hidden states and attentions."""
    config = ScFMConfig(**{**TINY, "pooling": "mean", "backbone": "bert", "gene_table": list(range(VOCAB)),
                           "num_labels": 3},
                        bert_config=dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=64, max_position_embeddings=64))
    torch.manual_seed(0)
    model = ScFMForAnnotation(config).eval()
    model.set_attn_implementation("eager")
    x = _inputs("ScFMForAnnotation")
    with torch.no_grad():
        plain = model(**x)
        out = model(input_ids=x["gene_ids"], attention_mask=x["attention_mask"], output_hidden_states=True,
                    output_attentions=True)
    assert plain.get("hidden_states") is None
    assert len(out.hidden_states) == 3 and out.hidden_states[0].shape == (B, L, 32)
    assert len(out.attentions) == 2 and out.attentions[0].shape == (B, 2, L, L)
    torch.testing.assert_close(out.logits, plain.logits)  # values are ignored by a BERT backbone
