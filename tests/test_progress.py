"""Progress bars of `fm corpus build` (cells) and `fm eval` (method runs): shown when forced on
(argument or FM_PROGRESS=1), absent with --quiet and when stderr is not a terminal (pytest's capture)."""
import re

import pytest
import yaml

from fm.cli import main
from fm.data.corpus import build_corpus
from fm.eval.harness import run_suite
from fm.progress import ENV, progress_enabled

BAR = re.compile(r"\d+/\d+ \[")  # tqdm's "n/total [elapsed…" part


def test_progress_enabled_rules(monkeypatch):
    class Tty:
        def isatty(self):
            return True

    monkeypatch.delenv(ENV, raising=False)
    assert progress_enabled(None, Tty()) and not progress_enabled(None, object())
    assert not progress_enabled(False, Tty()) and progress_enabled(True, object())
    monkeypatch.setenv(ENV, "0")
    assert not progress_enabled(None, Tty())
    monkeypatch.setenv(ENV, "1")
    assert progress_enabled(None, object()) and not progress_enabled(False, object())


@pytest.fixture()
def two_files(tmp_path, pbmc_small):
    paths = [tmp_path / "a.h5ad", tmp_path / "b.h5ad"]
    pbmc_small[:120].copy().write_h5ad(paths[0])
    pbmc_small[120:].copy().write_h5ad(paths[1])
    return paths


@pytest.mark.parametrize("workers", [1, 2])
def test_corpus_build_counts_every_cell(two_files, tmp_path, capsys, monkeypatch, workers):
    monkeypatch.delenv(ENV, raising=False)
    m = build_corpus(two_files, tmp_path / "c", shard_size=50, workers=workers, progress=True)
    err = capsys.readouterr().err
    assert "corpus build" in err and "200/200" in err and "cells" in err and BAR.search(err), err
    assert m["n_cells"] <= 200
    build_corpus(two_files, tmp_path / "c2", shard_size=50, workers=workers)  # default: stderr is no TTY here
    assert not BAR.search(capsys.readouterr().err)


def test_corpus_cli_quiet_wins(two_files, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(ENV, "1")
    args = ["corpus", "build", "--input", *map(str, two_files), "--workers", "1", "--shard-size", "80"]
    assert main(args + ["--output", str(tmp_path / "on")]) == 0
    assert "200/200" in capsys.readouterr().err
    assert main(args + ["--output", str(tmp_path / "off"), "--quiet"]) == 0
    out = capsys.readouterr()
    assert not BAR.search(out.err) and "cells in" in out.out  # the summary lines stay


def _suite(tmp_path, pbmc_small):
    data = tmp_path / "pbmc.h5ad"
    pbmc_small.write_h5ad(data)
    path = tmp_path / "annotation.yaml"
    path.write_text(yaml.safe_dump({"task": "annotation", "methods": ["majority"], "caps": {"n_hvg": 200},
                                    "datasets": [{"name": "tiny", "file": str(data), "label_key": "cell_type"}],
                                    "profiles": {"ci": {"seeds": [0, 1]}}}))
    return path


def test_eval_bar_counts_runs(tmp_path, pbmc_small, capsys, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    suite = _suite(tmp_path, pbmc_small)
    run_suite(suite, "ci", [], tmp_path / "out", write=False, progress=True)
    err = capsys.readouterr().err
    assert "eval annotation" in err and "2/2" in err and "runs" in err and BAR.search(err), err
    run_suite(suite, "ci", [], tmp_path / "out2", write=False)
    assert not BAR.search(capsys.readouterr().err)


def test_eval_cli_quiet(tmp_path, pbmc_small, capsys, monkeypatch):
    monkeypatch.setenv(ENV, "1")
    suite = _suite(tmp_path, pbmc_small)
    assert main(["eval", str(suite), "--profile", "ci", "--output", str(tmp_path / "q"), "--quiet"]) == 0
    out = capsys.readouterr()
    assert not BAR.search(out.err) and "result rows" in out.out
