"""The commands a user runs on a released scGPT or Geneformer checkpoint: fm convert, fm embed, fm finetune
(a few steps), fm eval with --model (zero-shot and fine-tuned rows, each with its random-init control)."""
from __future__ import annotations

import anndata as ad
import pandas as pd
import pytest

import fm
from conftest import PBMC, real_file
from fm.cli import main
from fm.paths import fixtures_dir, recipe_path

CASES = {  # fixture → (fm convert arguments, genes of the checkpoint the report names, embedding width)
    "scgpt_tiny": (["scgpt", "{src}"], "1792/2000 checkpoint genes", 32),
    "geneformer_tiny": (["geneformer", "{src}/model", "--dictionaries", "{src}"], "22029/25424 checkpoint genes", 32),
}


@pytest.mark.parametrize("fixture", sorted(CASES))
def test_command_line_on_a_converted_checkpoint(fixture, tmp_path, capsys):
    src = fixtures_dir() / fixture
    if not src.is_dir():
        pytest.skip(f"checkpoint fixture {src} not found (set FM_FIXTURES_DIR)")
    pbmc = real_file(PBMC)
    args, genes, width = CASES[fixture]
    out = tmp_path / "converted"
    convert = [a.format(src=src) for a in args]
    assert main(["convert", convert[0], convert[1], str(out), *convert[2:]]) == 0
    assert genes in capsys.readouterr().out
    assert main(["embed", "--model", str(out), "--input", str(pbmc), "--output", str(tmp_path / "emb.h5ad")]) == 0
    assert ad.read_h5ad(tmp_path / "emb.h5ad").obsm["X_fm"].shape == (2638, width)
    assert main(["finetune", str(recipe_path("recipes/finetune/annotation.yaml")), f"model.init_from={out}",
                 f"train.output_dir={tmp_path / 'annot'}", "train.max_steps=3", "train.epochs=null",
                 "train.eval_every=0", "train.save_every=0", f"data.paths=[{pbmc}]"]) == 0
    clf = fm.load(tmp_path / "annot" / "model")
    assert type(clf).__name__ == "ScFMForAnnotation" and clf.config.backbone == fm.load(out).config.backbone
    query = ad.read_h5ad(pbmc)[:50].copy()
    fm.annotate(query, clf)
    assert query.obs["fm_cell_type"].notna().all()
    assert main(["eval", "eval/annotation.yaml", "--profile", "ci", "--model", str(out), "--output",
                 str(tmp_path / "eval"), "--methods", "fm_knn", "fm_finetune", "--datasets", "pbmc3k"]) == 0
    methods = set(pd.read_csv(tmp_path / "eval" / "results.csv")["method"])
    name = out.name
    assert {f"fm_knn[{name}]", f"fm_finetune[{name}]", f"fm_knn[{name}:random_init]",
            f"fm_finetune[{name}:scratch]"} <= methods, methods
