"""The scIB results heatmap: one absolute colour scale [0, 1] with a colour bar and labelled metric
groups, so that close values look alike (per-column min–max made 0.88 vs 0.94 opposite colours)."""
import matplotlib

matplotlib.use("Agg")
import numpy as np
import pandas as pd

from fm.eval.report import plot_metric_heatmap
from fm.eval.tasks.batch_correction import METRIC_GROUPS


def _results() -> pd.DataFrame:
    metrics = {"total": (0.90, 0.93), "bio_conservation": (0.88, 0.94), "batch_correction": (0.5, 0.6),
               "kmeans_ari": (0.88, 0.94), "ilisi": (0.2, 0.3), "custom_metric": (0.1, np.nan)}
    rows = [{"task": "batch_correction", "dataset": "d", "method": method, "metric": metric, "value": values[k],
             "seed": 0}
            for metric, values in metrics.items() for k, method in enumerate(("unintegrated", "pca"))]
    return pd.DataFrame(rows)


def test_heatmap_absolute_scale_colorbar_and_groups(tmp_path):
    path = tmp_path / "table.png"
    fig = plot_metric_heatmap(_results(), path, "total", True, METRIC_GROUPS)
    assert path.is_file() and path.stat().st_size > 0
    ax = next(a for a in fig.axes if a.images)
    image = ax.images[0]
    assert image.norm.vmin == 0.0 and image.norm.vmax == 1.0
    assert image.colorbar is not None and image.colorbar.ax in fig.axes
    texts = {t.get_text() for t in ax.texts}
    assert {"bio conservation", "batch correction", "aggregate score", "other"} <= texts
    assert {"0.88", "0.94"} <= texts  # values written in the cells
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == ["kmeans_ari", "ilisi", "bio_conservation", "batch_correction", "total", "custom_metric"]
    assert np.ma.is_masked(image.get_array())  # the missing value is masked (grey), not coloured
