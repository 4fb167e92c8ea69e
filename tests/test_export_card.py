"""A publishable export: model card (README.md), `auto_map` + the model code so transformers loads the directory
with trust_remote_code where scfm is not importable, tokenizer files AutoTokenizer does not mistake for its own,
old exports (tokenizer_config.json) still load."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import yaml

import fm
from fm.cli import main
from fm.export import save_export
from fm.model_card import parameter_count
from fm.remote_code import THIRD_PARTY, module_closure, third_party_imports
from fm.tokenizer import CellTokenizer
from fm.vocab import CONFIG_FILE, LEGACY_CONFIG_FILE

BLOCK_FM = textwrap.dedent("""
    import importlib.abc, sys

    class Block(importlib.abc.MetaPathFinder):  # scfm must not be importable at all
        def find_spec(self, name, path=None, target=None):
            if name == "fm" or name.startswith("fm."):
                raise ImportError(f"blocked: {name}")

    sys.meta_path.insert(0, Block())
""")
"""Child-process prelude: scfm must not be importable at all."""

CHILD = BLOCK_FM + textwrap.dedent("""
    import json
    import numpy as np, torch
    import transformers
    d, auto, out = sys.argv[1], sys.argv[2], sys.argv[3]
    model = getattr(transformers, auto).from_pretrained(d, trust_remote_code=True).eval()
    batch = {k: torch.from_numpy(v) for k, v in np.load(d + "/../inputs.npz").items()}
    with torch.no_grad():
        o = model(**batch)
    field = "logits" if hasattr(o, "logits") and o.logits is not None else "cell_embedding"
    np.save(out, getattr(o, field).numpy())
    json.dump({"class": type(model).__name__, "fm_imported": "fm" in sys.modules}, sys.stdout)
""")


def _batch(model, adata):
    from fm.data import CellCollator
    from fm.data.collator import collator_settings

    cells = model.cell_tokenizer.encode(adata[:8])
    collator = CellCollator(**collator_settings(model.config), train=False)
    batch = collator([cells[i] for i in range(len(cells))])
    return {k: v for k, v in batch.items() if k in ("gene_ids", "values", "attention_mask", "condition_ids")}


def _fresh_env(tmp_path) -> dict:
    """A child's environment: no PYTHONPATH (fm not on the path), its own transformers remote-code cache."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "hf_modules")
    return env


def _remote(tmp_path, export, auto, batch):
    """Load `export` with `auto`.from_pretrained(trust_remote_code=True) in a fresh interpreter (-I: no
    PYTHONPATH, cwd elsewhere, fm blocked) and return (its output, its report)."""
    work = tmp_path / "remote"
    shutil.copytree(export, work / "model")
    np.savez(work / "inputs.npz", **{k: v.numpy() for k, v in batch.items()})
    env = _fresh_env(tmp_path)
    proc = subprocess.run([sys.executable, "-I", "-c", CHILD, str(work / "model"), auto, str(work / "out.npy")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return np.load(work / "out.npy"), json.loads(proc.stdout.strip().splitlines()[-1])


def _front_matter(path):
    text = (path / "README.md").read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1]), text


@pytest.fixture(scope="module")
def annotated(tiny_model_dir, small_h5ad_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("annotation")
    assert main(["finetune", "finetune/annotation", f"model.init_from={tiny_model_dir}", f"train.output_dir={out}",
                 f"data.paths=[{small_h5ad_path}]", "train.max_steps=2", "train.batch_size=16",
                 "train.progress=false", "train.save_every=0", "train.eval_every=0", "train.warmup_steps=1",
                 "data.max_genes=64", "model.license=cc-by-4.0"]) == 0
    return out / "model"


def test_card_of_pretrained_export(tiny_model_dir):
    meta, text = _front_matter(tiny_model_dir)
    assert meta["library_name"] == "scfm" and meta["license"] == "unknown"
    assert meta["tags"] == ["single-cell", "transcriptomics", "scfm", "pretraining"]
    assert meta["pipeline_tag"] == "feature-extraction"
    model = fm.load(tiny_model_dir)
    assert f"| parameters | {parameter_count(model):,} |" in text
    assert parameter_count(model) == sum(p.numel() for p in model.parameters())
    recipe = yaml.safe_load((tiny_model_dir.parent / "config.yaml").read_text())
    assert yaml.safe_dump(recipe, sort_keys=False).rstrip() in text  # the recipe, verbatim
    assert "Not evaluated" in text and "trust_remote_code=True" in text and "fm.load" in text
    assert f"{sum(i >= 16 for i in model.config.gene_table):,} genes the model saw" in text


def test_card_picks_up_eval_results(tiny_model_dir, tmp_path):
    from fm.model_card import write_model_card

    export = tmp_path / "model"
    shutil.copytree(tiny_model_dir, export)
    (export / "eval").mkdir()
    (export / "eval" / "results.csv").write_text("task,dataset,method,metric,value,seed\n"
                                                 "embedding,pbmc,fm,ari,0.5,0\nembedding,pbmc,fm,ari,0.7,1\n")
    text = write_model_card(export).read_text()
    assert "| embedding | pbmc | fm | ari | 0.6 | 2 |" in text and "Not evaluated" not in text


def test_auto_map_and_code_are_small(tiny_model_dir, annotated):
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_scfm.ScFMConfig", "AutoModel": "modeling_scfm.ScFMModel",
                                  "AutoModelForMaskedLM": "modeling_scfm.ScFMForMaskedExpression"}
    head = json.loads((annotated / "config.json").read_text())["auto_map"]
    assert head["AutoModelForSequenceClassification"] == "heads_annotation.ScFMForAnnotation"
    assert head["AutoModel"] == "modeling_scfm.ScFMModel"
    closure = module_closure(["fm.configuration_scfm", "fm.modeling_scfm", "fm.heads.annotation"])
    assert "fm.binning" not in closure and "fm.preprocessing" not in closure and "fm.tokenizer" not in closure
    for f in annotated.glob("*.py"):
        assert third_party_imports(f.read_text()) <= THIRD_PARTY, f
        if f.name != "tokenization_scfm.py":  # the AutoTokenizer entry imports fm on purpose, inside a try
            assert "from fm" not in f.read_text() and "import fm" not in f.read_text(), f


def test_remote_pretrained_matches_fm(tiny_model_dir, pbmc_small, tmp_path):
    model = fm.load(tiny_model_dir)
    batch = _batch(model, pbmc_small)
    got, info = _remote(tmp_path, tiny_model_dir, "AutoModel", batch)
    assert info == {"class": "ScFMModel", "fm_imported": False}
    with torch.no_grad():
        want = model.scfm(**batch).cell_embedding.numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_remote_annotation_head_matches_fm(annotated, pbmc_small, tmp_path):
    meta, _ = _front_matter(annotated)
    assert meta["license"] == "cc-by-4.0" and "annotation" in meta["tags"]
    assert meta["pipeline_tag"] == "tabular-classification"
    model = fm.load(annotated)
    batch = _batch(model, pbmc_small)
    got, info = _remote(tmp_path, annotated, "AutoModelForSequenceClassification", batch)
    assert info["class"] == "ScFMForAnnotation" and not info["fm_imported"]
    with torch.no_grad():
        np.testing.assert_allclose(got, model(**batch).logits.numpy(), rtol=1e-5, atol=1e-6)


TOKENIZER_CHILD = BLOCK_FM + textwrap.dedent("""
    from transformers import AutoTokenizer
    try:
        AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=sys.argv[2] == "1")
    except Exception as e:
        print(type(e).__name__, str(e).replace("\\n", " "))
""")


def test_auto_tokenizer_gives_the_cell_tokenizer(tiny_model_dir, tmp_path):
    """AutoTokenizer.from_pretrained(export) is fm's CellTokenizer where scfm is installed; where it is not, it
    says what to install and call (trust_remote_code=True) or asks for trust_remote_code — never a confusing
    backend/sentencepiece error. Our own files are scfm_vocab.json / cell_tokenizer.json."""
    from transformers import AutoTokenizer

    hf = json.loads((tiny_model_dir / LEGACY_CONFIG_FILE).read_text())
    assert hf["tokenizer_class"] == "ScFMAutoTokenizer" and "vocab_sha256" not in hf
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert isinstance(tok, CellTokenizer) and tok.vocab.sha256 == fm.load(tiny_model_dir).cell_tokenizer.vocab.sha256
    work = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, work)
    env = _fresh_env(tmp_path)
    said = {}
    for trust in ("1", "0"):
        proc = subprocess.run([sys.executable, "-I", "-c", TOKENIZER_CHILD, str(work), trust], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        said[trust] = proc.stdout.strip()
    assert said["1"].startswith("ImportError") and "pip install scfm" in said["1"], said["1"]
    assert "trust_remote_code" in said["0"] and "sentencepiece" not in said["0"], said["0"]
    assert "CellTokenizer" in (tiny_model_dir / "README.md").read_text()


def test_old_export_with_tokenizer_config_still_loads(tiny_model_dir, pbmc_small, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(tiny_model_dir, old)
    (old / CONFIG_FILE).rename(old / LEGACY_CONFIG_FILE)
    for f in [*old.glob("*.py"), old / "README.md"]:
        f.unlink()
    config = json.loads((old / "config.json").read_text())
    del config["auto_map"]
    (old / "config.json").write_text(json.dumps(config))
    model = fm.load(old)
    np.testing.assert_array_equal(fm.embed(pbmc_small[:8].copy(), model),
                                  fm.embed(pbmc_small[:8].copy(), fm.load(tiny_model_dir)))
    model.cell_tokenizer.save_pretrained(old)  # re-saved: our config under the new name, HF's file under its own
    assert (old / CONFIG_FILE).is_file()
    assert "vocab_sha256" not in json.loads((old / LEGACY_CONFIG_FILE).read_text())
    assert CellTokenizer.from_pretrained(old).vocab.sha256 == model.cell_tokenizer.vocab.sha256


def test_controls_and_save_export_write_cards(tiny_model_dir, tmp_path):
    from fm.eval.controls import random_init_twin

    twin = random_init_twin(tiny_model_dir, tmp_path / "twin", seed=3)
    meta, text = _front_matter(twin)
    assert "random-init control" in text and json.loads((twin / "config.json").read_text())["auto_map"]
    assert (twin / "modeling_scfm.py").is_file()
    model = fm.load(tiny_model_dir)
    out = save_export(model, model.cell_tokenizer, tmp_path / "conv", source="converted from scGPT checkpoint /x")
    assert "converted from scGPT checkpoint /x" in (out / "README.md").read_text()


def test_remote_load_in_an_fm_process_keeps_fm_registered(tiny_model_dir, tmp_path, monkeypatch):
    from transformers import AutoConfig, AutoModel

    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "hf_modules"))
    AutoModel.from_pretrained(tiny_model_dir, trust_remote_code=True)  # transformers prefers the registered class
    assert type(AutoConfig.from_pretrained(tiny_model_dir)) is fm.ScFMConfig
    assert isinstance(fm.load(tiny_model_dir), fm.ScFMForMaskedExpression)
