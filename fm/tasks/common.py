"""What every fine-tuning task shares: its input cells (files or in-memory AnnData), per-cell
targets aligned with them, the held-out split, the head initialised from a pretrained backbone,
freezing, and one call into the training loop with export.

A task module (fm/tasks/<task>.py) composes these in its `run(cfg, resume, adatas)`:

    accelerator, tokenizer, data = load_task_cells(cfg, adatas, load)  # load(sources, tokenizer): e.g.
                                                        # encode_with_targets (targets read first: fail fast)
    train_cells, val_cells = split_cells(data, cfg.data.val_fraction, cfg.train.seed)
    model = load_head(HeadClass, cfg, **config_fields)  # backbone loaded, head new, freezing applied
    return train_task(model, tokenizer, train_cells, val_cells, collator, cfg, resume)
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from fm import lora
from fm.config import RunConfig
from fm.tokenizer import CellTokenizer, EncodedCells, split_cells, subset_cells
from fm.train import TrainResult, check_output_dir, make_accelerator, train

log = logging.getLogger("fm")


@dataclass
class TaskCells:
    """EncodedCells rows plus per-cell target arrays (first axis = cells) merged into each row."""

    cells: EncodedCells
    targets: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.cells)

    def __getitem__(self, i: int) -> dict:
        row = self.cells[i]
        for key, values in self.targets.items():
            row[key] = values[i]
        return row

    def subset(self, rows: np.ndarray) -> "TaskCells":
        return TaskCells(subset_cells(self.cells, rows), {k: v[rows] for k, v in self.targets.items()})


def require_init(cfg: RunConfig) -> None:
    """Fine-tuning starts from a pretrained checkpoint; say so before any work."""
    if not cfg.model.init_from:
        raise ValueError("fine-tuning needs a pretrained model: pass model.init_from=<exported model directory>")
    if not (Path(cfg.model.init_from) / "config.json").is_file():
        from fm.convert import detect_format

        fmt = detect_format(cfg.model.init_from)
        if fmt is not None:
            raise ValueError(f"model.init_from={cfg.model.init_from} is a {fmt} checkpoint: convert it once with "
                             f"`fm convert {fmt} {cfg.model.init_from} OUT` and fine-tune from OUT")
        raise FileNotFoundError(f"model.init_from={cfg.model.init_from}: no config.json — pass an exported model "
                                "directory (runs/<name>/model)")


def task_sources(cfg: RunConfig, adatas=None) -> list[tuple[object, str]]:
    """(AnnData, source name) pairs: the in-memory `adatas` (Python API) or the files of data.paths.

    Files are opened backed (X stays on disk and is read in row chunks by the tokenizer).
    """
    from fm.data import find_h5ad_files, open_anndata

    if adatas is not None:
        adatas = [adatas] if not isinstance(adatas, (list, tuple)) else list(adatas)
        if not adatas:
            raise ValueError("no AnnData given to fine-tune on")
        return [(a, f"adata[{i}]") for i, a in enumerate(adatas)]
    if not cfg.data.paths:
        raise ValueError("data.paths is empty: name the .h5ad files to fine-tune on")
    return [(open_anndata(f), str(f)) for f in find_h5ad_files(cfg.data.resolved_paths())]


def load_task_cells(cfg: RunConfig, adatas, load: Callable):
    """The opening every task's run() shares: check the pretrained start, make the accelerator, read the
    checkpoint's tokenizer, and call `load(sources, tokenizer)` over the task's sources (closed after).
    Returns (accelerator, tokenizer, whatever `load` returned)."""
    require_init(cfg)
    accelerator = make_accelerator(cfg.train)
    tokenizer = CellTokenizer.from_pretrained(cfg.model.init_from)
    sources = task_sources(cfg, adatas)
    try:
        return accelerator, tokenizer, load(sources, tokenizer)
    finally:
        close_sources(sources)


def close_sources(sources) -> None:
    for adata, _ in sources:
        if getattr(adata, "isbacked", False):
            adata.file.close()


def encode_with_targets(sources, tokenizer: CellTokenizer,
                        read_targets: Callable[[object, str], dict[str, np.ndarray]] | None = None
                        ) -> tuple[EncodedCells, list[dict[str, np.ndarray]]]:
    """Tokenise every source; `read_targets(adata, source)` runs before the (slow) encoding so bad
    targets fail fast. Returns the concatenated cells and one target dict per source (rows aligned
    with that source's cells; empty cells are an error, so no row is dropped)."""
    parts, targets = [], []
    for adata, source in sources:
        targets.append(read_targets(adata, source) if read_targets else {})
        for key, value in targets[-1].items():
            if len(value) != adata.n_obs:
                raise ValueError(f"{source}: target {key!r} has {len(value)} rows for {adata.n_obs} cells")
        parts.append(tokenizer.encode(adata, source=source))
    return EncodedCells.concat(parts), targets


def concat_targets(per_source: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stack per-source target dicts (same keys in every source) along the cell axis."""
    keys = per_source[0].keys() if per_source else ()
    return {k: np.concatenate([t[k] for t in per_source]) for k in keys}


def load_head(cls, cfg: RunConfig, new_backbone_keys: tuple[str, ...] = (), **config_fields):
    """`cls` (an ScFMFor<Task>) with the backbone of model.init_from and a freshly initialised head.

    `config_fields` go into the model config (and so into the exported config.json: a fine-tuned
    directory is self-describing). Fails when backbone weights are missing (not an scfm checkpoint),
    except those starting with one of `new_backbone_keys` (e.g. a condition table the task adds);
    applies task.freeze_gene_embedding / task.freeze_backbone, or with task.lora returns a PeftModel
    (fm/lora.py: the backbone frozen but for its adapters and `new_backbone_keys`).
    """
    import torch
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    require_init(cfg)
    if lora.enabled(cfg.task.lora):
        if cfg.task.freeze_backbone:
            raise ValueError("task.freeze_backbone trains the head only and task.lora trains adapters + head: "
                             "set one of them")
        lora.require_peft()  # before the (slow) load
    torch.manual_seed(cfg.train.seed)  # same seed, same head init
    config = AutoConfig.from_pretrained(cfg.model.init_from)
    config.update({"max_genes": cfg.data.max_genes, **config_fields})  # new keys too (from_pretrained kwargs may not)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report lists the new head as "MISSING"; we check and log below
    try:
        model, info = cls.from_pretrained(cfg.model.init_from, config=config, output_loading_info=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    backbone_missing = [k for k in info["missing_keys"] if k.startswith(model.base_model_prefix + ".")
                        and not k.startswith(tuple(new_backbone_keys))]
    if backbone_missing:
        raise ValueError(f"{cfg.model.init_from}: not an scfm checkpoint with a full backbone; missing "
                         f"{backbone_missing[:5]}")
    log.info("initialised %s from %s; new head tensors: %d", cls.__name__, cfg.model.init_from, len(info["missing_keys"]))
    if lora.enabled(cfg.task.lora):  # adapters + head (+ the new backbone tables) train, the rest is frozen
        return lora.apply_lora(model, cfg.task.lora, extra_trainable=tuple(new_backbone_keys))
    freeze(model, cfg)
    return model


def freeze(model, cfg: RunConfig) -> None:
    """Apply task.freeze_backbone / task.freeze_gene_embedding (requires_grad off; AdamW skips them)."""
    backbone = getattr(model, model.base_model_prefix)
    if cfg.task.freeze_backbone:
        backbone.requires_grad_(False)
    elif cfg.task.freeze_gene_embedding:
        backbone.embeddings.gene.requires_grad_(False)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    log.info("trainable parameters: %d of %d", n_train, n_all)


def train_task(model, tokenizer: CellTokenizer, train_cells, val_cells, collator, cfg: RunConfig,
               resume: bool = False, accelerator=None) -> TrainResult:
    """Write config.yaml, run the one training loop, export model + tokenizer to output_dir/model (a LoRA
    PeftModel merged first, or saved as an adapter: task.lora_merge)."""
    from fm.pretrain import export_pretrained

    accelerator = accelerator or make_accelerator(cfg.train)
    if accelerator.is_main_process:
        out = Path(cfg.train.output_dir)
        check_output_dir(out, resume)  # before config.yaml: a refused run overwrites nothing
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / "config.yaml")
        log.info("%s: %d training cells, %d held out", cfg.task.name, len(train_cells),
                 0 if val_cells is None else len(val_cells))
    export = export_pretrained(tokenizer)
    if lora.enabled(cfg.task.lora):  # merged into an ordinary model, or the adapter on model.init_from
        ds = accelerator.state.deepspeed_plugin
        if ds is not None and ds.zero_stage == 3:  # the export copies the whole PeftModel on the main process
            raise ValueError("task.lora under DeepSpeed ZeRO-3 is not supported (its export needs the whole "
                             "model on one process); use ZeRO-2 or DDP — the frozen backbone needs no sharding")
        export = lora.lora_export(export, tokenizer, cfg.model.init_from, merge=cfg.task.lora_merge)
    return train(model, train_cells, collator, cfg.train, eval_dataset=val_cells, export=export,
                 resume=resume, accelerator=accelerator, num_workers=cfg.data.num_workers,
                 length_grouping=cfg.data.length_grouping)


def collator_kwargs(model, cfg: RunConfig) -> dict:
    """The CellCollator settings a fine-tuned model is trained and used with (from its own config)."""
    from fm.data.collator import collator_settings

    return {**collator_settings(model.config), "max_genes": cfg.data.max_genes, "seed": cfg.train.seed}


__all__ = ["TaskCells", "close_sources", "load_task_cells", "collator_kwargs", "concat_targets", "encode_with_targets",
           "freeze", "load_head", "require_init", "split_cells", "task_sources", "train_task"]
