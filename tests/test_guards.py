"""Guards against silent nonsense and false messages (issue 15): input a model never trained on is refused with
the numbers and an override that works; mostly-"unknown" annotations warn; every option an error message
recommends exists; outputs respect the umask; an interrupted export's temp file does not survive the next one."""
from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

import fm
from fm.inference import UNKNOWN, write_labels
from fm.vocab import GeneVocab

FM_SOURCE = Path(fm.__file__).resolve().parent


def _mouse_cells(n_cells: int = 40, n_genes: int = 300, seed: int = 0) -> ad.AnnData:
    """Counts over real mouse gene symbols of the vocabulary (the species a human-trained model never saw)."""
    vocab = GeneVocab.default()
    symbols = vocab.symbols[(vocab.species == "mouse") & (vocab.symbols != "")]
    names = list(dict.fromkeys(symbols[:5000]))[:n_genes]
    rng = np.random.default_rng(seed)
    x = sp.csr_matrix(rng.poisson(1.0, (n_cells, len(names))).astype(np.float32))
    return _anndata(x, names)


def _anndata(x, names) -> ad.AnnData:
    a = ad.AnnData(x)
    a.var_names = names
    a.obs_names = [f"cell{i}" for i in range(x.shape[0])]
    return a


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_full_model_dir"])
def test_other_species_is_refused_with_numbers(request, fixture):
    model = fm.load(request.getfixturevalue(fixture))
    mouse = _mouse_cells()
    with pytest.raises(ValueError, match=r"only 0 of its \d+ vocabulary genes \(mouse\) are genes this model was "
                                         r"pretrained on \(\d+ human genes\)"):
        fm.embed(mouse, model)
    assert "X_fm" not in mouse.obsm


def test_untrained_genes_override_runs(tiny_full_model_dir):
    model = fm.load(tiny_full_model_dir)
    assert model.config.trained_genes, "a full-table model records the genes it was pretrained on"
    mouse = _mouse_cells()
    model.cell_tokenizer.allow_untrained_genes = True  # what the error message names
    emb = fm.embed(mouse, model)
    assert emb.shape == (mouse.n_obs, model.config.d_model) and np.isfinite(emb).all()


def test_own_training_genes_pass(tiny_model_dir, small_h5ad_path):
    adata = ad.read_h5ad(small_h5ad_path)[:32].copy()
    assert fm.embed(adata, fm.load(tiny_model_dir)).shape[0] == 32


def test_mostly_unknown_annotations_warn(caplog):
    adata = _anndata(sp.csr_matrix(np.ones((10, 2), dtype=np.float32)), ["A", "B"])
    probs = np.full((10, 3), 1 / 3, dtype=np.float32)
    probs[:2] = [0.9, 0.05, 0.05]
    with caplog.at_level("WARNING", logger="fm"):
        labels = write_labels(adata, "pred", probs, ["a", "b", "c"], threshold=0.5)
    assert (labels == UNKNOWN).sum() == 8
    assert any("8 of 10 cells (80 %)" in r.getMessage() and "threshold" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING", logger="fm"):
        write_labels(adata, "pred", probs, ["a", "b", "c"], threshold=0.0)
    assert not caplog.records


# ------------------------------------------------------------------ every suggestion in an error message works


def _raise_messages() -> list[tuple[str, str]]:
    """(file, text) of every string literal in a `raise` statement or a log.warning/error call under fm/."""
    found = []
    for path in FM_SOURCE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            is_warning = (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                          and node.func.attr in ("warning", "error"))
            if isinstance(node, ast.Raise) or is_warning:
                for sub in ast.walk(node):
                    if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
                        found.append((path.name, sub.value))
    return found


def _cli_options() -> set[str]:
    import argparse

    from fm.cli import build_parser

    options: set[str] = set()

    def walk(parser):
        for action in parser._actions:
            options.update(action.option_strings)
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    walk(sub)

    walk(build_parser())
    return options


# options of other programs an error message may name
FOREIGN_OPTIONS = {"--nproc_per_node", "--config_file", "--num_processes", "--no-deps"}


def test_every_cli_option_named_in_an_error_exists():
    options = _cli_options()
    named = {(f, o) for f, text in _raise_messages() for o in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]+", text)}
    missing = sorted((f, o) for f, o in named if o not in options and o not in FOREIGN_OPTIONS)
    assert not missing, f"error messages recommend options the CLI lacks: {missing}"


def test_every_api_keyword_named_in_an_error_exists():
    """`layer='counts'`, `drop_empty=True`, `gene_key=…` … in a message are keywords of the AnnData functions."""
    import inspect

    from fm.tasks import annotation, batch_correction, imputation, modality_prediction

    functions = [fm.embed, annotation.annotate, annotation.transfer_labels, imputation.impute,
                 batch_correction.integrate, modality_prediction.predict_protein]
    keywords = {name for f in functions for name in inspect.signature(f).parameters}
    scverse = {"layer", "use_raw", "gene_key", "allow_non_counts", "drop_empty", "key_added", "copy"}
    assert scverse <= keywords
    named = {(f, k) for f, text in _raise_messages() for k in re.findall(r"\b([a-z_]+)=(?:True|False|None|'|<|…)", text)}
    missing = sorted((f, k) for f, k in named if k in scverse and k not in keywords)
    assert not missing, missing


# ------------------------------------------------------------------ no leftovers


def test_outputs_respect_the_umask_and_stale_export_temp_is_removed(tmp_path, small_h5ad_path, monkeypatch):
    from conftest import tiny_overrides
    from fm.config import load_config
    from fm.paths import recipe_path
    from fm.pretrain import run_pretraining

    old = os.umask(0o022)
    try:
        cfg = load_config(recipe_path("debug"), tiny_overrides(tmp_path, [small_h5ad_path], 2))
        export = run_pretraining(cfg).export_dir
        for p in export.iterdir():
            assert p.stat().st_mode & 0o777 == 0o644, p.name
        stale = export / ".tmpKILLED"  # what safetensors leaves when a kill lands between its write and rename
        stale.write_bytes(b"\0" * 128)
        run_pretraining(cfg, resume=True)  # resumes at the last step and exports again
        assert not stale.exists()
    finally:
        os.umask(old)


def test_every_cli_option_has_help_text():
    import argparse

    from fm.cli import build_parser

    missing = []

    def walk(parser, name):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub in action.choices.items():
                    walk(sub, f"{name} {sub_name}")
            elif not action.help and not isinstance(action, argparse._HelpAction):
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")

    walk(build_parser(), "fm")
    assert not missing, missing


def test_cli_output_is_quiet_without_a_terminal(tmp_path, small_h5ad_path):
    """Redirected (no TTY): no tqdm bar lines, one log line per train.log_every steps, no DeepSpeed CPU warning."""
    import subprocess
    import sys

    from conftest import tiny_overrides

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("FM_PROGRESS", None)
    env.pop("DS_ACCELERATOR", None)
    overrides = tiny_overrides(tmp_path / "run", [small_h5ad_path], 6, **{"train.progress": True, "train.log_every": 3})
    proc = subprocess.run([sys.executable, "-m", "fm.cli", "pretrain", "debug", *overrides], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    output = proc.stdout + proc.stderr
    assert "Setting accelerator to CPU" not in output
    assert not any(line.startswith("train:") or "\rtrain:" in line for line in output.splitlines()), "a tqdm bar"
    assert [line.split("train step ")[1].split(":")[0] for line in output.splitlines() if "train step " in line] == \
        ["1/6", "3/6", "6/6"]
