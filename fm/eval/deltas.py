"""Δ of every FM row against the best classical baseline and against its random-init twin, with a
95 % interval over seeds, and the flag for a checkpoint that does not beat its twin.

Why paired differences: seeds change the split (and the twin's initialisation), and every method of
one seed sees the same split, so the per-seed difference removes the split-to-split spread that two
separate mean ± sd would both carry. Δ is oriented so that > 0 always means "the FM row is better"
(for a lower-is-better metric it is reference − FM). The interval is the t-interval of the per-seed
differences (n − 1 degrees of freedom) when n ≥ 2 seeds pair up; with one seed there is only the
point value, and the report says n.

"Best classical baseline" = the non-FM, non-control method with the best mean main metric on that
dataset (controls such as `majority` are floors, not competitors).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from fm.eval.controls import parse_row, twin_names
from fm.eval.harness import is_fm_method

COLUMNS = ["dataset", "method", "versus", "reference", "n", "delta", "low", "high"]
VERSUS = ("baseline", "twin")


def is_fm_row(name: str) -> bool:
    """An FM result row (`fm_knn[model]`, its twins), as opposed to a baseline or task control."""
    return is_fm_method(parse_row(name)[0])


def paired_delta(values: pd.Series, reference: pd.Series, higher: bool, level: float = 0.95) -> dict:
    """Mean of the per-seed differences (oriented: > 0 = `values` better) over the seeds both have,
    with its `level` t-interval (NaN bounds when fewer than 2 seeds pair up)."""
    from scipy import stats

    d = ((values - reference) * (1 if higher else -1)).dropna()
    n = len(d)
    mean = float(d.mean()) if n else float("nan")
    if n < 2:
        return {"n": n, "delta": mean, "low": float("nan"), "high": float("nan")}
    half = float(stats.t.ppf(0.5 + level / 2, n - 1) * d.std(ddof=1) / np.sqrt(n))
    return {"n": n, "delta": mean, "low": mean - half, "high": mean + half}


def best_baseline(per_seed: pd.DataFrame, higher: bool, controls=()) -> str | None:
    """The non-FM, non-control column of a seeds × methods table with the best mean (None: none)."""
    means = per_seed[[m for m in per_seed.columns if not is_fm_row(m) and m not in controls]].mean().dropna()
    if means.empty:
        return None
    return str(means.idxmax() if higher else means.idxmin())


def fm_deltas(df: pd.DataFrame, main: str, higher: bool, controls=()) -> pd.DataFrame:
    """One row per (dataset, FM row, versus): Δ vs the best baseline for every FM row (twins too), and
    Δ vs its random-init twin for every pretrained FM row that has one. Columns: COLUMNS."""
    rows = []
    sub = df[df.metric == main]
    for dataset in sub.dataset.unique():
        per_seed = sub[sub.dataset == dataset].pivot_table(index="seed", columns="method", values="value",
                                                           aggfunc="mean", dropna=False)
        best = best_baseline(per_seed, higher, controls)
        for method in per_seed.columns:
            if not is_fm_row(method):
                continue
            twin = next((t for t in twin_names(method) if t in per_seed.columns), None)
            for versus, reference in zip(VERSUS, (best, twin)):
                if reference is not None:
                    rows.append({"dataset": dataset, "method": method, "versus": versus, "reference": reference,
                                 **paired_delta(per_seed[method], per_seed[reference], higher)})
    return pd.DataFrame(rows, columns=COLUMNS)


def beats(row) -> bool:
    """A clear win: mean Δ > 0 and, with ≥ 2 seeds, the whole 95 % interval above 0."""
    return bool(row["delta"] > 0 and (row["n"] < 2 or row["low"] > 0))


def twin_flags(deltas: pd.DataFrame) -> list[str]:
    """One warning line per pretrained FM row that does not clearly beat its random-init twin."""
    lines = []
    for _, r in deltas[(deltas.versus == "twin") & (deltas.n > 0)].iterrows():
        if not beats(r):
            lines.append(f"⚠ {r['method']} does not beat its random-init twin ({r['reference']}) on {r['dataset']}: "
                         f"Δ {format_delta(r)}")
    return lines


def format_delta(row) -> str:
    """'+0.012 [-0.004, +0.028] n=3', or '+0.012 n=1' without an interval; '' when nothing paired."""
    if row is None or not row["n"] or not np.isfinite(row["delta"]):
        return ""
    digits = 3 if abs(row["delta"]) < 100 else 1
    text = f"{row['delta']:+.{digits}f}"
    if np.isfinite(row["low"]):
        text += f" [{row['low']:+.{digits}f}, {row['high']:+.{digits}f}]"
    return f"{text} n={int(row['n'])}"


def lookup(deltas: pd.DataFrame, dataset: str, method: str, versus: str):
    """The Δ row of (dataset, method, versus), or None."""
    hit = deltas[(deltas.dataset == dataset) & (deltas.method == method) & (deltas.versus == versus)]
    return None if hit.empty else hit.iloc[0]
