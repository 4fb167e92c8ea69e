"""Writing a run: results.csv (tidy), results.md (methods × metrics per dataset), PNG plots and
meta.json (versions, git SHA, seeds, profile, runtime) — everything needed to trust a number later."""
from __future__ import annotations

import json
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd

from fm.eval.controls import parse_row
from fm.eval.deltas import VERSUS, fm_deltas, format_delta, lookup, twin_flags

PACKAGES = ("scfm", "torch", "numpy", "scipy", "pandas", "anndata", "scanpy", "scikit-learn", "scib-metrics",
            "jax", "harmonypy", "scanorama", "scvi-tools", "magic-impute", "liana", "celltypist", "matplotlib")
REPO = Path(__file__).resolve().parents[2]


def versions() -> dict[str, str | None]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_sha() -> str | None:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10)
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if sha.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _fmt(mean: float, sd: float, n: int) -> str:
    if mean is None or not np.isfinite(mean):
        return "n/a"
    digits = 3 if abs(mean) < 100 else 1
    return f"{mean:.{digits}f} ± {sd:.{digits}f}" if n > 1 and np.isfinite(sd) else f"{mean:.{digits}f}"


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    """Mean, sd and count over seeds per (dataset, method, metric)."""
    g = df.groupby(["dataset", "method", "metric"], sort=False)["value"]
    return g.agg(mean="mean", sd="std", n="count").reset_index()


def method_order(df: pd.DataFrame, dataset: str, main: str, higher: bool) -> list[str]:
    s = df[(df.dataset == dataset) & (df.metric == main)].groupby("method", sort=False)["value"].mean()
    s = s.fillna(-np.inf if higher else np.inf)
    ranked = list(s.sort_values(ascending=not higher).index)
    rest = [m for m in df[df.dataset == dataset].method.unique() if m not in ranked]
    return ranked + rest


def markdown_tables(df: pd.DataFrame, main: str, higher: bool, controls=(), deltas: pd.DataFrame | None = None) -> str:
    """Per dataset: methods (best first) × metrics (main first), then for FM rows Δ of the main metric
    vs the best baseline and vs the random-init twin (fm.eval.deltas; > 0 = FM better); per-class metrics ('f1:B cell') go to a second,
    compact table so the main one stays readable."""
    if df.empty:
        return "_no results_\n"
    stats = summarise(df)
    deltas = deltas if deltas is not None else pd.DataFrame(columns=["dataset", "versus"])
    lines = []
    for dataset in df.dataset.unique():
        sub = stats[stats.dataset == dataset]
        metrics = list(dict.fromkeys(sub.metric))
        main_metrics = [main] + [m for m in metrics if m != main and ":" not in m]
        detail = [m for m in metrics if ":" in m]
        order = method_order(df, dataset, main, higher)
        rt = df[df.dataset == dataset].drop_duplicates(["method", "seed"]).groupby("method")["runtime_s"].mean()
        mine = deltas[deltas.dataset == dataset]
        versus = [v for v in VERSUS if (mine.versus == v).any()]
        best = mine[mine.versus == "baseline"].reference.iloc[0] if "baseline" in versus else None
        arrow = "↑" if higher else "↓"
        for cols, title in ((main_metrics, ""), (detail, " — per class")):
            if not cols or (title and not detail):
                continue
            head = [f"**{c}** {arrow}" if c == main else c for c in cols]
            extra = [] if title else [f"Δ vs {best}" if v == "baseline" else "Δ vs twin" for v in versus]
            lines += [f"### {dataset}{title}", "",
                      "| method | " + " | ".join(head + extra) + (" | runtime (s) |" if not title else " |"),
                      "|---" * (len(cols) + len(extra) + 1 + (not title)) + "|"]
            for method in order:
                cells = []
                for c in cols:
                    r = sub[(sub.method == method) & (sub.metric == c)]
                    cells.append(_fmt(r["mean"].iloc[0], r["sd"].iloc[0], int(r["n"].iloc[0])) if len(r) else "")
                if not title:
                    cells += [format_delta(lookup(mine, dataset, method, v)) for v in versus]
                name = f"{method} (control)" if method in controls else method
                tail = f" | {rt.get(method, np.nan):.1f} |" if not title else " |"
                lines.append(f"| {name} | " + " | ".join(cells) + tail)
            lines.append("")
    return "\n".join(lines)


def plot_main_bars(df, path: Path, main: str, higher: bool, controls=()) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(df.dataset.unique())
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.5 * len(datasets), 3.2), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        s = df[(df.dataset == dataset) & (df.metric == main)].groupby("method", sort=False)["value"]
        order = [m for m in method_order(df, dataset, main, higher) if m in s.groups][::-1]
        mean, sd = s.mean().reindex(order), s.std().reindex(order).fillna(0)
        colors = ["#999999" if m in controls else "#fdb863" if parse_row(m)[2] else
                  "#d95f02" if m.startswith("fm") else "#1b9e77" for m in order]
        ax.barh(order, mean.values, xerr=sd.values, color=colors)
        ax.set_title(dataset, fontsize=10)
        ax.set_xlabel(f"{main} ({'higher' if higher else 'lower'} is better)")
        ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _column_groups(cols: list[str], groups: dict[str, tuple[str, ...]] | None) -> list[tuple[str, list[str]]]:
    """Columns ordered by group (groups' own order; unlisted metrics last, under "other")."""
    if not groups:
        return [("", cols)]
    out = [(g, [c for c in members if c in cols]) for g, members in groups.items()]
    listed = {c for _, members in out for c in members}
    out.append(("other", [c for c in cols if c not in listed]))
    return [(g, members) for g, members in out if members]


def plot_metric_heatmap(df, path: Path, main: str, higher: bool, groups: dict | None = None):
    """scIB-style table: methods × metrics, colour on one absolute scale [0, 1] with a colour bar (so
    0.88 and 0.94 look alike in every column), values written in each cell, column groups (e.g.
    bio conservation | batch correction | aggregate score) labelled above. Returns the Figure."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(df.dataset.unique())
    n_methods = df.method.nunique()
    fig, axes = plt.subplots(len(datasets), 1, figsize=(13, 0.45 * n_methods * len(datasets) + 2.0 * len(datasets)),
                             squeeze=False, layout="constrained")
    cmap = plt.get_cmap("viridis").with_extremes(bad="#dddddd")
    image = None
    for ax, dataset in zip(axes[:, 0], datasets):
        sub = df[df.dataset == dataset]
        table = sub.pivot_table(index="method", columns="metric", values="value", aggfunc="mean")
        blocks = _column_groups(list(dict.fromkeys(sub.metric)), groups)
        cols = [c for _, members in blocks for c in members]
        table = table.reindex(index=method_order(df, dataset, main, higher), columns=cols)
        values = np.ma.masked_invalid(table.values.astype(float))
        image = ax.imshow(values, cmap=cmap, aspect="auto", vmin=0.0, vmax=1.0)
        for (i, j), v in np.ndenumerate(table.values):
            if not pd.isna(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if v < 0.6 else "black", fontweight="bold" if cols[j] == main else None)
        start = 0
        for name, members in blocks:
            if start:
                ax.axvline(start - 0.5, color="white", linewidth=3)
            if name:
                ax.text((start + start + len(members) - 1) / 2, -0.7, name.replace("_", " "), ha="center",
                        va="bottom", fontsize=9, fontweight="bold")
            start += len(members)
        ax.set_xticks(range(len(cols)), cols, rotation=40, ha="right", fontsize=7)
        ax.set_yticks(range(len(table)), table.index, fontsize=8)
        ax.set_title(dataset, fontsize=10, loc="left", pad=22 if groups else 6)
    if image is not None:
        fig.colorbar(image, ax=axes[:, 0].tolist(), fraction=0.03, pad=0.01, label="score (absolute scale 0–1)")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return fig


def plot_umaps(df, output_dir: Path, main: str, higher: bool, controls=()) -> list[Path]:
    """UMAPs of the FM embeddings and the best non-control baseline, from embeddings the task saved
    under embeddings/<dataset>_seed<seed>.npz (first seed), coloured by label and by batch."""
    import anndata as ad
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import scanpy as sc

    written = []
    for dataset in df.dataset.unique():
        seed = int(df[df.dataset == dataset].seed.min())
        npz = output_dir / "embeddings" / f"{dataset}_seed{seed}.npz"
        if not npz.is_file():
            continue
        store = np.load(npz, allow_pickle=False)
        baselines = [m for m in method_order(df, dataset, main, higher) if m not in controls and not m.startswith("fm")]
        chosen = [m for m in df[df.dataset == dataset].method.unique() if m.startswith("fm")] + baselines[:1]
        chosen += [c for c in controls if c not in chosen]
        chosen = [m for m in chosen if f"emb:{m}" in store]
        fig, axes = plt.subplots(2, len(chosen), figsize=(3.6 * len(chosen), 6.6), squeeze=False)
        for j, method in enumerate(chosen):
            a = ad.AnnData(np.asarray(store[f"emb:{method}"], dtype=np.float32))
            a.obs["label"] = pd.Categorical(store["label"])
            a.obs["batch"] = pd.Categorical(store["batch"])
            sc.pp.neighbors(a, use_rep="X", n_neighbors=15, random_state=0)
            sc.tl.umap(a, random_state=0)
            for i, key in enumerate(("label", "batch")):
                sc.pl.umap(a, color=key, ax=axes[i, j], show=False, frameon=False, size=8,
                           legend_loc="right margin" if j == len(chosen) - 1 else None, title=f"{method}: {key}")
        fig.tight_layout()
        path = output_dir / f"umap_{dataset}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write_report(df: pd.DataFrame, output_dir: Path, suite: dict, profile: str, seeds, models, caps,
                 runtime_s: float, fm_controls: bool = False, failures: list[dict] | None = None,
                 subset: dict | None = None) -> None:
    """results.csv, deltas.csv (Δ of FM rows, fm.eval.deltas), results.md, plots and meta.json.
    `fm_controls`: the run carried random-init twin rows (recorded in the command and meta.json); `failures`:
    dataset runs that failed ({dataset, seed, error}), listed at the top of results.md and in meta.json; `subset`:
    the command's --methods / --datasets / --seeds when it picked part of the suite (so the recorded command
    reproduces the run)."""
    failures = list(failures or [])
    module = suite["_module"]
    main, higher, controls = module.MAIN_METRIC, module.HIGHER_IS_BETTER, list(module.CONTROLS)
    output_dir = Path(output_dir)
    df.to_csv(output_dir / "results.csv", index=False)
    deltas = fm_deltas(df, main, higher, controls)
    deltas.to_csv(output_dir / "deltas.csv", index=False)
    flags = twin_flags(deltas)
    if not df.empty and hasattr(module, "report_flags"):  # task-specific warnings (imputation: lost structure)
        flags += module.report_flags(df)
    plots = []
    if not df.empty:
        plot_main_bars(df, output_dir / f"{suite['task']}_{main}.png".replace(":", "_"), main, higher, controls)
        plots.append(f"{suite['task']}_{main}.png")
        extra = getattr(module, "REPORT_PLOTS", ())
        if "heatmap" in extra:
            plot_metric_heatmap(df, output_dir / f"{suite['task']}_table.png", main, higher,
                                getattr(module, "METRIC_GROUPS", None))
            plots.append(f"{suite['task']}_table.png")
        if "umap" in extra:
            plots += [p.name for p in plot_umaps(df, output_dir, main, higher, controls)]
    command = " ".join(["fm eval", suite["_path"], "--profile", profile,
                        *[f"--model {m}" for m in models], *(["--no-controls"] if models and not fm_controls else []),
                        *[f"--{k} {' '.join(map(str, v))}" for k, v in (subset or {}).items() if v],
                        "--output", str(output_dir)])
    md = [f"## {suite['task']} (profile `{profile}`, seeds {list(seeds)})", "",
          f"Main metric **{main}** ({'higher' if higher else 'lower'} is better); controls: {', '.join(controls)}. "
          f"Mean ± sd over seeds where more than one. Runtime: {runtime_s:.0f} s in all.", "",
          f"Command: `{command}`", ""]
    if not deltas.empty:
        md += [(f"Δ = {main} difference of an FM row vs the best classical baseline (not FM, not a control) and vs "
                "its random-init twin (`[<model>:random_init]` zero-shot, `[<model>:scratch]` fine-tuned from random "
                "weights), oriented so that > 0 means the FM row is better; mean of per-seed paired differences "
                "with a 95 % t-interval when n ≥ 2 seeds."), ""]
    md += [f"{flag}  " for flag in flags] + ([""] if flags else [])
    if failures:
        md += ["**Failed dataset runs (not in the tables):**", ""]
        md += [f"- {f['dataset']} seed {f['seed']}: {f['error']}" for f in failures] + [""]
    md.append(markdown_tables(df, main, higher, controls, deltas))
    (output_dir / "results.md").write_text("\n".join(md))
    meta = {"task": suite["task"], "suite": suite["_path"], "profile": profile, "seeds": list(seeds),
            "models": [str(m) for m in models], "caps": caps, "main_metric": main, "higher_is_better": higher,
            "controls": controls, "runtime_s": round(runtime_s, 2), "git_sha": git_sha(), "command": command,
            "argv": sys.argv, "versions": versions(), "plots": plots, "fm_controls": fm_controls,
            "twin_flags": flags, "failures": failures}
    (output_dir / "meta.json").write_text(json.dumps(meta, indent=2, default=str))


def write_combined(output_dir: Path, tasks: list[str], profile: str, runtime_s: float) -> Path:
    """One results.md for several suites (the source of eval/RESULTS.md)."""
    parts = [f"# Evaluation results (profile `{profile}`)", "",
             f"Total runtime {runtime_s:.0f} s; git {git_sha()}. Per-task CSV, plots and meta.json sit in "
             "the task subdirectories.", ""]
    for task in tasks:
        md = Path(output_dir) / task / "results.md"
        if md.is_file():
            parts += [md.read_text(), ""]
    path = Path(output_dir) / "results.md"
    path.write_text("\n".join(parts))
    return path
