"""ScFMConfig / ScFMModel / ScFMForMaskedExpression on tiny configs (CPU, seconds)."""
from __future__ import annotations

import warnings

import pytest
import torch
import transformers

from fm.configuration_scfm import ScFMConfig
from fm.modeling_scfm import (
    ScFMForMaskedExpression,
    ScFMMaskedExpressionOutput,
    ScFMModel,
    ScFMModelOutput,
    register_auto_classes,
)

B, L = 4, 12


def tiny_config(**kw) -> ScFMConfig:
    base = dict(
        vocab_size=200, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_genes=L,
        condition_keys=["batch", "assay"], condition_vocab_sizes=[5, 3],
    )
    return ScFMConfig(**{**base, **kw})


def make_batch(config: ScFMConfig, seed: int = 0, mask_frac: float = 0.3):
    """Random cells with distinct genes, padding at the end of rows 1..3, ~30% masked values."""
    g = torch.Generator().manual_seed(seed)
    gene_ids = torch.stack([torch.randperm(config.vocab_size - 3, generator=g)[:L] + 3 for _ in range(B)])
    labels = torch.randint(0, config.n_bins, (B, L), generator=g)
    lengths = torch.tensor([L, L - 3, L - 5, 4])
    real = torch.arange(L)[None] < lengths[:, None]
    gene_ids = gene_ids.masked_fill(~real, config.pad_token_id)
    masked = (torch.rand(B, L, generator=g) < mask_frac) & real
    masked[:, 0] = True  # at least one masked gene per cell
    values = labels.masked_fill(masked, config.mask_value_id).masked_fill(~real, config.pad_value_id)
    condition_ids = torch.stack([torch.randint(0, n, (B,), generator=g) for n in config.condition_vocab_sizes], 1)
    return dict(
        gene_ids=gene_ids, values=values, attention_mask=real, condition_ids=condition_ids,
        masked_positions=masked, labels=labels.float(),
    )


def backbone_inputs(batch):
    return {k: batch[k] for k in ("gene_ids", "values", "attention_mask", "condition_ids")}


# ---------------------------------------------------------------------------------------------
# config


def test_config_properties_and_roundtrip(tmp_path):
    c = tiny_config()
    assert (c.mask_value_id, c.pad_value_id, c.n_prefix) == (51, 52, 3)
    assert c.hidden_size == 32 and c.num_hidden_layers == 2  # attribute_map for generic tooling
    c.save_pretrained(tmp_path)
    c2 = transformers.AutoConfig.from_pretrained(tmp_path)
    assert isinstance(c2, ScFMConfig)
    assert {**c2.to_dict(), "_name_or_path": ""} == {**c.to_dict(), "_name_or_path": ""}


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(d_model=30), "divisible"),
        (dict(condition_keys=["batch"]), "same length"),
        (dict(pooling="max"), "pooling"),
    ],
)
def test_config_validation(kw, msg):
    with pytest.raises(ValueError, match=msg):
        tiny_config(**kw)


# ---------------------------------------------------------------------------------------------
# backbone


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_forward_backward_shapes(pooling):
    torch.manual_seed(0)
    c = tiny_config(pooling=pooling)
    model = ScFMForMaskedExpression(c)
    batch = make_batch(c)
    out = model(**batch)
    assert isinstance(out, ScFMMaskedExpressionOutput)
    assert out.last_hidden_state.shape == (B, c.n_prefix + L, c.d_model)
    assert out.cell_embedding.shape == (B, c.d_model)
    assert out.expression.shape == out.mvc_expression.shape == (B, L)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss, out.gep_loss + out.mvc_loss)
    assert 0.01 < out.loss.item() < 5.0  # targets scaled to [0, 1]: losses are O(0.1)
    out.loss.backward()
    emb = model.scfm.embeddings
    assert emb.conditions[1].weight.grad.abs().sum() > 0
    assert emb.gene.weight.grad[c.pad_token_id].abs().sum() == 0  # padding row never trained
    assert emb.gene.weight[c.pad_token_id].abs().sum() == 0  # and initialised to zero
    assert all(p.grad is not None for p in model.parameters())

    bb = ScFMModel(c).eval()
    o = bb(**backbone_inputs(batch))
    assert isinstance(o, ScFMModelOutput)
    assert o.gene_hidden_states.shape == (B, L, c.d_model)
    torch.testing.assert_close(o.gene_hidden_states, o.last_hidden_state[:, c.n_prefix :])
    assert isinstance(bb(**backbone_inputs(batch), return_dict=False), tuple)


def test_default_attention_mask_and_conditions():
    """attention_mask defaults to gene_ids != pad; missing condition_ids mean "unknown" (id 0)."""
    torch.manual_seed(0)
    c = tiny_config()
    model = ScFMModel(c).eval()
    batch = make_batch(c)
    explicit = model(**backbone_inputs(batch)).cell_embedding
    implicit = model(batch["gene_ids"], batch["values"], condition_ids=batch["condition_ids"]).cell_embedding
    torch.testing.assert_close(explicit, implicit, rtol=0, atol=0)
    unknown = model(batch["gene_ids"], batch["values"], condition_ids=torch.zeros(B, 2, dtype=torch.long))
    torch.testing.assert_close(model(batch["gene_ids"], batch["values"]).cell_embedding, unknown.cell_embedding)
    with pytest.raises(ValueError, match="condition_ids"):
        model(batch["gene_ids"], batch["values"], condition_ids=torch.zeros(B, 3, dtype=torch.long))


def test_deterministic_in_eval():
    torch.manual_seed(0)
    c = tiny_config()
    model = ScFMForMaskedExpression(c).eval()
    batch = make_batch(c)
    a, b = model(**batch), model(**batch)
    assert torch.equal(a.cell_embedding, b.cell_embedding) and torch.equal(a.expression, b.expression)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_padding_invariance(pooling):
    torch.manual_seed(0)
    c = tiny_config(pooling=pooling)
    model = ScFMModel(c).eval()
    batch = backbone_inputs(make_batch(c))
    extra = 5
    padded = dict(
        gene_ids=torch.cat([batch["gene_ids"], torch.full((B, extra), c.pad_token_id)], 1),
        values=torch.cat([batch["values"], torch.full((B, extra), c.pad_value_id)], 1),
        attention_mask=torch.cat([batch["attention_mask"], torch.zeros(B, extra, dtype=torch.bool)], 1),
        condition_ids=batch["condition_ids"],
    )
    with torch.no_grad():
        a, b = model(**batch), model(**padded)
    torch.testing.assert_close(a.cell_embedding, b.cell_embedding, rtol=0, atol=1e-5)
    real = batch["attention_mask"]
    torch.testing.assert_close(a.gene_hidden_states[real], b.gene_hidden_states[:, :L][real], rtol=0, atol=1e-5)


def test_gene_order_invariance():
    """No positional embedding: permuting the gene tokens (with their values) leaves <cls> unchanged."""
    torch.manual_seed(0)
    c = tiny_config()
    model = ScFMModel(c).eval()
    batch = backbone_inputs(make_batch(c))
    perm = torch.randperm(L)
    shuffled = {**batch, **{k: batch[k][:, perm] for k in ("gene_ids", "values", "attention_mask")}}
    with torch.no_grad():
        a, b = model(**batch), model(**shuffled)
    torch.testing.assert_close(a.cell_embedding, b.cell_embedding, rtol=0, atol=1e-5)
    torch.testing.assert_close(a.gene_hidden_states[:, perm], b.gene_hidden_states, rtol=0, atol=1e-5)


def test_generative_mask():
    """A masked gene is visible only to itself: changing its input changes no other token."""
    torch.manual_seed(0)
    c = tiny_config(generative_mask=True)
    model = ScFMModel(c).eval()
    batch = make_batch(c)
    inputs = {**backbone_inputs(batch), "masked_positions": batch["masked_positions"]}
    # all masked genes of a cell share the <mask> value, so perturb the masked gene's identity
    q = inputs["masked_positions"].clone()
    changed = dict(inputs, gene_ids=inputs["gene_ids"].masked_fill(q, 150), values=inputs["values"])
    with torch.no_grad():
        a, b = model(**inputs), model(**changed)
    assert torch.isfinite(a.last_hidden_state).all() and torch.isfinite(b.last_hidden_state).all()
    keep = torch.cat([torch.ones(B, c.n_prefix, dtype=torch.bool), ~q], 1)
    torch.testing.assert_close(a.last_hidden_state[keep], b.last_hidden_state[keep], rtol=0, atol=1e-5)
    assert not torch.allclose(a.last_hidden_state[~keep], b.last_hidden_state[~keep])  # the masked ones change

    # without the generative mask the same change leaks into every token
    plain = ScFMModel(tiny_config()).eval()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        pa, pb = plain(**inputs), plain(**changed)
    assert not torch.allclose(pa.cell_embedding, pb.cell_embedding, atol=1e-5)

    # every gene masked: no query row is empty (the prefix is always visible), so no NaN
    all_masked = dict(inputs, masked_positions=batch["attention_mask"].clone())
    model.train()
    out = ScFMForMaskedExpression(c)(**{**batch, "masked_positions": batch["attention_mask"].clone()})
    assert torch.isfinite(model(**all_masked).last_hidden_state).all() and torch.isfinite(out.loss)
    out.loss.backward()


def test_no_masked_positions_gives_zero_connected_loss():
    torch.manual_seed(0)
    c = tiny_config()
    model = ScFMForMaskedExpression(c)
    batch = make_batch(c)
    batch["masked_positions"] = torch.zeros(B, L, dtype=torch.bool)
    batch["values"] = batch["labels"].long().masked_fill(~batch["attention_mask"], c.pad_value_id)
    out = model(**batch)
    assert out.loss.item() == 0.0 and out.loss.requires_grad
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_loss_decreases():
    torch.manual_seed(0)
    c = tiny_config(dropout=0.0)
    model = ScFMForMaskedExpression(c).train()
    batch = make_batch(c, mask_frac=0.5)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


# ---------------------------------------------------------------------------------------------
# save / load / Auto classes


def test_save_pretrained_roundtrip(tmp_path):
    torch.manual_seed(0)
    c = tiny_config()
    model = ScFMForMaskedExpression(c).eval()
    batch = make_batch(c)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "config.json").is_file()
    loaded, info = ScFMForMaskedExpression.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    loaded.eval()
    a, b = model(**batch), loaded(**batch)
    for k in ("loss", "expression", "mvc_expression", "cell_embedding"):
        assert torch.equal(a[k], b[k]), k


def test_auto_model_loads_backbone_from_head_checkpoint(tmp_path):
    torch.manual_seed(0)
    register_auto_classes()  # idempotent: a second registration must not raise
    c = tiny_config()
    model = ScFMForMaskedExpression(c).eval()
    batch = make_batch(c)
    model.save_pretrained(tmp_path)

    backbone, info = transformers.AutoModel.from_pretrained(tmp_path, output_loading_info=True)
    assert type(backbone) is ScFMModel
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    backbone.eval()
    want = model(**batch).cell_embedding
    got = backbone(**backbone_inputs(batch), masked_positions=batch["masked_positions"]).cell_embedding
    assert torch.equal(want, got)
    # every backbone tensor came from the checkpoint
    sd = model.scfm.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in backbone.state_dict().items())

    head = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path)
    assert type(head) is ScFMForMaskedExpression

    # a backbone checkpoint loads into the head model: only the heads are missing
    bdir = tmp_path / "backbone"
    backbone.save_pretrained(bdir)
    _, info = ScFMForMaskedExpression.from_pretrained(bdir, output_loading_info=True)
    assert info["missing_keys"] and all(k.split(".")[0] in ("gep_head", "mvc_head") for k in info["missing_keys"])
    assert not info["unexpected_keys"]


# ---------------------------------------------------------------------------------------------
# gradient checkpointing


def _grads(model, batch, seed=0):
    model.zero_grad()
    torch.manual_seed(seed)  # same dropout masks in both runs
    model(**batch).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("api", ["gradient_checkpointing", "activation_checkpointing"])
def test_gradient_checkpointing_same_gradients(api):
    """transformers 5 renamed gradient_* to activation_* (old names warn); both must work."""
    if not hasattr(ScFMModel, f"{api}_enable"):
        pytest.skip(f"{api}_enable not in transformers {transformers.__version__}")
    torch.manual_seed(0)
    c = tiny_config(dropout=0.1)
    model = ScFMForMaskedExpression(c).train()
    batch = make_batch(c)
    calls = []
    hook = model.scfm.layers[0].mlp.register_forward_hook(lambda *a: calls.append(1))

    ref = _grads(model, batch)
    assert len(calls) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        getattr(model, f"{api}_enable")()
        assert all(layer.gradient_checkpointing for layer in model.scfm.layers)
        calls.clear()
        ckpt = _grads(model, batch)
        assert len(calls) == 2  # forward + recomputation in backward
        for n in ref:
            torch.testing.assert_close(ckpt[n], ref[n], rtol=1e-5, atol=1e-6, msg=n)
        model.eval()  # no recomputation outside training
        calls.clear()
        model(**batch)
        assert len(calls) == 1
        getattr(model, f"{api}_disable")()
        assert not any(layer.gradient_checkpointing for layer in model.scfm.layers)
    hook.remove()
