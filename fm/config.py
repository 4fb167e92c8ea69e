"""Run configuration: one dataclass per concern, YAML recipes as short diffs, dotted CLI overrides.

A recipe names only what differs from the defaults below. Unknown keys and wrong types are
errors (a typo must never silently train the default). The resolved config is written beside
the outputs so a run can be reproduced from its directory alone.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fm.paths import data_dir
from fm.value_encoding import MIN_N_BINS, VALUE_ENCODINGS


@dataclass
class ModelConfig:
    """Backbone size and objective switches (see ScFMConfig for what each means)."""

    d_model: int = 512
    """Hidden width."""
    n_layers: int = 12
    """Transformer blocks."""
    n_heads: int = 8
    """Attention heads; d_model must divide evenly."""
    d_ff: int = 2048
    """Feed-forward width (4 × d_model, as in GPT/BERT)."""
    dropout: float = 0.1
    """Dropout on embeddings, attention output and MLP."""
    n_bins: int = 51
    """Expression bins per cell (scGPT's default: 0 = not expressed, 1…50 = per-cell quantiles)."""
    pooling: str = "cls"
    """Cell embedding: the <cls> token ('cls') or the mean over gene tokens ('mean')."""
    mvc: bool = True
    """Add scGPT's MVC objective: predict masked values from the cell embedding."""
    generative_mask: bool = False
    """scGPT's attention mask: masked genes are seen only by themselves."""
    gene_init: str = "random"
    """Gene-table rows at the start of pretraining: 'random' (normal noise) or 'coexpression' (each gene's
    loadings on the top principal components of the training cells' log-normalised expression; fm/gene_init.py)."""
    wced_genes: int = 0
    """Whole-cell expression decoding (BMFM-RNA's WCED): per batch, this many genes of the batch's panels
    (expressed or not, in the input or not) are decoded from the cell embedding alone, as log1p(CP10k),
    so the embedding must carry the whole cell; 0 = off."""
    wced_weight: float = 1.0
    """Weight of the whole-cell decoding loss."""
    contrastive_weight: float = 0.0
    """InfoNCE between two gene-subset views of each cell (data.views, data.view_keep) on a projection of the
    cell embedding; 0 = off."""
    contrastive_temperature: float = 0.1
    """InfoNCE temperature."""
    gep_weight: float = 1.0
    """Weight of the per-token GEP loss (0 trains the cell-embedding objectives alone)."""
    architecture: str = "scfm"
    """'scfm' (Pre-LN, GELU, the settings above) or 'scgpt': scGPT's TransformerModel (Post-LN, ReLU, <cls> with
    the pad value, bin numbers through its value MLP, its decoders; fm.configuration_scfm.SCGPT_ARCHITECTURE,
    which overrides pooling and data.value_encoding) — a model `fm convert --to scgpt` can export to scGPT's files."""
    init_from: str | None = None
    """Start from this exported checkpoint directory instead of random weights."""
    gene_table: str = "corpus"
    """Gene-embedding rows: 'corpus' = the special tokens + the genes the training data measures (the only rows
    that train; debug recipe on 2 CPU cores: 2.6k rows, 0.17 s/step vs 0.29 s for 'full', whose dense AdamW
    update dominates), 'full' = one per vocabulary id (~157k). init_from keeps its own."""

    license: str | None = None
    """Licence of the exported weights, a Hugging Face licence id (e.g. 'cc-by-4.0', 'mit'): the model card's
    `license:` field. None: 'unknown' (set it before publishing; the training data's terms may constrain it)."""

    def __post_init__(self):
        if self.architecture not in ("scfm", "scgpt"):
            raise ValueError(f"model.architecture must be 'scfm' or 'scgpt', got {self.architecture!r}")
        if self.gene_table not in ("corpus", "full"):
            raise ValueError(f"model.gene_table must be 'corpus' or 'full', got {self.gene_table!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}")
        if self.gene_init not in ("random", "coexpression"):
            raise ValueError(f"model.gene_init must be 'random' or 'coexpression', got {self.gene_init!r}")
        if self.pooling not in ("cls", "mean"):
            raise ValueError(f"model.pooling must be 'cls' or 'mean', got {self.pooling!r}")
        if self.n_bins < MIN_N_BINS:
            raise ValueError(f"model.n_bins must be >= {MIN_N_BINS} (targets are scaled by n_bins - 1), "
                             f"got {self.n_bins}")


@dataclass
class DataConfig:
    """Which cells, how they become tokens, how they are masked."""

    paths: list[str] = field(default_factory=list)
    """h5ad files or directories of them, or one corpus directory (`fm corpus build`). '${FM_DATA_DIR}' expands to the real-data directory."""
    gene_key: str | None = None
    """var column holding gene symbols/Ensembl IDs; None uses var_names."""
    layer: str | None = None
    """AnnData layer holding raw counts; None uses X."""
    conditions: list[str] = field(default_factory=list)
    """obs columns that become condition tokens (e.g. batch, assay)."""
    max_genes: int = 1200
    """Gene tokens per cell; cells with more expressed genes are subsampled (scGPT: 1200)."""
    value_encoding: str = "bins"
    """Counts → values (fm.value_encoding): 'bins' (scGPT quantiles), 'rank' (Geneformer), 'continuous' (log1p); init_from keeps its own."""
    mask_ratio: float = 0.4
    """Fraction of a cell's gene tokens whose value is masked for pretraining."""
    zero_fraction: float = 0.25
    views: int = 1
    """Pretraining: each cell enters a batch this many times, each view with its own gene subset and masks
    (needed by model.contrastive_weight)."""
    view_keep: float = 1.0
    """Pretraining: share of a cell's expressed genes each view keeps (gene-subset sampling: the embedding
    must not depend on how many genes a cell shows)."""
    view_thinning: float = 0.0
    """Pretraining: every view after the first sees its cell's counts thinned to a random depth p ~ U(1 - this, 1)
    of the original (a count of 1 survives with probability p): with the contrastive loss, the embedding learns
    to ignore library size."""
    """Share of max_genes given to measured-but-unexpressed genes (bin 0; scGPT's include_zero_gene)."""
    min_matched_fraction: float = 0.2
    """Stop if fewer of a file's genes than this are in the vocabulary."""
    allow_non_counts: bool = False
    """Accept non-integer, non-negative values (e.g. normalised data) instead of raw counts."""
    val_fraction: float = 0.05
    """Cells held out for periodic evaluation (fixed by the seed)."""
    num_workers: int = 0
    """DataLoader worker processes (0 = in the training process)."""
    shuffle_buffer: int = 100_000
    """Corpus streaming: cells shuffled together per rank (costs one index each; data stays memory-mapped)."""
    length_grouping: bool = True
    """Training batches of cells of similar length (megabatches of 50 batches sorted by token count, batch order
    shuffled; a corpus sorts within its stream): far less padding, same cells per epoch (eval/perf/RESULTS.md)."""
    probes: list[str] = field(default_factory=list)
    """Labelled h5ad files ('file' or 'file::obs_label_column', '${FM_DATA_DIR}' expands) whose embedding
    quality is logged at the start, every train.eval_every and at the end, beside a random-init twin's
    (fm/quality.py). Never the test split of an fm eval suite."""
    probe_max_cells: int = 1000
    """Cells per probe file (a seeded subsample)."""

    def __post_init__(self):
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"data.mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if not 0.0 <= self.zero_fraction < 1.0:
            raise ValueError(f"data.zero_fraction must be in [0, 1), got {self.zero_fraction}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.max_genes < 1:
            raise ValueError(f"data.max_genes must be >= 1, got {self.max_genes}")
        if self.value_encoding not in VALUE_ENCODINGS:
            raise ValueError(f"data.value_encoding must be one of {sorted(VALUE_ENCODINGS)}, "
                             f"got {self.value_encoding!r}")
        if self.shuffle_buffer < 1:
            raise ValueError(f"data.shuffle_buffer must be >= 1, got {self.shuffle_buffer}")
        if self.views < 1:
            raise ValueError(f"data.views must be >= 1, got {self.views}")
        if not 0.0 <= self.view_thinning < 1.0:
            raise ValueError(f"data.view_thinning must be in [0, 1), got {self.view_thinning}")
        if not 0.0 < self.view_keep <= 1.0:
            raise ValueError(f"data.view_keep must be in (0, 1], got {self.view_keep}")
        if self.probe_max_cells < 10:
            raise ValueError(f"data.probe_max_cells must be >= 10, got {self.probe_max_cells}")

    def resolved_paths(self) -> list[Path]:
        """`paths` with '${FM_DATA_DIR}' expanded through fm.paths.data_dir()."""
        return [Path(p.replace("${FM_DATA_DIR}", str(data_dir()))).expanduser() for p in self.paths]

    def resolved_probes(self) -> list[str]:
        """`probes` with '${FM_DATA_DIR}' expanded."""
        return [p.replace("${FM_DATA_DIR}", str(data_dir())) for p in self.probes]


@dataclass
class TrainConfig:
    """The one training loop's knobs (used by pretraining and every fine-tune)."""

    output_dir: str = "runs/pretrain"
    """Where logs, checkpoints and the exported model go."""
    max_steps: int = 1000
    """Optimizer steps (each = grad_accum micro-batches); with `epochs` set, an upper bound on them."""
    epochs: float | None = None
    """Budget in passes over the training cells (fractions allowed): steps = ceil(epochs × optimizer steps
    per epoch), capped by max_steps — whichever budget is smaller ends the run. None = max_steps alone."""
    batch_size: int = 32
    """Cells per micro-batch per process. Global batch = batch_size × grad_accum × processes."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    lr: float = 1e-4
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.01
    """AdamW weight decay (not applied to biases, norms and embeddings)."""
    warmup_steps: int = 100
    """Linear warm-up before the cosine decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping; 0 disables."""
    mixed_precision: str = "no"
    """'no', 'bf16', 'fp16' or 'auto' (bf16 where the hardware computes it natively — CUDA with bf16, CPUs with
    AVX512-BF16/AMX — else fp32). 'bf16' on a CPU without native bf16 runs fp32 with one warning: emulated bf16
    is 3.5–5× slower there (fm/precision.py)."""
    fused_optimizer: bool = True
    """Fused AdamW kernel (CPU and CUDA; one pass over each tensor instead of a chain of ops). Off, and under
    DeepSpeed (its own optimizer wrapper): torch's default AdamW."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    seed: int = 0
    """Seeds weights, data order, gene sampling and masks."""
    log_every: int = 1
    """Write a row to train_log.csv every N steps."""
    eval_every: int = 0
    """Evaluate on the held-out cells every N steps; 0 = only at the end."""
    early_stopping_patience: int = 0
    """Stop after this many evaluations in a row without a lower `early_stopping_metric`, and export the
    best-on-validation weights instead of the last; 0 = off. Needs eval_every > 0 and held-out cells."""
    early_stopping_metric: str = "eval_loss"
    """The held-out value early stopping watches (lower is better): any key of eval_log.jsonl."""
    save_every: int = 500
    """accelerate.save_state every N steps for resume; 0 = only at the end."""
    save_total_limit: int = 2
    """Keep this many resumable checkpoints."""
    progress: bool = True
    """Show a tqdm progress bar."""

    def __post_init__(self):
        if self.mixed_precision not in ("no", "bf16", "fp16", "auto"):
            raise ValueError(f"train.mixed_precision must be no|bf16|fp16|auto, got {self.mixed_precision!r}")
        for name in ("max_steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.epochs is not None and not self.epochs > 0:
            raise ValueError(f"train.epochs must be > 0 (or null to train for max_steps), got {self.epochs}")
        if self.early_stopping_patience < 0:
            raise ValueError(f"train.early_stopping_patience must be >= 0 (0 = off), got {self.early_stopping_patience}")
        if not self.early_stopping_metric.startswith("eval_"):
            raise ValueError("train.early_stopping_metric must name a held-out value (eval_loss, eval_…), "
                             f"got {self.early_stopping_metric!r}")


@dataclass
class LoraSettings:
    """task.lora: LoRA adapters on the backbone (fm/lora.py, needs `pip install 'scfm[lora]'`). Setting r alone
    (`task.lora.r=8`) turns it on with PEFT's usual alpha/dropout; the backbone is then frozen but for the
    adapters, and the task head trains in full."""

    r: int | None = 0
    """Adapter rank; 0 or null = off (full fine-tuning)."""
    alpha: float = 16.0
    """LoRA scaling numerator (update scaled by alpha / r)."""
    dropout: float = 0.1
    """Dropout on the adapter's input."""
    target_modules: list[str] = field(default_factory=list)
    """Backbone module-name suffixes to adapt (e.g. [qkv, out]); always resolved inside the backbone, so a head
    layer of the same name is never wrapped. Empty = attention and MLP projections (fm.lora.DEFAULT_TARGETS)."""

    def __post_init__(self):
        if self.r is not None and self.r < 0:
            raise ValueError(f"task.lora.r must be >= 0 (0 = off), got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"task.lora.dropout must be in [0, 1), got {self.dropout}")


@dataclass
class TaskConfig:
    """Fine-tuning task (`fm finetune`): the fields every task shares. Each task extends it with its own
    fields (`<Task>Config` in fm/tasks/<task>.py, named by its fm.tasks.registry entry); the `task`
    section of a recipe is parsed into the class that `task.name` selects, so a field of another task
    is an unknown key."""

    name: str = "annotation"
    """Which task: a name in fm.tasks.registry.TASKS (annotation | imputation | batch_correction |
    modality_prediction | cci)."""
    freeze_gene_embedding: bool = False
    """Keep the pretrained gene-embedding table fixed. Off: a model pretrained with model.gene_table=corpus has
    rows only for its corpus genes, and training them costs nothing measurable (debug size, annotation on
    2 CPU cores: 0.16 s/step trained vs 0.18 frozen). Turn it on for a full 157k-row table (older
    checkpoints, model.gene_table=full): its dense AdamW update makes a step 0.26 s instead of 0.16."""
    freeze_backbone: bool = False
    """Train the head only (a probe of the pretrained representation)."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA instead of full fine-tuning (off unless task.lora.r > 0)."""
    lora_merge: bool = True
    """With LoRA: export the adapters merged into an ordinary model (true), or the adapter alone with a
    reference to model.init_from (false; fm.load rebuilds base + adapter)."""


def task_config_class(name: str) -> type[TaskConfig]:
    """The TaskConfig subclass of the registered task `name` (imports that task's module)."""
    from fm.tasks.registry import TASKS

    if name not in TASKS:
        raise ValueError(f"task.name must be one of {tuple(TASKS)}, got {name!r}")
    cls = TASKS[name].load("config")
    if not (isinstance(cls, type) and issubclass(cls, TaskConfig)):
        raise TypeError(f"task {name!r}: its config {cls!r} is not a TaskConfig subclass")
    return cls


@dataclass
class RunConfig:
    """A whole run: what to build, what to feed it, how to train it."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    task: TaskConfig | None = field(default=None, metadata={"section_class": lambda values: task_config_class(
        values.get("name", TaskConfig.name))})
    """Fine-tuning only (`fm finetune`); pretraining has none. Parsed into the class task.name selects."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


# ---------------------------------------------------------------------------- parsing

def _check_type(value: Any, hint: Any, where: str) -> Any:
    """Return `value` coerced to `hint` when that is lossless, else raise a clear TypeError."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, where)
            except TypeError as e:
                errors.append(str(e))
        raise TypeError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is list:
        if isinstance(value, str):  # "a,b" on the command line
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint) or (Any,)
        return [_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise TypeError(f"{where}: expected true/false, got {value!r}")
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads '1e-3' (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if hint in (int, float, str) and not (isinstance(value, hint) and not isinstance(value, bool)):
        raise TypeError(f"{where}: expected {hint.__name__}, got {value!r} ({type(value).__name__})")
    return value


def _build(cls, values: dict, where: str):
    if not isinstance(values, dict):
        raise TypeError(f"{where or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = set(fields)
    unknown = sorted(set(values) - names)
    if unknown:
        raise KeyError(f"unknown config key(s) {', '.join((where + '.' if where else '') + k for k in unknown)}; "
                       f"valid keys{' in ' + where if where else ''}: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        key = f"{where}.{name}" if where else name
        section_class = fields[name].metadata.get("section_class")  # a section whose class its values choose
        if section_class is not None:
            if value and not isinstance(value, dict):
                raise TypeError(f"{key}: expected a mapping, got {value!r}")
            kwargs[name] = _build(section_class(value), value, key) if value else None
        elif dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value or {}, key)
        else:
            kwargs[name] = _check_type(value, hint, key)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise KeyError(f"override {dotted!r}: {part!r} is not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """['train.max_steps=20', 'data.conditions=[batch]'] → nested dict (values parsed as YAML)."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw != "" else None)
    return tree


def _merge(base: dict, diff: dict) -> dict:
    out = dict(base)
    for k, v in diff.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(recipe: str | Path | None = None, overrides: list[str] | None = None, cls=RunConfig):
    """Defaults ← recipe YAML ← dotted overrides, validated into `cls`."""
    tree: dict = {}
    if recipe is not None:
        path = Path(recipe)
        if not path.is_file():
            raise FileNotFoundError(f"recipe not found: {path}")
        tree = yaml.safe_load(path.read_text()) or {}
        if not isinstance(tree, dict):
            raise TypeError(f"{path}: a recipe must be a mapping of sections, got {type(tree).__name__}")
    tree = _merge(tree, parse_overrides(overrides or []))
    return _build(cls, tree, "")
