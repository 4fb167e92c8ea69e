"""CellTokenizer: AnnData genes → vocabulary ids, raw-count validation, condition tokens.

A cell is stored sparse and untouched (vocab gene ids + raw counts); value encoding (fm.value_encoding)
and gene sampling happen later in the collator, per cell, so one tokenised corpus serves every epoch and seed.
Everything that can go wrong with a user's file is checked here, before anything is written.
"""
from __future__ import annotations

import copy
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from fm.vocab import GeneVocab

log = logging.getLogger("fm")

TOKENIZER_FILE = "cell_tokenizer.json"
HF_TOKENIZER_CONFIG = "tokenizer_config.json"  # Hugging Face's file: points AutoTokenizer at fm/tokenization_scfm.py
MODEL_CONFIG_FILE = "config.json"  # the model's (transformers) config, saved beside the tokenizer
UNKNOWN_CONDITION = "<unknown>"  # id 0 of every condition table: missing or unseen category


@dataclass
class GeneMatch:
    """How a file's genes map onto the vocabulary."""

    vocab_ids: np.ndarray  # per var column, -1 where unknown (or outside the model's gene table)
    species: str
    source: str = ""
    n_outside_table: int = 0  # columns in the vocabulary but not in the model's gene table (dropped)

    @property
    def n_total(self) -> int:
        return int(self.vocab_ids.size)

    @property
    def n_matched(self) -> int:
        return int((self.vocab_ids >= 0).sum())

    @property
    def fraction(self) -> float:
        return self.n_matched / max(self.n_total, 1)

    def summary(self) -> str:
        n_vocab = self.n_matched + self.n_outside_table
        text = (f"{self.source or 'input'}: {n_vocab}/{self.n_total} genes in the vocabulary "
                f"({100 * n_vocab / max(self.n_total, 1):.1f}%, {self.species}); {self.n_total - n_vocab} unmatched")
        if self.n_outside_table:
            text += f"; {self.n_matched} in the model's gene table, {self.n_outside_table} not (dropped)"
        return text


@dataclass
class EncodedCells:
    """Cells as sparse rows of (vocab gene id, raw count) plus condition ids — the corpus row format."""

    indptr: np.ndarray  # int64 (n_cells + 1)
    gene_ids: np.ndarray  # int32 (nnz)
    counts: np.ndarray  # float32 (nnz)
    conditions: np.ndarray  # int64 (n_cells, n_conditions)
    obs_names: np.ndarray = field(default_factory=lambda: np.array([], dtype=object))
    panels: list[np.ndarray] = field(default_factory=list)  # sorted vocab ids each source measured
    panel_of: np.ndarray | None = None  # per cell: index into `panels`

    def __len__(self) -> int:
        return len(self.indptr) - 1

    def __getitem__(self, i: int) -> dict:
        lo, hi = self.indptr[i], self.indptr[i + 1]
        row = {"gene_ids": self.gene_ids[lo:hi], "counts": self.counts[lo:hi],
               "conditions": self.conditions[i], "index": int(i)}
        if self.panel_of is not None:
            row["panel"] = self.panels[self.panel_of[i]]
        return row

    @staticmethod
    def concat(parts: Sequence["EncodedCells"]) -> "EncodedCells":
        offsets = np.cumsum([0] + [p.indptr[-1] for p in parts[:-1]])
        panels, panel_of = _merge_panels(parts)
        return EncodedCells(
            indptr=np.concatenate([[0]] + [p.indptr[1:] + o for p, o in zip(parts, offsets)]).astype(np.int64),
            gene_ids=np.concatenate([p.gene_ids for p in parts]),
            counts=np.concatenate([p.counts for p in parts]),
            conditions=np.concatenate([p.conditions for p in parts]),
            obs_names=np.concatenate([p.obs_names for p in parts]),
            panels=panels, panel_of=panel_of,
        )


def _merge_panels(parts: Sequence[EncodedCells]) -> tuple[list[np.ndarray], np.ndarray | None]:
    """One list of distinct panels (shared by identity, as chunks of one file share theirs)."""
    if any(p.panel_of is None for p in parts):
        return [], None
    panels: list[np.ndarray] = []
    where: dict[int, int] = {}
    mapped = []
    for part in parts:
        local = []
        for panel in part.panels:
            if id(panel) not in where:
                where[id(panel)] = len(panels)
                panels.append(panel)
            local.append(where[id(panel)])
        mapped.append(np.asarray(local, dtype=np.int64)[part.panel_of])
    return panels, np.concatenate(mapped)


class CellTokenizer:
    """Maps AnnData to model inputs; saved beside every checkpoint so inference matches training."""

    def __init__(self, vocab: GeneVocab | None = None, n_bins: int = 51, condition_keys: Sequence[str] = (),
                 condition_categories: dict[str, list[str]] | None = None, gene_key: str | None = None,
                 layer: str | None = None, min_matched_fraction: float = 0.2, allow_non_counts: bool = False,
                 gene_table: Sequence[int] | None = None, model_genes: dict[str, int] | None = None,
                 trained_genes: Sequence[int] | None = None):
        self.vocab = vocab or GeneVocab.default()
        # an imported checkpoint's own gene names (scGPT symbols, Geneformer Ensembl IDs) → token id: matched
        # exactly before the vocabulary, as the checkpoint's own code matches them. Ids >= len(vocab) are genes
        # our vocabulary does not know (retired symbols/IDs): the model has rows for them, only this name finds them.
        self.model_genes = None if model_genes is None else {str(k): int(v) for k, v in model_genes.items()}
        # vocab ids the model has embedding rows for (ScFMConfig.gene_table); None = every vocab id. Genes
        # outside it are dropped at encoding: their rows were never trained (a compact table has none).
        self.gene_table = None if gene_table is None else np.asarray(gene_table, dtype=np.int64)
        # vocab ids of the genes the model was pretrained on, when its gene table holds more (model.gene_table=full;
        # ScFMConfig.trained_genes); with a compact table the table is that set. Input mostly outside it (another
        # species, another panel) is refused unless allow_untrained_genes: its rows never trained.
        self.trained_genes = None if trained_genes is None else np.asarray(trained_genes, dtype=np.int64)
        self.allow_untrained_genes = False  # a per-model override, never saved (fm embed --allow-untrained-genes)
        self.n_bins = n_bins
        self.condition_keys = list(condition_keys)
        self.condition_categories = {k: list(v) for k, v in (condition_categories or {}).items()}
        self.gene_key = gene_key
        self.layer = layer
        self.min_matched_fraction = min_matched_fraction
        self.allow_non_counts = allow_non_counts
        self.use_raw = False  # read adata.raw (X and var) instead of adata: a per-call input setting, never saved
        self._reported: set[str] = set()  # gene-match summaries already logged

    # ------------------------------------------------------------------ input
    def with_input(self, layer: str | None = None, use_raw: bool = False, gene_key: str | None = None,
                   allow_non_counts: bool | None = None) -> CellTokenizer:
        """This tokenizer reading its input another way, for one call (a copy; itself when nothing changes):
        counts from `adata.layers[layer]`, or from `adata.raw.X` with genes `adata.raw.var_names` (use_raw),
        gene names from var column `gene_key`, non-integer values accepted (allow_non_counts). None / False
        keep the tokenizer's own setting (its saved `layer`, `gene_key`, `allow_non_counts`)."""
        if layer is not None and use_raw:
            raise ValueError("pass layer= or use_raw=True, not both: counts come from adata.layers[layer] or adata.raw.X")
        changes = {k: v for k, v in {"layer": layer, "gene_key": gene_key, "allow_non_counts": allow_non_counts,
                                     "use_raw": True if use_raw else None}.items() if v is not None}
        if use_raw:
            changes["layer"] = None  # the saved layer belongs to adata, not to adata.raw
        elif layer is not None:
            changes["use_raw"] = False
        if all(getattr(self, k) == v for k, v in changes.items()):
            return self
        other = copy.copy(self)
        for k, v in changes.items():
            setattr(other, k, v)
        return other

    def _source(self, adata, source: str = ""):
        """(var frame, var_names, counts matrix, its name) this tokenizer reads from adata; clear errors
        when the layer or .raw it is told to read is missing."""
        where = source or "input"
        if self.use_raw:
            if adata.raw is None:
                raise ValueError(f"{where}: use_raw=True but adata.raw is None (layers: {list(adata.layers)}). "
                                 "Pass layer='<name>' if counts are in a layer, or use_raw=False to read X.")
            return adata.raw.var, adata.raw.var_names, adata.raw.X, "raw.X"
        if self.layer:
            if self.layer not in adata.layers:
                raise KeyError(f"{where}: layer {self.layer!r} missing; layers: {list(adata.layers)}"
                               + (" (adata.raw is set: use_raw=True reads it)" if adata.raw is not None else "")
                               + ". Pass layer=None to read X.")
            return adata.var, adata.var_names, adata.layers[self.layer], f"layers[{self.layer!r}]"
        return adata.var, adata.var_names, adata.X, "X"

    # ------------------------------------------------------------------ genes
    def match_genes(self, adata, source: str = "") -> GeneMatch:
        """Vocabulary id of every var column; errors on duplicates and on too few matches."""
        var, var_names, _, _ = self._source(adata, source)
        if self.gene_key is not None and self.gene_key not in var.columns:
            raise KeyError(f"{source or 'input'}: {'raw.' if self.use_raw else ''}var column {self.gene_key!r} "
                           f"(gene_key) is missing; available: {list(var.columns)}. Pass gene_key=None to use "
                           "var_names.")
        key = self.gene_key or self._ensembl_column(var, var_names, source)
        names = pd.Index(var[key].astype(str) if key else var_names.astype(str))
        if names.has_duplicates:
            dup = names[names.duplicated()].unique()[:5].tolist()
            raise ValueError(f"{source or 'input'}: duplicate gene names {dup} ({names.duplicated().sum()} in all). "
                             "Sum or drop duplicated columns, or pass gene_key= a var column with unique "
                             "Ensembl IDs (e.g. 'gene_ids').")
        species = self.vocab.detect_species(names)
        ids = self.vocab.lookup(names, species=species)
        if self.model_genes:
            own = pd.Index(list(self.model_genes)).get_indexer(names)
            ids = np.where(own >= 0, np.fromiter(self.model_genes.values(), np.int64, len(self.model_genes))[own], ids)
        match = GeneMatch(ids, species, source)
        if match.fraction < self.min_matched_fraction:
            examples = names[ids < 0][:5].tolist()
            raise ValueError(f"{match.summary()} — below the minimum {self.min_matched_fraction:.0%}. "
                             f"Unmatched examples: {examples}. Point gene_key at a var column of gene "
                             "symbols or Ensembl IDs, or lower min_matched_fraction if this is expected.")
        self._check_trained_genes(match)
        if self.gene_table is not None:
            match = self._restrict_to_table(match, names)
            ids = match.vocab_ids
        kept = ids[ids >= 0]
        if np.unique(kept).size != kept.size:
            seen = pd.Series(names[ids >= 0]).groupby(kept).agg(list)
            clash = seen[seen.map(len) > 1].head(3).tolist()
            raise ValueError(f"{source or 'input'}: several columns map to the same vocabulary gene, e.g. {clash}. "
                             "Keep one column per gene (sum duplicates) before tokenizing.")
        summary = match.summary()
        if summary not in self._reported:  # once per tokenizer and file, not once per chunk or shard
            self._reported.add(summary)
            log.info(summary)
        return match

    def _ensembl_column(self, var: pd.DataFrame, var_names: pd.Index, source: str) -> str | None:
        """For a model whose own gene names are Ensembl IDs (an imported Geneformer), the var column of Ensembl IDs
        when var_names are not: symbols reach fewer of its genes (IDs our vocabulary lacks are found only by ID).
        None for scfm's own models and when var_names already are IDs or no column holds them."""
        if not self.model_genes or self.gene_key:
            return None
        from fm.vocab import ENSEMBL_ID_RE

        def ensembl_share(values) -> float:
            sample = pd.Series(np.asarray(values, dtype=object)[:2000]).astype(str)
            return float(sample.str.match(ENSEMBL_ID_RE).mean()) if len(sample) else 0.0

        if ensembl_share(list(self.model_genes)) < 0.9 or ensembl_share(var_names) >= 0.5:
            return None
        for column in var.columns:
            if var[column].dtype.kind in "OSU" or str(var[column].dtype) == "category":
                if ensembl_share(var[column]) >= 0.9:
                    log.info("%s: matching genes by var[%r] (Ensembl IDs), as this model names its genes "
                             "(pass gene_key to choose another column)", source or "input", column)
                    return str(column)
        return None

    def _check_trained_genes(self, match: GeneMatch) -> None:
        """Refuse input whose genes are mostly ones the model never trained on (mouse cells through a human model,
        another panel): below min_matched_fraction of both the input's vocabulary genes and the model's trained
        genes, as in _restrict_to_table. The error names both counts and species; allow_untrained_genes overrides."""
        trained = self.gene_table if self.gene_table is not None else self.trained_genes
        if trained is None or self.allow_untrained_genes:
            return
        trained = trained[trained >= self.vocab.n_special]
        ids = match.vocab_ids[match.vocab_ids >= self.vocab.n_special]
        inside = int(np.isin(ids, trained).sum())
        if inside >= self.min_matched_fraction * min(ids.size, trained.size):
            return
        known = trained[trained < len(self.vocab)]  # an imported model's own genes past the vocabulary have no species
        species, counts = np.unique(self.vocab.species_of(known), return_counts=True)
        model_species = ", ".join(f"{n} {sp}" for sp, n in sorted(zip(species, counts), key=lambda t: -t[1]) if sp)
        raise ValueError(
            f"{match.source or 'input'}: only {inside} of its {ids.size} vocabulary genes ({match.species}) are genes "
            f"this model was pretrained on ({model_species} genes) — below the minimum {self.min_matched_fraction:.0%}. "
            "Its other genes have embedding rows that never trained, so the output would be meaningless"
            + (" (another species than the model's)" if match.species not in species else "")
            + ". Use a model pretrained on this species/panel"
            + (", or run anyway with model.cell_tokenizer.allow_untrained_genes = True (fm embed: "
               "--allow-untrained-genes)." if self.gene_table is None or inside else
               " (this model has no embedding rows for them at all: its gene table holds only its pretraining genes)."))

    def _restrict_to_table(self, match: GeneMatch, names: pd.Index) -> GeneMatch:
        """Drop (and report once, with examples) the genes the model has no embedding row for.

        Too few left was already refused by _check_trained_genes (the table is the trained set), unless
        allow_untrained_genes: then the run goes on with the genes the table has.
        """
        ids = match.vocab_ids.copy()
        outside = (ids >= 0) & ~np.isin(ids, self.gene_table)
        if not outside.any():
            return match
        source = match.source or "input"
        n_vocab, n_model = match.n_matched, int((self.gene_table >= self.vocab.n_special).sum())
        ids[outside] = -1
        kept = GeneMatch(ids, match.species, match.source, int(outside.sum()))
        log.warning("%s: %d of its %d vocabulary genes are not in this model's gene table (the %d genes of its "
                    "pretraining data), e.g. %s; they are dropped — the model never learned them",
                    source, kept.n_outside_table, n_vocab, n_model, names[outside][:5].tolist())
        return kept

    def for_config(self, config) -> "CellTokenizer":
        """This tokenizer with the gene table of a model config (itself when it already has that table)."""
        table, trained = config.gene_table, config.trained_genes

        def same(ours, theirs) -> bool:
            return (ours is None and theirs is None) or (
                ours is not None and theirs is not None and np.array_equal(ours, theirs))

        if same(self.gene_table, table) and same(self.trained_genes, trained):
            return self
        other = copy.copy(self)
        other.gene_table = None if table is None else np.asarray(table, dtype=np.int64)
        other.trained_genes = None if trained is None else np.asarray(trained, dtype=np.int64)
        return other

    # ------------------------------------------------------------------ conditions
    def fit_conditions(self, obs: pd.DataFrame, source: str = "") -> None:
        """Learn category → id maps for condition columns (id 0 stays 'unknown')."""
        for key in self.condition_keys:
            values = self._condition_column(obs, key, source)
            known = self.condition_categories.setdefault(key, [UNKNOWN_CONDITION])
            new = sorted(set(values.unique()) - set(known))
            known.extend(new)

    def encode_conditions(self, obs: pd.DataFrame, source: str = "") -> np.ndarray:
        """(n_cells, n_conditions) ids; categories never seen in training map to 0 with a warning."""
        out = np.zeros((len(obs), len(self.condition_keys)), dtype=np.int64)
        for j, key in enumerate(self.condition_keys):
            values = self._condition_column(obs, key, source)
            table = {c: i for i, c in enumerate(self.condition_categories.get(key, [UNKNOWN_CONDITION]))}
            ids = values.map(table).fillna(0).astype(np.int64).to_numpy()
            unseen = sorted(set(values[ids == 0].unique()) - {UNKNOWN_CONDITION})
            if unseen:
                log.warning("%s: %s values %s were not seen in training; they use the unknown token",
                            source or "input", key, unseen[:5])
            out[:, j] = ids
        return out

    def condition_vocab_sizes(self) -> list[int]:
        return [len(self.condition_categories.get(k, [UNKNOWN_CONDITION])) for k in self.condition_keys]

    @staticmethod
    def _condition_column(obs: pd.DataFrame, key: str, source: str) -> pd.Series:
        if key not in obs.columns:
            raise KeyError(f"{source or 'input'}: obs column {key!r} is named as a condition but is missing; "
                           f"available obs columns: {list(obs.columns)}. Add it, or drop it from data.conditions.")
        return obs[key].astype(str).fillna(UNKNOWN_CONDITION)

    # ------------------------------------------------------------------ counts
    def iter_count_chunks(self, adata, match: GeneMatch, chunk_size: int = 4096,
                          source: str = "") -> Iterator[tuple[int, sp.csr_matrix]]:
        """Validated CSR chunks (rows × matched genes, columns in vocab-id order) without densifying X."""
        _, _, matrix, name = self._source(adata, source)
        keep = np.flatnonzero(match.vocab_ids >= 0)
        for start in range(0, adata.n_obs, chunk_size):
            chunk = matrix[start:start + chunk_size]
            chunk = sp.csr_matrix(chunk, dtype=np.float32) if not sp.issparse(chunk) else chunk.tocsr()
            self.validate_values(chunk.data, source, start, name)
            yield start, chunk[:, keep].tocsr()

    def validate_values(self, data: np.ndarray, source: str = "", row_offset: int = 0, matrix: str = "X") -> None:
        """Raw counts only (unless allow_non_counts): no NaN/inf, no negatives, integers. The arguments the
        messages recommend (layer=, use_raw=, allow_non_counts=) are keywords of fm.embed and every AnnData
        function, and options of `fm embed` (--layer, --use-raw, --allow-non-counts)."""
        where = f"{source or 'input'} (rows from {row_offset})"
        if not np.isfinite(data).all():
            raise ValueError(f"{where}: {matrix} contains NaN or infinite values. Fix or drop those cells first.")
        if (data < 0).any():
            raise ValueError(f"{where}: {matrix} contains negative values (min {data.min():.3g}) — it looks scaled or "
                             "centred. Use raw counts: layer='counts' (adata.layers['counts']), use_raw=True "
                             "(adata.raw.X) or the unprocessed file.")
        if not self.allow_non_counts and not np.array_equal(data, np.round(data)):
            raise ValueError(f"{where}: {matrix} holds non-integer values — it looks normalised, not raw counts. "
                             "Use raw counts (layer='counts', or use_raw=True if adata.raw holds counts), or pass "
                             "allow_non_counts=True to bin the values as they are (bins are per-cell ranks).")

    def iter_encoded(self, adata, source: str = "", chunk_size: int = 4096,
                     drop_empty: bool = False) -> Iterator[EncodedCells]:
        """Stream an AnnData as EncodedCells chunks (rows sorted by vocab id); empty cells error unless dropped."""
        match = self.match_genes(adata, source)
        conditions = self.encode_conditions(adata.obs, source)
        obs_names = np.asarray(adata.obs_names, dtype=object)
        matched = match.vocab_ids[match.vocab_ids >= 0]
        order = np.argsort(matched, kind="stable")
        gene_of_col = matched[order].astype(np.int32)
        for start, chunk in self.iter_count_chunks(adata, match, chunk_size, source):
            chunk = chunk[:, order]  # columns in vocab-id order: rows come out gene-sorted
            chunk.eliminate_zeros()
            chunk.sort_indices()
            stop = start + chunk.shape[0]
            part = EncodedCells(chunk.indptr.astype(np.int64), gene_of_col[chunk.indices],
                                chunk.data.astype(np.float32), conditions[start:stop], obs_names[start:stop],
                                panels=[gene_of_col], panel_of=np.zeros(stop - start, np.int64))
            empty = np.flatnonzero(np.diff(part.indptr) == 0)
            if empty.size and not drop_empty:
                raise ValueError(f"{source or 'input'}: cells with no counts in vocabulary genes "
                                 f"(e.g. {part.obs_names[empty[:3]].tolist()}). Filter them first "
                                 "(scanpy.pp.filter_cells(adata, min_genes=1)) or pass drop_empty=True.")
            if empty.size:
                log.warning("%s: dropped %d cells with no counts in vocabulary genes", source or "input", empty.size)
                part = subset_cells(part, np.flatnonzero(np.diff(part.indptr) > 0))
            yield part

    def encode(self, adata, source: str = "", chunk_size: int = 4096, drop_empty: bool = False) -> EncodedCells:
        """Whole AnnData → EncodedCells (vocab ids + raw counts), read in row chunks."""
        parts = list(self.iter_encoded(adata, source, chunk_size, drop_empty))
        if not parts:
            raise ValueError(f"{source or 'input'}: the AnnData has no cells")
        return EncodedCells.concat(parts)

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.vocab.save(directory)
        config = {"n_bins": self.n_bins, "condition_keys": self.condition_keys,
                  "condition_categories": self.condition_categories, "gene_key": self.gene_key,
                  "layer": self.layer, "min_matched_fraction": self.min_matched_fraction,
                  "allow_non_counts": self.allow_non_counts, "vocab_sha256": self.vocab.sha256}
        if self.model_genes is not None:
            config["model_genes"] = self.model_genes
        (directory / TOKENIZER_FILE).write_text(json.dumps(config, indent=2))
        # a real Hugging Face tokenizer_config.json: AutoTokenizer.from_pretrained(directory) → this CellTokenizer
        # (with scfm installed), or a clear "install scfm" error (fm/tokenization_scfm.py, copied beside it)
        from fm import tokenization_scfm

        shutil.copyfile(tokenization_scfm.__file__, directory / "tokenization_scfm.py")
        (directory / HF_TOKENIZER_CONFIG).write_text(json.dumps(tokenization_scfm.TOKENIZER_CONFIG, indent=2))

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "CellTokenizer":
        directory = Path(directory)
        path = directory / TOKENIZER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{directory}: no {TOKENIZER_FILE}; is this an scfm checkpoint directory?")
        config = json.loads(path.read_text())
        vocab = GeneVocab.load(directory)
        expected = config.pop("vocab_sha256", None)
        if expected and expected != vocab.sha256:
            raise ValueError(f"{directory}: gene vocabulary does not match the one this tokenizer was saved with")
        model_config = directory / MODEL_CONFIG_FILE  # the model's gene table: its config holds the one copy
        fields = json.loads(model_config.read_text()) if model_config.is_file() else {}
        return cls(vocab=vocab, gene_table=fields.get("gene_table"), trained_genes=fields.get("trained_genes"),
                   **config)


def split_cells(cells, val_fraction: float, seed: int):
    """A fixed (seed) held-out fraction of cells for periodic evaluation: (train, held out), or (cells, None)
    when it rounds to 0. `cells` is an EncodedCells or anything with a `.subset(rows)` (TaskCells); the
    one split of pretraining and every fine-tune."""
    n_val = int(round(len(cells) * val_fraction))
    if n_val == 0:
        return cells, None
    order = np.random.default_rng(seed).permutation(len(cells))
    take = cells.subset if hasattr(cells, "subset") else (lambda rows: subset_cells(cells, rows))
    return take(np.sort(order[n_val:])), take(np.sort(order[:n_val]))


def subset_cells(cells: EncodedCells, rows: np.ndarray) -> EncodedCells:
    """Rows of an EncodedCells as a new, compact EncodedCells."""
    starts, ends = cells.indptr[rows], cells.indptr[rows + 1]
    lengths = ends - starts
    take = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths) + np.arange(lengths.sum())
    return EncodedCells(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64), cells.gene_ids[take],
                        cells.counts[take], cells.conditions[rows], cells.obs_names[rows], cells.panels,
                        None if cells.panel_of is None else cells.panel_of[rows])
