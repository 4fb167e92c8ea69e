"""Pretraining: recipe → tokenised cells (h5ad encoded in memory, or a corpus streamed from disk) →
ScFMForMaskedExpression → the one training loop → export."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from fm.config import RunConfig
from fm.data import CellCollator, encode_files
from fm.data.collator import collator_settings
from fm.data.corpus import corpus_genes, is_corpus, load_manifest
from fm.data.streaming import CorpusDataset
from fm.configuration_scfm import ARCHITECTURES
from fm.modeling_scfm import ScFMConfig, ScFMForMaskedExpression
from fm.tokenizer import CellTokenizer, EncodedCells, split_cells
from fm.train import TrainResult, check_output_dir, make_accelerator, train

log = logging.getLogger("fm")


def build_tokenizer(cfg: RunConfig) -> CellTokenizer:
    if cfg.model.init_from:
        return CellTokenizer.from_pretrained(cfg.model.init_from)
    return CellTokenizer(n_bins=cfg.model.n_bins, condition_keys=cfg.data.conditions, gene_key=cfg.data.gene_key,
                         layer=cfg.data.layer, min_matched_fraction=cfg.data.min_matched_fraction,
                         allow_non_counts=cfg.data.allow_non_counts)


def build_model(cfg: RunConfig, tokenizer: CellTokenizer, genes: np.ndarray | None = None) -> ScFMForMaskedExpression:
    """A fresh model (or model.init_from's) for `tokenizer`; `genes`: the vocab ids of the training data — the
    gene table is those plus the special tokens (model.gene_table=full or None: the whole vocabulary, `genes` then
    recorded as config.trained_genes). The tokenizer takes the same table and trained set, so the exported
    directory encodes only genes the model has rows for and refuses input mostly outside what it trained on."""
    if cfg.model.init_from:
        return ScFMForMaskedExpression.from_pretrained(cfg.model.init_from)
    m = cfg.model
    table = None if genes is None or m.gene_table == "full" else gene_table(genes, tokenizer)
    trained = None if genes is None or table is not None else np.asarray(genes, dtype=np.int64)
    tokenizer.gene_table = None if table is None else np.asarray(table, dtype=np.int64)
    tokenizer.trained_genes = trained
    arch = ARCHITECTURES[m.architecture]
    config = ScFMConfig(vocab_size=len(tokenizer.vocab), gene_table=table, n_bins=m.n_bins,
                        trained_genes=None if trained is None else trained[trained >= 0].tolist(),
                        value_encoding=arch.get("value_encoding", cfg.data.value_encoding),
                        d_model=m.d_model, n_layers=m.n_layers, n_heads=m.n_heads, d_ff=m.d_ff, dropout=m.dropout,
                        max_genes=cfg.data.max_genes, condition_keys=tokenizer.condition_keys,
                        condition_vocab_sizes=tokenizer.condition_vocab_sizes(), pooling=arch.get("pooling", m.pooling),
                        mvc=m.mvc,
                        wced_genes=m.wced_genes, wced_weight=m.wced_weight, gep_weight=m.gep_weight,
                        contrastive_weight=m.contrastive_weight, contrastive_temperature=m.contrastive_temperature,
                        generative_mask=m.generative_mask, zero_fraction=cfg.data.zero_fraction,
                        **{k: v for k, v in arch.items() if k not in ("value_encoding", "pooling")})
    torch.manual_seed(cfg.train.seed)  # same seed, same initial weights
    return ScFMForMaskedExpression(config)


def gene_table(genes: np.ndarray, tokenizer: CellTokenizer) -> list[int]:
    """Rows of a compact gene table: every special token (pad, cls, mask… keep their ids as rows) + `genes`."""
    genes = np.asarray(genes, dtype=np.int64)
    return np.union1d(np.arange(tokenizer.vocab.n_special), genes[genes >= 0]).tolist()


def encoded_genes(cells: EncodedCells, vocab_size: int) -> np.ndarray:
    """Sorted vocab ids the cells' sources measured (their panels, zeros included) or, without panels, express."""
    seen = np.zeros(vocab_size, dtype=bool)
    seen[cells.gene_ids] = True
    for panel in cells.panels:
        seen[panel] = True
    return np.flatnonzero(seen)


def export_pretrained(tokenizer: CellTokenizer):
    """Exporter for train(): config.json + model.safetensors + tokenizer files + model code + model card
    (README.md, from the run's config.yaml one level up) in one directory (fm.export.save_export)."""
    def export(model, state_dict, directory: Path) -> None:
        from fm.export import save_export

        save_export(model, tokenizer, directory, state_dict=state_dict)
    return export


def corpus_path(cfg: RunConfig) -> Path | None:
    """The corpus directory when data.paths names one (a directory holding manifest.json)."""
    paths = cfg.data.resolved_paths()
    corpora = [p for p in paths if is_corpus(p)]
    if corpora and len(paths) > 1:
        raise ValueError(f"data.paths mixes a corpus ({corpora[0]}) with other inputs; train from one corpus "
                         "(build one from all inputs with `fm corpus build`)")
    return corpora[0] if corpora else None


def open_corpus(path: Path, cfg: RunConfig, tokenizer: CellTokenizer) -> tuple[CorpusDataset, CellTokenizer]:
    """Stream a built corpus; the tokenizer's conditions come from its manifest (or map onto a checkpoint's)."""
    manifest = load_manifest(path)
    if manifest["vocab_sha256"] != tokenizer.vocab.sha256:
        raise ValueError(f"{path}: built with another gene vocabulary (sha256 {manifest['vocab_sha256'][:12]}…) "
                         f"than this model's ({tokenizer.vocab.sha256[:12]}…); rebuild the corpus")
    if not cfg.model.init_from:
        keys = cfg.data.conditions or manifest["condition_keys"]
        tokenizer.condition_keys = list(keys)
        tokenizer.condition_categories = {k: list(manifest["conditions"][k]) for k in keys
                                          if k in manifest["conditions"]}
    dataset = CorpusDataset(path, tokenizer.condition_keys, tokenizer.condition_categories,
                            val_fraction=cfg.data.val_fraction, split_seed=cfg.train.seed,
                            shuffle_buffer=cfg.data.shuffle_buffer)
    log.info("corpus %s: %d cells in %d shards, conditions %s", path, len(dataset), len(dataset.sizes),
             tokenizer.condition_keys)
    return dataset, tokenizer


def run_pretraining(cfg: RunConfig, resume: bool = False, cells: EncodedCells | None = None) -> TrainResult:
    """The whole `fm pretrain` job; `cells` lets Python callers pass pre-tokenised data."""
    out = Path(cfg.train.output_dir)
    accelerator = make_accelerator(cfg.train)
    tokenizer = build_tokenizer(cfg)
    corpus = corpus_path(cfg) if cells is None else None
    genes = None
    if corpus is not None:
        train_cells, tokenizer = open_corpus(corpus, cfg, tokenizer)
        val_cells = train_cells.heldout()
        genes = corpus_genes(corpus)
    else:
        if cells is None:
            if not cfg.data.paths:
                raise ValueError("data.paths is empty: name .h5ad files or directories in the recipe or as "
                                 "data.paths=[a.h5ad,b.h5ad]")
            cells = encode_files(cfg.data.resolved_paths(), tokenizer, fit_conditions=not cfg.model.init_from)
        train_cells, val_cells = split_cells(cells, cfg.data.val_fraction, cfg.train.seed)
        genes = encoded_genes(cells, len(tokenizer.vocab))
    model = build_model(cfg, tokenizer, genes)
    if cfg.model.gene_init == "coexpression" and not cfg.model.init_from:
        from fm.gene_init import init_gene_table_from_corpus

        init_gene_table_from_corpus(model, train_cells, seed=cfg.train.seed)
    if accelerator.is_main_process:
        check_output_dir(out, resume)  # before config.yaml: a refused run overwrites nothing
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / "config.yaml")
        n_params = sum(p.numel() for p in model.parameters())
        log.info("%d training cells, %d held out; model %.2fM parameters, gene table %d rows",
                 int(train_cells.train_counts.sum()) if corpus is not None else len(train_cells),
                 0 if val_cells is None else len(val_cells), n_params / 1e6, model.config.n_gene_rows)
    collator = CellCollator(**{**collator_settings(model.config), "max_genes": cfg.data.max_genes},
                            mask_ratio=cfg.data.mask_ratio, train=True, seed=cfg.train.seed,
                            decode_genes=model.config.wced_genes, views=cfg.data.views, view_keep=cfg.data.view_keep,
                            view_thinning=cfg.data.view_thinning)
    return train(model, train_cells, collator, cfg.train, eval_dataset=val_cells,
                 export=export_pretrained(tokenizer), resume=resume, accelerator=accelerator,
                 num_workers=cfg.data.num_workers, callbacks=quality_monitors(cfg, tokenizer),
                 length_grouping=cfg.data.length_grouping)


def quality_monitors(cfg: RunConfig, tokenizer: CellTokenizer) -> list:
    """[QualityMonitor] over data.probes (probes missing on this machine are skipped with a warning), or []."""
    from fm.quality import LABEL_SEPARATOR, QualityMonitor, load_probe

    probes = []
    for spec in cfg.data.resolved_probes():
        if not Path(spec.partition(LABEL_SEPARATOR)[0]).is_file():
            log.warning("data.probes: %s not found; representation quality is not measured on it", spec)
            continue
        probes.append(load_probe(spec, cfg.data.probe_max_cells, cfg.train.seed))
    return [QualityMonitor(probes, tokenizer, cfg.train.output_dir, cfg.train.seed)] if probes else []
