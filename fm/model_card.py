"""The model card (README.md, Hugging Face model-card format) of an exported directory.

Written from what the directory and its run hold, so a published export says what it is without the run:
the architecture (config.json), the training data (the corpus manifest or the recipe's data.paths), the gene
panel, the recipe itself (the run's config.yaml), `fm eval` results found beside it, and how to load it.
Call `write_model_card(dir)` again after `fm eval` to pick up its results.csv.
"""
from __future__ import annotations

import json
from pathlib import Path

import yaml

CARD_FILE = "README.md"
TASK_NAMES = {"ScFMModel": "embedding", "ScFMForMaskedExpression": "pretraining", "ScFMBertModel": "embedding",
              "ScFMBertForMaskedLM": "pretraining"}
PIPELINE_TAGS = {"embedding": "feature-extraction", "pretraining": "feature-extraction",
                 "annotation": "tabular-classification", "imputation": "tabular-regression",
                 "modality_prediction": "tabular-regression"}
"""Hub pipeline tags where one fits: cells are rows of a count table; backbones give cell embeddings."""
RESULT_PLACES = ("eval/results.csv", "results.csv")
MAX_RESULT_ROWS = 60


def task_name(architecture: str) -> str:
    """'pretraining', 'embedding' or the fine-tuning task of a head (the task registry's name)."""
    if architecture in TASK_NAMES:
        return TASK_NAMES[architecture]
    from fm.tasks import registry

    task = registry.task_for_head(architecture)
    return task.name if task is not None else "other"


def _recipe(run_dir: Path | None) -> dict | None:
    path = run_dir / "config.yaml" if run_dir is not None else None
    return yaml.safe_load(path.read_text()) if path is not None and path.is_file() else None


def _front_matter(task: str, licence: str) -> str:
    meta = {"library_name": "scfm", "license": licence, "tags": ["single-cell", "transcriptomics", "scfm", task]}
    if task in PIPELINE_TAGS:
        meta["pipeline_tag"] = PIPELINE_TAGS[task]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def _architecture(model) -> list[str]:
    c = model.config
    rows = [("class", f"`{type(model).__name__}` (backbone `{c.backbone}`)"), ("d_model", c.d_model),
            ("layers", c.n_layers), ("attention heads", c.n_heads), ("MLP width", c.d_ff),
            ("value encoding", f"{c.value_encoding} (n_bins {c.n_bins})"), ("pooling", c.pooling),
            ("genes per cell (max)", c.max_genes), ("condition tokens", ", ".join(c.condition_keys) or "none"),
            ("parameters", f"{parameter_count(model):,}")]
    return ["| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows]]


def parameter_count(model) -> int:
    """Distinct parameters (tied weights once), as `model.parameters()` yields them."""
    return sum(p.numel() for p in model.parameters())


def _corpus(path: Path) -> list[str]:
    manifest = json.loads((path / "manifest.json").read_text())
    species = sorted({s.get("species") for s in manifest.get("sources", []) if s.get("species")})
    lines = [f"Corpus `{path.name}`: {manifest.get('n_cells', 0):,} cells in {manifest.get('n_shards', 0)} shards "
             f"from {len(manifest.get('sources', []))} datasets; species: {', '.join(species) or 'not recorded'}.", ""]
    lines += ["| dataset | cells | species |", "|---|---|---|"]
    lines += [f"| {Path(s['path']).name} | {s.get('n_cells', 0):,} | {s.get('species', '')} |"
              for s in manifest.get("sources", [])[:MAX_RESULT_ROWS]]
    return lines


def _training_data(model, recipe: dict | None, source: str | None) -> list[str]:
    lines = []
    if source:
        lines.append(source + ".")
    paths = ((recipe or {}).get("data") or {}).get("paths") or []
    for p in paths:
        path = Path(p)
        if (path / "manifest.json").is_file():
            lines += _corpus(path)
        else:
            lines.append(f"- `{p}`")
    if not lines:
        lines.append("Not recorded (no run config.yaml beside this export).")
    from fm.vocab import GeneVocab

    c, special = model.config, GeneVocab.n_special
    genes = (f"the {sum(i >= special for i in c.gene_table):,} genes the model saw (gene_table: {len(c.gene_table):,} "
             "rows, special tokens included)" if c.gene_table is not None else f"all {c.vocab_size:,} vocabulary ids")
    lines += ["", f"Gene panel: a vocabulary of {c.vocab_size:,} tokens (GENCODE human + mouse genes after "
                  f"{special} special tokens); embedding rows for {genes}."]
    return lines


def _results(directory: Path, run_dir: Path | None) -> list[str]:
    """`fm eval` rows (mean over seeds) from a results.csv in or beside the export, else 'not evaluated'."""
    import pandas as pd

    places = [directory / p for p in RESULT_PLACES] + ([run_dir / p for p in RESULT_PLACES] if run_dir else [])
    found = next((p for p in places if p.is_file()), None)
    if found is None:
        return ["Not evaluated (run `fm eval --model <this directory>`, then `fm.model_card.write_model_card(dir)` "
                "to add the results here)."]
    df = pd.read_csv(found)
    keys = [k for k in ("task", "dataset", "method", "metric") if k in df.columns]
    table = df.groupby(keys, sort=False)["value"].agg(["mean", "count"]).reset_index() if keys else df
    lines = [f"From `{found.name}` (`fm eval`; mean over seeds, n = seeds):", "",
             "| " + " | ".join([*keys, "value", "n"]) + " |", "|" + "---|" * (len(keys) + 2)]
    for _, row in table.head(MAX_RESULT_ROWS).iterrows():
        lines.append("| " + " | ".join([*(str(row[k]) for k in keys), f"{row['mean']:.4g}", str(row["count"])]) + " |")
    if len(table) > MAX_RESULT_ROWS:
        lines.append(f"\n… {len(table) - MAX_RESULT_ROWS} more rows in {found}.")
    return lines


def _how_to_load(task: str, auto_map: dict) -> list[str]:
    head = [k for k in auto_map if k not in ("AutoConfig", "AutoModel")]
    auto = head[0] if head else "AutoModel"
    return ["With scfm installed (cells are tokenized from AnnData counts by scfm's `CellTokenizer`, not by a text "
            "tokenizer; `AutoTokenizer.from_pretrained(<this directory>)` returns that CellTokenizer):", "",
            "```python", "import fm", "",
            'model = fm.load("<this directory>")  # model.cell_tokenizer turns an AnnData of counts into tokens',
            'adata.obsm["X_fm"] = fm.embed(adata, model)', "```", "",
            "With transformers alone (the model code is in this directory; needs torch, transformers, numpy):", "",
            "```python", f"from transformers import {auto}", "",
            f'model = {auto}.from_pretrained("<this directory>", trust_remote_code=True)', "```"]


def render_card(directory: Path, model, source: str | None = None, run_dir: Path | None = None) -> str:
    """The card's text (see write_model_card)."""
    arch = type(model).__name__
    task = task_name(arch)
    recipe = _recipe(run_dir)
    licence = ((recipe or {}).get("model") or {}).get("license") or "unknown"
    auto_map = getattr(model.config, "auto_map", None) or {}
    lines = [_front_matter(task, licence), f"# scfm {task} model: `{arch}`", "",
             "A transformer over gene tokens (scGPT-style single-cell foundation model, package "
             "scfm): each cell is its expressed genes, each with its expression value (value encoding "
             f"`{model.config.value_encoding}`); the cell embedding is the " +
             ("<cls> hidden state." if model.config.pooling == "cls" else "mean of the gene hidden states."), ""]
    if source:
        lines += [f"**Origin:** {source}.", ""]
    init_from = ((recipe or {}).get("model") or {}).get("init_from")
    if init_from:
        lines += [f"Fine-tuned from `{init_from}`.", ""]
    lines += ["## Model description", "", *_architecture(model), "",
              "## Training data", "", *_training_data(model, recipe, source), "",
              "## Training recipe", ""]
    if recipe is not None:
        lines += ["The run's resolved config (`config.yaml`):", "", "```yaml",
                  yaml.safe_dump(recipe, sort_keys=False).rstrip(), "```"]
    else:
        lines.append("Not recorded (no run config.yaml beside this export).")
    lines += ["", "## Evaluation", "", *_results(directory, run_dir), "",
              "## Intended use and limitations", "",
              "- Input: raw UMI counts of human or mouse cells (genes matched by symbol or Ensembl ID to the "
              "vocabulary); other species and non-count inputs (normalised, log values) are out of scope.",
              "- Research use: cell embeddings, the task the head was fine-tuned for, transfer to similar data. "
              "Not validated for clinical or diagnostic use.",
              "- Quality depends on the training cells: tissues, assays and conditions absent from them may embed poorly.",
              "", "## How to load", "", *_how_to_load(task, auto_map), "",
              "## Citation", "", "```bibtex", "@misc{scfm,", "  title  = {scfm: single-cell foundation models},",
              "  note   = {TODO: citation of this model / its paper}", "}", "```", ""]
    return "\n".join(lines)


def write_model_card(directory: str | Path, model=None, source: str | None = None,
                     run_dir: str | Path | None = None) -> Path:
    """Write `directory`/README.md. `model` defaults to fm.load(directory); `run_dir` (config.yaml, eval results)
    defaults to the directory's parent when that holds a config.yaml (runs/<name>/model → runs/<name>)."""
    directory = Path(directory)
    if model is None:
        from fm.api import load

        model = load(directory)
    if run_dir is None and (directory.parent / "config.yaml").is_file():
        run_dir = directory.parent
    path = directory / CARD_FILE
    path.write_text(render_card(directory, model, source, Path(run_dir) if run_dir is not None else None))
    return path


__all__ = ["CARD_FILE", "parameter_count", "render_card", "task_name", "write_model_card"]
