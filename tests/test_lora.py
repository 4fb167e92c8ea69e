"""LoRA fine-tuning (fm/lora.py, task.lora): config parsing, default targets anchored at the backbone (a head's
`out` is never wrapped), only adapters + head trainable, `fm finetune … task.lora.r=8` through the one loop with
merged and adapter exports that fm.load reads back with the same predictions, resume, clear errors."""
from __future__ import annotations

import json
import re
import shutil
import sys

import numpy as np
import pytest
import torch

import fm
from fm import lora
from fm.cli import main
from fm.config import LoraSettings, load_config
from fm.heads.annotation import ScFMForAnnotation
from fm.paths import recipe_path
from fm.tasks import run_finetune

pytest.importorskip("peft")
RECIPE = "finetune/annotation"
CLASSES = ["B", "NK", "T"]


def _classifier(model_dir, classes=CLASSES):
    torch.manual_seed(0)
    return ScFMForAnnotation.from_pretrained(model_dir, num_labels=len(classes), id2label=dict(enumerate(classes)),
                                             label2id={c: i for i, c in enumerate(classes)})


def _overrides(base, data, out, *extra):
    return [f"model.init_from={base}", f"train.output_dir={out}", f"data.paths=[{data}]", "train.max_steps=4",
            "train.epochs=null", "train.batch_size=16", "train.progress=false", "train.save_every=0",
            "train.eval_every=0", "train.warmup_steps=1", "data.max_genes=64", "task.lora.r=8", *extra]


def test_config_r_alone_enables_lora_with_defaults():
    cfg = load_config(recipe_path(RECIPE), ["task.lora.r=8"])
    assert lora.enabled(cfg.task.lora) and cfg.task.lora == LoraSettings(r=8, alpha=16.0, dropout=0.1)
    assert cfg.task.lora_merge is True
    assert not lora.enabled(load_config(recipe_path(RECIPE)).task.lora)
    assert not lora.enabled(load_config(recipe_path(RECIPE), ["task.lora.r=null"]).task.lora)
    assert load_config(recipe_path(RECIPE), ["task.lora.target_modules=qkv,out"]).task.lora.target_modules == ["qkv", "out"]
    with pytest.raises(KeyError, match="task.lora.rank"):
        load_config(recipe_path(RECIPE), ["task.lora.rank=8"])
    with pytest.raises(ValueError, match="task.lora.r"):
        load_config(recipe_path(RECIPE), ["task.lora.r=-1"])


def test_default_targets_backbone_only_and_trainable_set(tiny_model_dir):
    model = _classifier(tiny_model_dir)
    regex = lora.default_target_modules(model)
    n_layers = model.config.n_layers
    matched = sorted(n for n, _ in model.named_modules() if re.fullmatch(regex, n))
    assert matched == sorted(f"scfm.layers.{i}.{m}" for i in range(n_layers)
                             for m in ("attn.qkv", "attn.out", "mlp.fc", "mlp.proj"))
    # user short names resolve inside the backbone only: the head's `out` cannot collide
    _, short = lora.resolve_targets(model, ["qkv", "out"])
    assert short == [f"scfm.layers.{i}.attn.{m}" for i in range(n_layers) for m in ("qkv", "out")]
    with pytest.raises(ValueError, match="no module of the backbone"):
        lora.resolve_targets(model, ["dense"])  # classifier_head.dense exists, but not in the backbone

    peft_model = lora.apply_lora(model, LoraSettings(r=4))
    from peft.tuners.lora import LoraLayer

    wrapped = sorted(n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
                     if isinstance(m, LoraLayer))
    assert wrapped == matched and not any("classifier_head" in n for n in wrapped)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n or "classifier_head.modules_to_save" in n for n in trainable), trainable
    assert any("classifier_head.modules_to_save.default.out" in n for n in trainable)
    assert not any("embeddings" in n for n in trainable)


def test_bert_backbone_default_targets():
    from conftest import fixture_path

    from fm.convert import load_foreign

    backbone, _, _ = load_foreign(fixture_path("geneformer_tiny"), "geneformer")
    config = backbone.config
    config.update({"num_labels": 3, "id2label": dict(enumerate(CLASSES)), "label2id": {c: i for i, c in enumerate(CLASSES)}})
    model = ScFMForAnnotation(config)
    assert type(model.scfm).__name__ == "ScFMBertModel"
    _, matched = lora.resolve_targets(model)
    per_layer = {re.sub(r"^scfm\.bert\.encoder\.layer\.\d+\.", "", n) for n in matched}
    assert per_layer == {"attention.self.query", "attention.self.key", "attention.self.value",
                         "attention.output.dense", "intermediate.dense", "output.dense"}
    assert all(n.startswith("scfm.bert.encoder.layer.") for n in matched)


def test_missing_peft_is_a_clear_error(monkeypatch, tiny_model_dir, tmp_path):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft → ImportError
    with pytest.raises(ImportError, match=re.escape("pip install 'scfm[lora]'")):
        lora.require_peft()
    cfg = load_config(recipe_path(RECIPE), [f"model.init_from={tiny_model_dir}", "task.lora.r=8",
                                            f"train.output_dir={tmp_path}"])
    from fm.tasks.annotation import build_classifier

    with pytest.raises(ImportError, match=r"scfm\[lora\]"):
        build_classifier(CLASSES, cfg)


def test_lora_and_freeze_backbone_conflict(tiny_model_dir, tmp_path):
    cfg = load_config(recipe_path(RECIPE), [f"model.init_from={tiny_model_dir}", "task.lora.r=8",
                                            "task.freeze_backbone=true"])
    from fm.tasks.annotation import build_classifier

    with pytest.raises(ValueError, match="freeze_backbone"):
        build_classifier(CLASSES, cfg)


@pytest.fixture(scope="module")
def runs(tiny_model_dir, small_h5ad_path, tmp_path_factory):
    """LoRA fine-tunes (4 steps) exported merged and as an adapter: {merge: TrainResult}."""
    out = tmp_path_factory.mktemp("lora")
    return {merge: run_finetune(load_config(recipe_path(RECIPE), _overrides(
        tiny_model_dir, small_h5ad_path, out / f"merge_{merge}", f"task.lora_merge={merge}".lower())))
        for merge in (True, False)}


@pytest.mark.parametrize("merge", [True, False])
def test_reload_gives_in_memory_predictions(runs, merge, pbmc_small):
    result = runs[merge]
    files = {p.name for p in result.export_dir.iterdir()}
    if merge:
        assert "model.safetensors" in files and "adapter_config.json" not in files
    else:
        assert {"adapter_config.json", "adapter_model.safetensors", "config.json", lora.BASE_FILE} <= files
        assert "model.safetensors" not in files
        base = json.loads((result.export_dir / lora.BASE_FILE).read_text())
        assert base["base_model"] == str(lora.Path(base["base_model"]).resolve())
    in_memory = result.model
    assert lora.is_peft(in_memory)
    reloaded = fm.load(result.export_dir)
    assert isinstance(reloaded, ScFMForAnnotation) and not lora.is_peft(reloaded)
    assert not any("lora_" in k for k in reloaded.state_dict())
    in_memory.cell_tokenizer = reloaded.cell_tokenizer
    in_memory.eval()
    a, b = pbmc_small.copy(), pbmc_small.copy()
    la, lb = fm.annotate(a, in_memory, batch_size=32), fm.annotate(b, reloaded, batch_size=32)
    np.testing.assert_array_equal(np.asarray(la), np.asarray(lb))
    np.testing.assert_allclose(a.obsm["fm_cell_type_probabilities"], b.obsm["fm_cell_type_probabilities"],
                               atol=1e-5, rtol=0)


def test_adapter_and_merged_agree_and_adapter_trained(runs, tiny_model_dir, pbmc_small):
    merged, adapter = fm.load(runs[True].export_dir), fm.load(runs[False].export_dir)
    for k, v in merged.state_dict().items():  # same seed, same data: the same fine-tune either way
        torch.testing.assert_close(adapter.state_dict()[k], v, atol=1e-6, rtol=0)
    base = fm.load(tiny_model_dir)
    moved = (merged.scfm.layers[0].attn.qkv.weight - base.scfm.layers[0].attn.qkv.weight).abs().max()
    assert moved > 0, "the adapters trained and were merged"
    torch.testing.assert_close(merged.scfm.embeddings.gene.weight, base.scfm.embeddings.gene.weight)  # frozen


def test_adapter_with_missing_base_is_a_clear_error(runs, tmp_path):
    copy = tmp_path / "adapter"
    shutil.copytree(runs[False].export_dir, copy)
    info = json.loads((copy / lora.BASE_FILE).read_text())
    (copy / lora.BASE_FILE).write_text(json.dumps({**info, "base_model": str(tmp_path / "gone")}))
    with pytest.raises(FileNotFoundError, match="gone.*not there"):
        fm.load(copy)
    (copy / lora.BASE_FILE).write_text(json.dumps({**info, "base_config_sha256": "0" * 64}))
    with pytest.raises(ValueError, match="not the one the adapter was trained on"):
        fm.load(copy)


def test_cli_and_resume(tiny_model_dir, small_h5ad_path, tmp_path):
    """`fm finetune … task.lora.r=8`; a run stopped after its step-2 checkpoint resumes to the same export."""
    extra = ("train.save_every=2", "train.save_total_limit=3")
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(["finetune", RECIPE, *_overrides(tiny_model_dir, small_h5ad_path, full, *extra)]) == 0
    assert main(["finetune", RECIPE, *_overrides(tiny_model_dir, small_h5ad_path, part, *extra)]) == 0
    shutil.rmtree(part / "checkpoints" / "step_4")
    shutil.rmtree(part / "model")
    assert main(["finetune", RECIPE, *_overrides(tiny_model_dir, small_h5ad_path, part, *extra), "--resume"]) == 0
    a, b = fm.load(full / "model").state_dict(), fm.load(part / "model").state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)


def test_peft_seq_cls_documented_path(tiny_model_dir, pbmc_small):
    """The fm/lora.py docstring's recipe for users of PEFT directly, with task_type='SEQ_CLS'."""
    from peft import LoraConfig, get_peft_model

    from fm.data import LabeledCellCollator
    from fm.tokenizer import CellTokenizer

    model = _classifier(tiny_model_dir)
    peft_model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8,
                                                  target_modules=lora.default_target_modules(model),
                                                  modules_to_save=["classifier_head"]))
    cells = CellTokenizer.from_pretrained(tiny_model_dir).encode(pbmc_small[:8])
    config = model.config
    batch = LabeledCellCollator(n_bins=config.n_bins, max_genes=config.max_genes, pad_token_id=config.pad_token_id,
                                zero_fraction=config.zero_fraction)([dict(cells[i], label=i % 3) for i in range(8)])
    gene_ids = batch.pop("gene_ids")
    out = peft_model(input_ids=gene_ids, **batch)
    out.loss.backward()
    assert out.logits.shape == (8, 3)
    grads = [n for n, p in peft_model.named_parameters() if p.grad is not None]
    assert grads and all(".lora_" in n or "classifier_head.modules_to_save" in n for n in grads)
