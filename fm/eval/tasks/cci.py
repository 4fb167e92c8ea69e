"""Cell–cell communication (CCI): rank (ligand, receptor, source type, target type) tuples and score
the ranking against interactions supported by space.

Every method sees the same cells, the same log-normalisation (log1p of counts/1e4), the same cell
types and the same ligand–receptor resource (a DataFrame with `ligand`/`receptor` columns, taken
from lr/liana_omni_resource.csv, one `resource` value; complexes written A_B; only pairs whose genes
are all in the dataset). Methods: LIANA's CellPhoneDB, NATMI, Connectome, SingleCellSignalR and
rank aggregate (`li.mt.*`, `use_raw=False`, `n_perms` capped), an expression-product baseline, a
seeded random ranking (control), and per --model:
  fm_denoised — zero-shot fm.interactions: L/R expression predicted from each cell's embedding by the
                pretrained MVC head, group-mean product, label-permutation p-value (`fm_n_perms`);
  fm_niche    — the niche model (recipes/finetune/cci.yaml + caps.finetune) fine-tuned on the TRAIN
                region only, then fm.interactions on the test region (rank by p-value, then the
                niche effect); extra metrics auroc/auprc_niche_effect rank by the niche effect alone.
fm methods see only groups with ≥ 2 cells (fm_niche: also only types seen in training); tuples of
other groups count as unreported, as LIANA's min_cells does.

Spatial split (`split: {kind: spatial, axis, test_size}`): the cells whose coordinate on `axis` is at
or above the (1 − test_size) quantile are the test region, the rest the train region (index file
splits/<dataset>_spatial.npz). The truth AND every method's ranking (baselines too, so rows compare)
are computed on the test region alone; the train region is used only to fine-tune fm_niche. A
spatial dataset without a split uses all cells and skips fm_niche (it would fine-tune on the truth).

Ground truth from space (datasets with `spatial_key`): edges are the symmetrised kNN graph on the
coordinates (`n_neighbors`, default 8); an edge i→j has source type s = type(i), target t = type(j).
For a pair (L, R) the score of (s, t) is the mean over s→t edges of L(i)·R(j) (log-normalised;
a complex is the min over its subunits, per cell). Two nulls, `truth_n_perms` draws each (seeded):
  labels    — cell-type labels permuted over cells (same graph): is L→R specific to s→t?
  positions — each s→t edge replaced by a random s cell and a random t cell: is it proximity?
p = (1 + #{null ≥ observed}) / (1 + n). A tuple is *true* when p < `alpha` (0.05) under the
null(s) chosen by `truth_null` (default `both`: specific AND proximal). The universe is every
(L, R, s, t) with at least `min_edges` (10) s→t edges (fewer: untestable, left out); tuples with
zero co-expression on those edges stay in it as negatives. The truth table is written to
<output>/cci_truth_<dataset>.csv.

Scoring: each method's score for every tuple of the universe, oriented so higher = more likely;
LIANA methods rank by their specificity score (ties broken by magnitude; SingleCellSignalR has
magnitude only) and, as extra metrics, by magnitude alone. A tuple a method does not report
(filtered by `expr_prop`) ranks below all it reports. Metrics: AUROC (main) and AUPRC (sklearn).
Datasets without space (e.g. pbmc3k): no truth; only `agreement_spearman`, each method's mean
Spearman correlation with each other method over the tuples both report (universe: all resource
pairs × type pairs).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial

import numpy as np
import pandas as pd

from fm.eval.context import EvalContext, dense, timed
from fm.preprocessing import log_normalise
from fm.tasks.cci_scoring import RESOURCE_FILE, complex_values, group_means, load_resource, pair_genes, usable_pairs

log = logging.getLogger("fm.eval")

MAIN_METRIC = "auroc"
HIGHER_IS_BETTER = True
CONTROLS = ["random"]
DATASET_KEYS = {"spatial_key", "resource", "resource_file", "n_neighbors", "min_edges", "truth_null", "alpha"}
KEYS = ["ligand", "receptor", "source", "target"]
LIANA = {"cellphonedb": "cellphonedb", "natmi": "natmi", "connectome": "connectome",
         "singlecellsignalr": "singlecellsignalr", "rank_aggregate": "rank_aggregate"}


# ---------------------------------------------------------------- resource (fm.tasks.cci_scoring's conventions)
def resource_pairs(dataset: dict, ctx: EvalContext, genes) -> pd.DataFrame:
    """Ligand/receptor pairs of the dataset's resource (from the suite's data directory) whose genes,
    every complex subunit, are all in `genes`."""
    path = ctx.data_dir / dataset.get("resource_file", RESOURCE_FILE)
    if not path.is_file():
        raise FileNotFoundError(f"dataset {dataset['name']!r}: resource file {path} not found")
    table = pd.read_csv(path)
    name = dataset.get("resource", "consensus")
    table = table[table["resource"] == name]
    if table.empty:
        raise ValueError(f"{path}: no rows with resource == {name!r}")
    pairs = usable_pairs(load_resource(table), genes, f"dataset {dataset['name']!r}")
    if len(pairs) < 5:
        raise ValueError(f"dataset {dataset['name']!r}: only {len(pairs)} {name!r} pairs have all genes in the data")
    return pairs


def _means(values: np.ndarray, group: np.ndarray, n_groups: int) -> np.ndarray:
    """group_means with 0, not NaN, for a group without members: an s→t pair without edges
    co-expresses nothing, and a permutation that empties a group must count as 0 ≥ observed."""
    return np.nan_to_num(group_means(values, group, n_groups), nan=0.0)


# ---------------------------------------------------------------- spatial truth
def spatial_edges(coords: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Directed edges of the symmetrised kNN graph (each undirected edge in both directions)."""
    from sklearn.neighbors import NearestNeighbors

    _, idx = NearestNeighbors(n_neighbors=k + 1).fit(coords).kneighbors(coords)
    src = np.repeat(np.arange(len(coords)), k + 1)
    dst = idx.ravel()
    keep = src != dst
    pairs = np.concatenate([np.stack([src[keep], dst[keep]], 1), np.stack([dst[keep], src[keep]], 1)])
    pairs = np.unique(pairs, axis=0)
    return pairs[:, 0], pairs[:, 1]


def spatial_truth(lig: np.ndarray, rec: np.ndarray, types: np.ndarray, coords: np.ndarray, seed: int,
                  k: int = 8, n_perms: int = 200, min_edges: int = 10, alpha: float = 0.05,
                  null: str = "both") -> dict:
    """Observed neighbour co-expression, p-values under both nulls and the truth mask, all shaped
    (n_types², n_pairs) with row s·T + t; also `n_edges` per row and `testable` rows."""
    if null not in ("both", "labels", "positions"):
        raise ValueError(f"truth_null {null!r} unknown (both | labels | positions)")
    n_types = int(types.max()) + 1
    src, dst = spatial_edges(coords, k)
    prod = lig[src] * rec[dst]
    group = types[src] * n_types + types[dst]
    n_groups = n_types * n_types
    observed = _means(prod, group, n_groups)
    n_edges = np.bincount(group, minlength=n_groups)
    rng = np.random.default_rng(seed)
    ge_lab = np.zeros_like(observed)
    ge_pos = np.zeros_like(observed)
    order = np.argsort(types, kind="stable")
    size = np.bincount(types, minlength=n_types)
    start = np.concatenate([[0], np.cumsum(size)[:-1]])
    for _ in range(n_perms):
        if null in ("both", "labels"):
            perm = rng.permutation(types)
            ge_lab += _means(prod, perm[src] * n_types + perm[dst], n_groups) >= observed
        if null in ("both", "positions"):
            i = order[start[types[src]] + (rng.random(len(src)) * size[types[src]]).astype(np.int64)]
            j = order[start[types[dst]] + (rng.random(len(dst)) * size[types[dst]]).astype(np.int64)]
            ge_pos += _means(lig[i] * rec[j], group, n_groups) >= observed
    p_lab = (1 + ge_lab) / (1 + n_perms)
    p_pos = (1 + ge_pos) / (1 + n_perms)
    true = {"both": (p_lab < alpha) & (p_pos < alpha), "labels": p_lab < alpha, "positions": p_pos < alpha}[null]
    true &= observed > 0
    return {"observed": observed, "p_labels": p_lab, "p_positions": p_pos, "true": true,
            "n_edges": n_edges, "testable": n_edges >= min_edges, "n_types": n_types}


def universe_frame(resource: pd.DataFrame, categories, rows: np.ndarray | None = None) -> pd.DataFrame:
    """All (ligand, receptor, source, target) tuples, in the (s·T + t, pair) order of the truth arrays."""
    n = len(categories)
    rows = np.arange(n * n) if rows is None else rows
    src = np.asarray(categories)[rows // n]
    dst = np.asarray(categories)[rows % n]
    p = len(resource)
    return pd.DataFrame({"ligand": np.tile(resource["ligand"].to_numpy(), len(rows)),
                         "receptor": np.tile(resource["receptor"].to_numpy(), len(rows)),
                         "source": np.repeat(src, p), "target": np.repeat(dst, p),
                         "_row": np.repeat(rows, p), "_pair": np.tile(np.arange(p), len(rows))})


# ---------------------------------------------------------------- methods
def _orient(values, ascending: bool) -> np.ndarray:
    v = np.asarray(values, dtype=float)
    return -v if ascending else v


def liana_scores(method: str, lognorm, label_key: str, resource: pd.DataFrame, seed: int, ctx) -> pd.DataFrame:
    """LIANA result with `primary` (specificity, ties by magnitude) and `magnitude`, higher = stronger."""
    import liana as li

    fn = getattr(li.mt, LIANA[method])
    res = fn(lognorm, groupby=label_key, resource=resource, use_raw=False, expr_prop=float(ctx.cap("expr_prop", 0.1)),
             n_perms=int(ctx.cap("liana_n_perms", 100)), seed=seed, inplace=False, verbose=False)
    # per-subunit rows carry `ligand`/`receptor`; the complexes (as in the resource) are *_complex
    res = res.drop(columns=["ligand", "receptor"], errors="ignore").rename(
        columns={"ligand_complex": "ligand", "receptor_complex": "receptor"})
    mag = _orient(res[fn.magnitude], fn.magnitude_ascending)
    if fn.specificity is None:
        primary = mag
    else:
        spec = _orient(res[fn.specificity], fn.specificity_ascending)
        primary = np.empty(len(res))
        primary[np.lexsort((mag, spec))] = np.arange(len(res))  # rank by specificity, then magnitude
    return pd.DataFrame({**{k: res[k].astype(str).to_numpy() for k in KEYS}, "primary": primary, "magnitude": mag})


def expr_product_scores(universe, lig, rec, types, n_types) -> pd.DataFrame:
    """Baseline: mean ligand in the source type × mean receptor in the target type (no specificity)."""
    mean_l = _means(lig, types, n_types)
    mean_r = _means(rec, types, n_types)
    row, p = universe["_row"].to_numpy(), universe["_pair"].to_numpy()
    s, t = row // n_types, row % n_types
    score = mean_l[s, p] * mean_r[t, p]
    return universe[KEYS].assign(primary=score, magnitude=score)


def align(universe: pd.DataFrame, scores: pd.DataFrame, column: str) -> tuple[np.ndarray, np.ndarray]:
    """The method's score for every universe tuple (tuples it does not report rank below all it
    does) and the mask of tuples it reports."""
    merged = universe[KEYS].merge(scores[KEYS + [column]].drop_duplicates(KEYS), on=KEYS, how="left")
    values = merged[column].to_numpy(dtype=float)
    found = np.isfinite(values)
    floor = values[found].min() - 1.0 if found.any() else 0.0
    return np.where(found, values, floor), found


def _auc(y: np.ndarray, s: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import average_precision_score, roc_auc_score

    if y.all() or not y.any():
        return {"auroc": float("nan"), "auprc": float("nan")}
    return {"auroc": float(roc_auc_score(y, s)), "auprc": float(average_precision_score(y, s))}


def spatial_split(adata, dataset: dict, coords: np.ndarray, ctx: EvalContext) -> tuple[np.ndarray, np.ndarray] | None:
    """Train/test regions of a spatial dataset (a cut along one coordinate), saved as an index file."""
    spec = dataset.get("split")
    if not spec:
        return None
    if spec.get("kind") != "spatial":
        raise ValueError(f"dataset {dataset['name']!r}: cci split kind {spec.get('kind')!r} unknown (spatial)")
    axis, test_size = int(spec.get("axis", 0)), float(spec.get("test_size", 0.5))
    if not 0 < test_size < 1 or not 0 <= axis < coords.shape[1]:
        raise ValueError(f"dataset {dataset['name']!r}: split needs 0 < test_size < 1 and axis < {coords.shape[1]}")
    test = coords[:, axis] >= np.quantile(coords[:, axis], 1 - test_size)
    return ctx.save_split(f"{dataset['name']}_spatial", np.flatnonzero(~test), np.flatnonzero(test),
                          obs_names=adata.obs_names)


@dataclass
class Prepared:
    """What every method of one dataset × seed sees, and the truth it is scored on."""

    name: str
    seed: int
    dataset: dict  # the suite entry (fm_niche reads spatial_key and n_neighbors)
    label_key: str
    counts: object  # AnnData: raw counts of the scored cells (the test region of a spatial split)
    train_counts: object  # AnnData: the train region (fm_niche fine-tunes on it, nothing else sees it), or None
    lognorm: object  # AnnData: counts log-normalised, labels as categories
    resource: pd.DataFrame  # ligand/receptor pairs with all genes in the data
    lig: np.ndarray  # cells × pairs: ligand (complex) expression, log-normalised
    rec: np.ndarray  # cells × pairs: receptor (complex) expression
    types: np.ndarray  # cell-type code per cell
    n_types: int
    universe: pd.DataFrame  # the (ligand, receptor, source, target) tuples every method is scored over
    y: np.ndarray | None  # which universe tuples are true (None: no space, agreement only)


def prepare(dataset: dict, seed: int, ctx: EvalContext) -> Prepared:
    label_key = dataset.get("label_key", "cell_type")
    adata = ctx.load_dataset(dataset, required_obs=["label_key"])
    spatial_key = dataset.get("spatial_key")
    train_counts = None
    if spatial_key:
        if spatial_key not in adata.obsm:
            raise ValueError(f"{adata.uns['eval_file']}: obsm has no {spatial_key!r} (spatial_key of dataset "
                             f"{dataset['name']!r}); obsm keys: {list(adata.obsm)}")
        split = spatial_split(adata, dataset, np.asarray(adata.obsm[spatial_key], dtype=float), ctx)
        if split is not None:
            train_counts, adata = adata[split[0]].copy(), adata[split[1]].copy()
            log.info("cci %s: spatial split, %d train-region cells (fine-tuning only), %d test-region cells "
                     "(truth and every ranking)", dataset["name"], train_counts.n_obs, adata.n_obs)
    adata.obs[label_key] = adata.obs[label_key].astype(str).astype("category")
    lognorm = log_normalise(adata)
    resource = resource_pairs(dataset, ctx, lognorm.var_names)
    cats = list(adata.obs[label_key].cat.categories)
    types = adata.obs[label_key].cat.codes.to_numpy().astype(np.int64)
    genes = pair_genes(resource)
    x = dense(lognorm[:, genes].X)
    lig, rec = complex_values(x, genes, resource["ligand"]), complex_values(x, genes, resource["receptor"])
    if spatial_key:
        with timed() as t_truth:
            truth = spatial_truth(lig, rec, types, np.asarray(adata.obsm[spatial_key], dtype=float), seed,
                                  k=int(dataset.get("n_neighbors", 8)), n_perms=int(ctx.cap("truth_n_perms", 200)),
                                  min_edges=int(dataset.get("min_edges", 10)), alpha=float(dataset.get("alpha", 0.05)),
                                  null=dataset.get("truth_null", "both"))
        universe = universe_frame(resource, cats, np.flatnonzero(truth["testable"]))
        r, q = universe["_row"].to_numpy(), universe["_pair"].to_numpy()
        y = truth["true"][r, q]
        table = universe[KEYS].assign(n_edges=truth["n_edges"][r], observed=truth["observed"][r, q],
                                      p_labels=truth["p_labels"][r, q], p_positions=truth["p_positions"][r, q], true=y)
        ctx.output_dir.mkdir(parents=True, exist_ok=True)
        table.to_csv(ctx.output_dir / f"cci_truth_{dataset['name']}_seed{seed}.csv", index=False)
        log.info("cci %s truth: %d pairs × %d testable type pairs = %d tuples, %d true (%.1f s)", dataset["name"],
                 len(resource), int(truth["testable"].sum()), len(y), int(y.sum()), t_truth.seconds)
    else:
        universe, y = universe_frame(resource, cats), None
    return Prepared(name=dataset["name"], seed=seed, dataset=dataset, label_key=label_key, counts=adata,
                    train_counts=train_counts, lognorm=lognorm, resource=resource, lig=lig, rec=rec, types=types,
                    n_types=len(cats), universe=universe, y=y)


@dataclass
class Ranking:
    """A method's output: its scores for every universe tuple (see align) and which tuples it reports."""

    primary: np.ndarray
    found: np.ndarray
    magnitude: np.ndarray
    niche_effect: np.ndarray | None  # fm_niche only: the niche effect alone


def _ranking(p: Prepared, scores: pd.DataFrame) -> Ranking:
    primary, found = align(p.universe, scores, "primary")
    effect = align(p.universe, scores, "niche_effect")[0] if "niche_effect" in scores else None
    return Ranking(primary=primary, found=found, magnitude=align(p.universe, scores, "magnitude")[0],
                   niche_effect=effect)


def score(p: Prepared, r: Ranking) -> dict[str, float]:
    """AUROC (main) and AUPRC against the spatial truth, by the primary score, by magnitude and (fm_niche)
    by the niche effect, then coverage; without truth, coverage only (finalize adds agreement)."""
    coverage = float(r.found.mean())
    if p.y is None:
        return {"coverage": coverage}
    values = _auc(p.y, r.primary)
    values.update({f"{k}_magnitude": v for k, v in _auc(p.y, r.magnitude).items()})
    if r.niche_effect is not None:
        values.update({f"{k}_niche_effect": v for k, v in _auc(p.y, r.niche_effect).items()})
    values["coverage"] = coverage
    return values


def finalize(p: Prepared, rankings: dict[str, Ranking]) -> dict[str, dict[str, float]]:
    """Without truth, agreement is the only thing measurable: each method's mean Spearman correlation
    with every other method over the tuples both report (unreported ones would all tie at the bottom)."""
    from scipy.stats import spearmanr

    if p.y is not None:
        return {}

    def rho(a: Ranking, b: Ranking):
        both = a.found & b.found
        return spearmanr(a.primary[both], b.primary[both])[0] if both.sum() > 2 else np.nan

    out = {}
    for name, mine in rankings.items():
        others = [rho(mine, other) for m, other in rankings.items() if m != name]
        out[name] = {"agreement_spearman": float(np.nanmean(others)) if others else float("nan")}
    return out


# ---------------------------------------------------------------- methods (prepared → Ranking, None when skipped)
def _liana(method: str, p: Prepared, ctx):
    return _ranking(p, liana_scores(method, p.lognorm, p.label_key, p.resource, p.seed, ctx))


def _expr_product(p: Prepared, ctx):
    return _ranking(p, expr_product_scores(p.universe, p.lig, p.rec, p.types, p.n_types))


def _random(p: Prepared, ctx):
    s = np.random.default_rng(p.seed).random(len(p.universe))
    return _ranking(p, p.universe[KEYS].assign(primary=s, magnitude=s))


def _fm_interactions(p: Prepared, ctx, model, known) -> Ranking:
    """fm.interactions on the scored cells of groups with ≥ 2 cells (and, with `known`, of types the
    model was trained on), ranked by its rank (p-value, then score)."""
    import fm

    labels = p.counts.obs[p.label_key].astype(str)
    sizes = labels.value_counts()
    keep = labels.isin(sizes.index[sizes >= 2]) & (labels.isin(known) if known else True)
    cells = p.counts[keep.to_numpy()].copy()
    frame = fm.interactions(cells, model, groupby=p.label_key, resource=p.resource, seed=p.seed,
                            n_perms=int(ctx.cap("fm_n_perms", ctx.cap("liana_n_perms", 100))))
    scores = pd.DataFrame({"ligand": frame["ligand_complex"], "receptor": frame["receptor_complex"],
                           "source": frame["source"], "target": frame["target"],
                           "primary": -frame["rank"].to_numpy(float), "magnitude": frame["score"]})
    if "niche_effect" in frame:
        scores["niche_effect"] = frame["niche_effect"]
    return _ranking(p, scores)


def _fm_denoised(p: Prepared, ctx, model_dir):
    import fm

    return _fm_interactions(p, ctx, fm.load(model_dir), None)


def _fm_niche(p: Prepared, ctx, model_dir):
    if p.train_counts is None:
        log.warning("cci %s: fm_niche needs a spatial dataset with a split (it must not fine-tune on the "
                    "cells it is judged on); skipped", p.name)
        return None
    model = ctx.fm_finetune(p.train_counts, model_dir, "cci", p.name, p.seed, **{
        "task.label_key": p.label_key, "task.spatial_key": p.dataset["spatial_key"],
        "task.n_neighbors": int(p.dataset.get("n_neighbors", 8))})
    return _fm_interactions(p, ctx, model, set(model.config.label2id))


METHODS = {**{m: partial(_liana, m) for m in LIANA}, "expr_product": _expr_product, "random": _random,
           "fm_denoised": _fm_denoised, "fm_niche": _fm_niche}
