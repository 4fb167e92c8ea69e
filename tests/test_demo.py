"""The README's main job, shortened: real data when present, a generated dataset when not."""
import anndata as ad
import numpy as np

from fm.demo import knn_label_accuracy, run_demo

FAST = ["train.max_steps=4", "train.save_every=0", "train.eval_every=0", "train.batch_size=16",
        "data.max_genes=32", "train.progress=false"]


def test_demo_without_real_data_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FM_DATA_DIR", str(tmp_path / "nowhere"))
    assert run_demo(str(tmp_path / "run"), FAST) == 0
    out = capsys.readouterr().out
    assert "GENERATED dataset" in out and "obsm['X_fm']" in out
    written = ad.read_h5ad(tmp_path / "run" / "embedded.h5ad")
    assert written.obsm["X_fm"].shape == (written.n_obs, 64)
    # running it again reuses the finished run instead of refusing or retraining
    assert run_demo(str(tmp_path / "run"), FAST) == 0


def test_demo_on_real_data(tmp_path, pbmc_path, capsys):
    assert run_demo(str(tmp_path / "run"), FAST) == 0
    out = capsys.readouterr().out
    assert "real data" in out and "cell_type accuracy" in out


def test_knn_accuracy_sanity():
    rng = np.random.default_rng(0)
    labels = np.repeat(["a", "b"], 50)
    separated = rng.normal(size=(100, 5)) + np.where(labels == "a", 10.0, -10.0)[:, None]  # cosine-separable
    assert knn_label_accuracy(separated, labels) == 1.0
    assert knn_label_accuracy(rng.normal(size=(100, 5)), labels) < 0.8
