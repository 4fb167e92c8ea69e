"""Cell–cell interactions: `fm.interactions` (LIANA-shaped ligand–receptor ranking) and `run` (the
`fm finetune` job of the spatial niche model ScFMForCCI).

fm.interactions has two variants, chosen by the model it is given:
- denoised (any pretrained checkpoint with an MVC head, or an imputation model): every cell's
  expression of the resource's genes is predicted from its cell embedding — the MVC head gives
  bin/(n_bins-1) (0 = not expressed … 1 = the cell's top expression bin), an imputation model
  (through fm.impute) log1p(counts/1e4); negative predictions are clipped to 0. score(L, R, s→t) = mean L in group s ×
  mean R in group t (a complex = min over subunits, per cell); p-value under permuted cell labels.
- niche (a model fine-tuned here, on data with spatial coordinates): for every receiver cell the
  model predicts its expression from its k spatial neighbours (fm.heads.cci). With P(g | a near b)
  the mean prediction for cells of group a that have a neighbour of group b:
    score = P(L | s near t) · P(R | t near s)      predicted L·R on s→t contacts;
    niche_effect = score − the same with the t senders (resp. s senders) removed from the niches
                   (ablation: the part of the contact co-expression the model owes to the neighbours);
  p-value of `score` under permuted cell labels (predictions fixed); rank by p-value, then niche_effect.
Both write the frame to adata.uns[key_added] and never touch X.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from fm.config import RunConfig, TaskConfig
from fm.data import LabeledCellCollator
from fm.heads.cci import ScFMForCCI
from fm.inference import backbone as _backbone_of, run_batched
from fm.preprocessing import TARGET_SUM
from fm.tasks.cci_scoring import (complex_values, conditional_means, group_codes, group_means, load_resource,
                                  pair_genes, permutation_pvalues, result_frame, usable_pairs)
from fm.tasks.common import TaskCells, collator_kwargs, load_head, load_task_cells, split_cells, train_task
from fm.tokenizer import CellTokenizer, EncodedCells
from fm.train import TrainResult

log = logging.getLogger("fm")


@dataclass
class CciConfig(TaskConfig):
    """task.name=cci: the spatial niche model (a receiver's expression from its neighbours)."""

    name: str = "cci"
    label_key: str = "cell_type"
    """obs column of each cell's type (the senders and receivers of interactions)."""
    spatial_key: str = "spatial"
    """obsm key of the cells' spatial coordinates."""
    n_neighbors: int = 8
    """Spatial neighbours that form a cell's niche."""

    def __post_init__(self):
        if self.n_neighbors < 1:
            raise ValueError(f"task.n_neighbors must be >= 1, got {self.n_neighbors}")



# ---------------------------------------------------------------- spatial niches
def read_coordinates(adata, key: str, source: str = "input") -> np.ndarray:
    if key not in adata.obsm:
        raise KeyError(f"{source}: obsm has no {key!r} — the niche model needs spatial coordinates (set "
                       f"task.spatial_key / spatial_key= to the right key); obsm keys: {list(adata.obsm)}")
    coords = np.asarray(adata.obsm[key], dtype=np.float64)
    if coords.ndim != 2 or not np.isfinite(coords).all():
        raise ValueError(f"{source}: obsm[{key!r}] must be a finite cells × dimensions array, got shape "
                         f"{coords.shape}")
    return coords


def niche_graph(coords: np.ndarray, k: int) -> np.ndarray:
    """(cells, k): each cell's k nearest other cells (its senders)."""
    from sklearn.neighbors import NearestNeighbors

    if len(coords) <= k:
        raise ValueError(f"{len(coords)} cells cannot give each cell {k} spatial neighbours; lower n_neighbors")
    _, idx = NearestNeighbors(n_neighbors=k + 1).fit(coords).kneighbors(coords)
    other = idx != np.arange(len(coords))[:, None]
    other[other.all(axis=1), -1] = False  # self not among the k+1 (duplicate positions): drop the farthest
    return idx[other].reshape(len(coords), k)


def niche_members(neighbors: np.ndarray, codes: np.ndarray, drop: int | None = None):
    """Receivers and which of their senders stay: all of them, or (ablation of group `drop`) the
    receivers with a `drop` sender and another one, without their `drop` senders."""
    if drop is None:
        return np.arange(len(neighbors)), np.ones(neighbors.shape, dtype=bool)
    gone = codes[neighbors] == drop
    rows = np.flatnonzero(gone.any(axis=1) & ~gone.all(axis=1))
    return rows, ~gone[rows]


def niche_pseudobulk(counts: sp.csr_matrix, neighbors, codes, n_types: int, rows, member):
    """Summed raw counts of each receiver's kept senders (rows × genes, CSR) and their group fractions."""
    r = np.repeat(np.arange(len(rows)), member.sum(axis=1))
    senders = neighbors[rows][member]
    adjacency = sp.csr_matrix((np.ones(len(r), np.float32), (r, senders)), shape=(len(rows), counts.shape[0]))
    composition = np.zeros((len(rows), n_types), np.float32)
    np.add.at(composition, (r, codes[senders]), 1.0)
    return (adjacency @ counts).tocsr(), (composition / member.sum(axis=1, keepdims=True)).astype(np.float32)


def _counts(adata, tokenizer: CellTokenizer) -> sp.csr_matrix:
    """The counts `tokenizer` reads (X, its layer, or adata.raw.X), as CSR."""
    return sp.csr_matrix(tokenizer._source(adata)[2], dtype=np.float32)


def _as_anndata(x: sp.csr_matrix, var: pd.DataFrame, tokenizer: CellTokenizer) -> ad.AnnData:
    out = ad.AnnData(X=x, var=var.copy(), obs=pd.DataFrame(index=[f"niche{i}" for i in range(x.shape[0])]))
    if tokenizer.layer:
        out.layers[tokenizer.layer] = x
    return out


def log_normalised(counts: sp.csr_matrix) -> np.ndarray:
    total = np.asarray(counts.sum(axis=1)).ravel()
    return np.log1p(counts.multiply(TARGET_SUM / np.maximum(total, 1.0)[:, None]).toarray()).astype(np.float32)


# ---------------------------------------------------------------- fine-tuning
def load_niche_cells(sources, tokenizer: CellTokenizer, label_key: str, spatial_key: str,
                     k: int) -> tuple[TaskCells, list[str], list[str]]:
    """One training row per receiver cell: its niche pseudobulk (tokenised), its group, its niche's group
    fractions and its log-normalised expression of every gene of the data (the targets; held dense, which
    suits spatial panels of up to a few thousand genes — subset a transcriptome-wide file first)."""
    parts = []
    for adata, source in sources:
        adata = adata.to_memory() if getattr(adata, "isbacked", False) else adata
        try:
            codes, names = group_codes(adata.obs, label_key, min_cells=1)
        except (KeyError, ValueError) as e:
            raise type(e)(f"{source}: {e.args[0]} (task.label_key)") from None
        parts.append((adata, source, np.asarray(names, dtype=object)[codes],
                      niche_graph(read_coordinates(adata, spatial_key, source), k)))
    genes = list(parts[0][0].var_names)
    for adata, source, _, _ in parts[1:]:
        if list(adata.var_names) != genes:
            raise ValueError(f"{source}: genes differ from {parts[0][1]}'s; the niche model predicts one gene "
                             "set — subset every file to the same var_names")
    types = sorted(set(np.concatenate([p[2] for p in parts])))
    index = {t: i for i, t in enumerate(types)}
    cells, targets = [], {"type": [], "composition": [], "expression": []}
    for adata, source, labels, neighbors in parts:
        codes = np.array([index[t] for t in labels], dtype=np.int64)
        counts = _counts(adata, tokenizer)
        pseudobulk, composition = niche_pseudobulk(counts, neighbors, codes, len(types),
                                                   *niche_members(neighbors, codes))
        cells.append(tokenizer.encode(_as_anndata(pseudobulk, adata.var, tokenizer), source=f"{source} niches"))
        targets["type"].append(codes)
        targets["composition"].append(composition)
        targets["expression"].append(log_normalised(counts))
    return TaskCells(EncodedCells.concat(cells), {k: np.concatenate(v) for k, v in targets.items()}), types, genes


def run(cfg: RunConfig, resume: bool = False, adatas=None) -> TrainResult:
    """The whole `fm finetune` job for task.name=cci: ScFMForCCI on every receiver cell."""
    accelerator, tokenizer, (data, types, genes) = load_task_cells(
        cfg, adatas, lambda sources, tokenizer: load_niche_cells(sources, tokenizer, cfg.task.label_key,
                                                                 cfg.task.spatial_key, cfg.task.n_neighbors))
    train_cells, val_cells = split_cells(data, cfg.data.val_fraction, cfg.train.seed)
    model = load_head(ScFMForCCI, cfg, num_labels=len(types), id2label=dict(enumerate(types)),
                      label2id={t: i for i, t in enumerate(types)}, niche_genes=genes, label_key=cfg.task.label_key,
                      spatial_key=cfg.task.spatial_key, n_neighbors=cfg.task.n_neighbors)
    # start from NCEM's type-only model: base[type] = the type's mean profile over the training receivers
    means = group_means(train_cells.targets["expression"], train_cells.targets["type"], len(types))
    with torch.no_grad():
        model.niche_head.base.weight.copy_(torch.from_numpy(np.nan_to_num(means)))
    log.info("niche model: %d receivers, %d cell types, %d genes, %d neighbours each", len(data), len(types),
             len(genes), cfg.task.n_neighbors)
    collator = LabeledCellCollator(**collator_kwargs(model, cfg), targets={
        "type": "receiver_types", "composition": "niche_composition", "expression": "labels"})
    return train_task(model, tokenizer, train_cells, val_cells, collator, cfg, resume, accelerator)


# ---------------------------------------------------------------- fm.interactions
def _can_denoise(model) -> None:
    if not any(isinstance(getattr(model, h, None), torch.nn.Module) for h in ("impute_head", "mvc_head")):
        raise ValueError(f"{type(model).__name__} cannot give denoised expression: pass a pretrained checkpoint "
                         "with an MVC head (fm pretrain, model.mvc=true), an imputation model, or a niche model "
                         "(fm finetune recipes/finetune/cci.yaml) for spatial data")


def denoised_expression(adata, model, columns: np.ndarray, vocab_ids: np.ndarray, batch_size: int,
                        progress: bool = False, **inputs) -> np.ndarray:
    """cells × len(columns): each gene (var column, its vocabulary id) predicted from each cell's embedding.

    An imputation model goes through fm.impute (its log1p scale and clipping; it predicts every gene,
    cells × genes dense); otherwise the pretraining MVC head, clipped at 0. Every gene of the cell is
    the model's input either way: only the outputs are restricted to `columns`. inputs: run_batched's
    layer / use_raw / gene_key / allow_non_counts (columns index the var of the matrix they select)."""
    if isinstance(getattr(model, "impute_head", None), torch.nn.Module):
        from fm.inference import input_tokenizer
        from fm.tasks.imputation import impute

        var, var_names, matrix, _ = input_tokenizer(model, **inputs)._source(adata)
        shallow = ad.AnnData(X=matrix, obs=pd.DataFrame(index=adata.obs_names),  # impute writes here
                             var=var.set_index(pd.Index(var_names)))
        if model.cell_tokenizer.layer:  # the model's saved layer: read the same counts
            shallow.layers[model.cell_tokenizer.layer] = matrix
        return impute(shallow, model, scale="log1p", batch_size=batch_size, progress=progress,
                      gene_key=inputs.get("gene_key"), allow_non_counts=inputs.get("allow_non_counts"))[:, columns]
    head, backbone = model.mvc_head, _backbone_of(model)

    def predict(m, batch):
        cell = backbone(**batch).cell_embedding
        emb = backbone.embeddings.embed_genes(torch.as_tensor(vocab_ids, device=cell.device))
        return head(emb.unsqueeze(0).expand(len(cell), -1, -1), cell).clamp_min(0.0)

    values, _ = run_batched(adata, model, predict, width=len(columns), batch_size=batch_size, progress=progress,
                            desc="interactions", **inputs)
    return values


def _denoised_interactions(adata, model, codes, groups, pairs, n_perms, seed, batch_size, progress, inputs):
    from fm.inference import input_tokenizer

    tokenizer = input_tokenizer(model, **inputs)
    match = tokenizer.match_genes(adata)
    var, var_names, _, _ = tokenizer._source(adata)
    names = var[tokenizer.gene_key] if tokenizer.gene_key else var_names  # the names it matched
    known = {str(g): j for j, (g, i) in enumerate(zip(names, match.vocab_ids)) if i >= 0}
    pairs = usable_pairs(pairs, known, "the data's genes known to the model's vocabulary")
    genes = pair_genes(pairs)
    columns = np.array([known[g] for g in genes])
    values = denoised_expression(adata, model, columns, match.vocab_ids[columns], batch_size, progress, **inputs)
    lig, rec = complex_values(values, genes, pairs["ligand"]), complex_values(values, genes, pairs["receptor"])
    n = len(groups)

    def statistic(c):
        return group_means(lig, c, n)[:, None, :] * group_means(rec, c, n)[None, :, :]

    score, pvalue = permutation_pvalues(statistic, codes, n_perms, seed)
    ones = np.ones((n, n, 1))
    return result_frame(groups, pairs, group_means(lig, codes, n)[:, None, :] * ones,
                        group_means(rec, codes, n)[None, :, :] * ones, score, pvalue)


def niche_predictions(adata, model, codes, neighbors, batch_size: int, progress: bool = False, **inputs):
    """Predictions with the full niche (cells × genes) and, per group u, (receivers, predictions
    without their u senders) for receivers with a u sender and another one. inputs: run_batched's
    layer / use_raw / gene_key / allow_non_counts."""
    from fm.inference import input_tokenizer

    tokenizer, n_types = input_tokenizer(model, **inputs), model.config.num_labels
    counts = _counts(adata, tokenizer)
    plans = [(None, *niche_members(neighbors, codes))]
    plans += [(u, *niche_members(neighbors, codes, u)) for u in range(n_types)]
    blocks = [niche_pseudobulk(counts, neighbors, codes, n_types, rows, member) for _, rows, member in plans]
    var = tokenizer._source(adata)[0].set_index(pd.Index(tokenizer._source(adata)[1]))
    niches = _as_anndata(sp.vstack([b[0] for b in blocks]).tocsr(), var, tokenizer)
    if model.cell_tokenizer.layer:  # the model's saved layer: the same niche counts
        niches.layers[model.cell_tokenizer.layer] = niches.X
    embedding, _ = run_batched(niches, model, lambda m, batch: m.scfm(**batch).cell_embedding,
                               width=model.config.d_model, batch_size=batch_size, progress=progress, desc="niches",
                               layer=None if tokenizer.use_raw else tokenizer.layer, gene_key=tokenizer.gene_key,
                               allow_non_counts=tokenizer.allow_non_counts)
    receivers = np.concatenate([rows for _, rows, _ in plans])
    with torch.inference_mode():
        device = next(model.parameters()).device
        prediction = model.niche_head(torch.from_numpy(embedding).to(device),
                                      torch.from_numpy(codes[receivers]).to(device),
                                      torch.from_numpy(np.concatenate([b[1] for b in blocks])).to(device))
    prediction = prediction.float().clamp_min(0.0).cpu().numpy()  # expression is never negative
    offsets = np.cumsum([0] + [len(rows) for _, rows, _ in plans])
    full = prediction[: offsets[1]]
    ablated = {u: (rows, prediction[offsets[i]:offsets[i + 1]]) for i, (u, rows, _) in enumerate(plans) if i}
    return full, ablated


def _niche_interactions(adata, model, codes, groups, pairs, n_perms, seed, spatial_key, batch_size, progress, inputs):
    config = model.config
    coords = read_coordinates(adata, spatial_key or config.spatial_key)
    types = [config.id2label[i] for i in range(config.num_labels)]
    unknown = sorted(set(groups) - set(types))
    if unknown:
        raise ValueError(f"groups {unknown} are not cell types the niche model was trained on ({types}); group "
                         f"by the model's label column ({config.label_key!r}) or fine-tune on these labels")
    codes = np.array([types.index(groups[c]) for c in codes], dtype=np.int64)
    pairs = usable_pairs(pairs, config.niche_genes, "the genes the niche model predicts (config.niche_genes)")
    genes, n, neighbors = list(config.niche_genes), len(types), niche_graph(coords, config.n_neighbors)
    full, ablated = niche_predictions(adata, model, codes, neighbors, batch_size, progress, **inputs)
    lig, rec = complex_values(full, genes, pairs["ligand"]), complex_values(full, genes, pairs["receptor"])
    receiver = np.repeat(np.arange(len(codes)), neighbors.shape[1])

    def present(c):  # cells × groups: which groups each cell's niche holds
        out = np.zeros((len(c), n), dtype=bool)
        out[receiver, c[neighbors].ravel()] = True
        return out

    def statistic(c):
        held = present(c)
        return conditional_means(lig, c, held) * conditional_means(rec, c, held).transpose(1, 0, 2)

    score, pvalue = permutation_pvalues(statistic, codes, n_perms, seed)
    held = present(codes)
    p_lig, p_rec = conditional_means(lig, codes, held), conditional_means(rec, codes, held)
    d_lig, d_rec = np.zeros_like(p_lig), np.zeros_like(p_rec)  # [receiver group, removed group, pair]
    for u, (rows, pred) in ablated.items():
        if len(rows):
            d_lig[:, u] = group_means(lig[rows] - complex_values(pred, genes, pairs["ligand"]), codes[rows], n)
            d_rec[:, u] = group_means(rec[rows] - complex_values(pred, genes, pairs["receptor"]), codes[rows], n)
    d_lig, d_rec = np.nan_to_num(d_lig), np.nan_to_num(d_rec)  # no mixed niche: no measurable effect
    effect = score - (p_lig - d_lig) * (p_rec - d_rec).transpose(1, 0, 2)
    frame = result_frame(types, pairs, p_lig, p_rec.transpose(1, 0, 2), score, pvalue, {"niche_effect": effect},
                         tiebreak="niche_effect")
    return frame[frame["source"].isin(groups) & frame["target"].isin(groups)].reset_index(drop=True)


def interactions(adata, model, groupby: str = "cell_type", resource="consensus", n_perms: int = 100, seed: int = 0,
                 spatial_key: str | None = None, key_added: str | None = None, batch_size: int = 64,
                 progress: bool = False, *, key: str | None = None, layer: str | None = None, use_raw: bool = False,
                 gene_key: str | None = None, allow_non_counts: bool | None = None, copy: bool = False):
    """Rank ligand–receptor interactions between the groups of obs[groupby] with a scfm model.

    model: a pretrained checkpoint (denoised variant) or a niche model fine-tuned with
    recipes/finetune/cci.yaml (niche variant; needs obsm[spatial_key], default the model's). resource:
    a resource name in <data dir>/lr/liana_omni_resource.csv or a frame with `ligand`/`receptor` columns
    (e.g. liana.resource.select_resource('consensus')); complexes A_B. Returns (and writes to
    adata.uns[key_added]) one row per (source, target, ligand_complex, receptor_complex) with
    ligand_means, receptor_means, score, pvalue (n_perms label permutations, seeded), niche_effect
    (niche variant) and rank (1 = strongest; by pvalue, then niche_effect or score). See the module
    docstring for the scales. Every group needs ≥ 2 cells. X is never modified.

    scverse arguments (fm/scverse.py): counts from X, layers[layer] or .raw (use_raw); genes from var_names or
    var[gene_key]; key_added (default "fm_interactions"; `key` is its alias); copy=True returns a modified copy
    (copy=False returns the frame); a view with copy=False is an error. Records adata.uns["fm"][key_added].
    """
    from fm.scverse import output_adata, record, start_call

    key_added, inputs = start_call(adata, copy, "fm.interactions", key_added, key, "fm_interactions", layer, use_raw,
                             gene_key, allow_non_counts)
    codes, groups = group_codes(adata.obs, groupby)
    niche = isinstance(model, ScFMForCCI)
    if not niche:
        _can_denoise(model)  # before any work
    pairs = load_resource(resource)
    if niche:
        frame = _niche_interactions(adata, model, codes, groups, pairs, n_perms, seed, spatial_key, batch_size,
                                    progress, inputs)
    else:
        frame = _denoised_interactions(adata, model, codes, groups, pairs, n_perms, seed, batch_size, progress, inputs)
    target = output_adata(adata, copy)
    target.uns[key_added] = frame
    record(target, key_added, model, "fm.interactions", {**inputs, "groupby": groupby, "n_perms": n_perms, "seed": seed,
                                                         "resource": resource if isinstance(resource, str) else "frame",
                                                         "spatial_key": spatial_key})
    return target if copy else frame


__all__ = ["interactions", "load_niche_cells", "niche_graph", "niche_predictions", "read_coordinates", "run"]
