"""Random-init controls for FM rows: the same architecture with untrained weights, run through the
very same FM method, so a table can show what pretraining adds over the architecture alone.

A number for `fm_knn[base]` means little on its own: a random transformer over gene tokens already
gives embeddings a kNN can use, and a fine-tuned head may learn the task from scratch within the
budget. So every FM row gets a twin row, the same method on a *random-init twin* of the checkpoint:
a directory with the checkpoint's config.json and tokenizer files and freshly initialised weights
(`save_pretrained`). Any FM method runs on it unchanged, because it is an ordinary exported model
directory — no task module knows about controls.

Row names (one scheme for every task):
  `<method>[<model>]`              the checkpoint (pretrained weights)
  `<method>[<model>:random_init]`  a zero-shot method on the twin (random weights, no training)
  `<method>[<model>:scratch]`      a fine-tuning method started from the twin: same head, recipe and
                                   budget, trained from random weights
A method counts as fine-tuning when it calls `EvalContext.fm_finetune` (counted by the context), so
the name follows what the method did, not a list that could drift from the code.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

RANDOM_INIT = "random_init"
SCRATCH = "scratch"
KINDS = (RANDOM_INIT, SCRATCH)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".safetensors.index.json", ".bin.index.json")
"""Files of a checkpoint that are *not* copied into its twin (everything else is: tokenizer, vocab)."""
MARKER = "random_init.json"

_ROW = re.compile(r"^(?P<method>[^\[\]]+)\[(?P<model>.+?)(?::(?P<control>" + "|".join(KINDS) + r"))?\]$")


def row_name(method: str, label: str, control: str | None = None) -> str:
    """The result-row name of `method` run on checkpoint `label` (control: None, RANDOM_INIT or SCRATCH)."""
    if control is not None and control not in KINDS:
        raise ValueError(f"unknown control kind {control!r}; known: {KINDS}")
    return f"{method}[{label}]" if control is None else f"{method}[{label}:{control}]"


def parse_row(name: str) -> tuple[str, str | None, str | None]:
    """(method, model label, control kind) of a row name; a baseline row gives (name, None, None)."""
    m = _ROW.match(name)
    return (name, None, None) if m is None else (m["method"], m["model"], m["control"])


def twin_names(name: str) -> list[str]:
    """The names the twin of pretrained row `name` may have (empty for baselines and twins)."""
    method, label, control = parse_row(name)
    if label is None or control is not None:
        return []
    return [row_name(method, label, kind) for kind in KINDS]


def random_init_twin(model_dir: str | Path, out_dir: str | Path, seed: int) -> Path:
    """Write a random-init twin of the exported checkpoint `model_dir` into `out_dir` and return it.

    Same class (config.architectures[0], resolved as fm.load does), same config, the checkpoint's
    tokenizer files; weights from the model's own initialiser seeded with `seed` (the global torch
    RNG is left as it was). `out_dir` is replaced. A `random_init.json` marker names the source and
    seed, so the directory cannot be mistaken for a trained model later.
    """
    from transformers import AutoConfig

    from fm.api import architecture_class
    from fm.export import save_export
    from fm.quality import untrained_twin

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    config = AutoConfig.from_pretrained(model_dir)
    arch = (config.architectures or ["ScFMModel"])[0]
    cls = architecture_class(arch)
    if cls is None:
        raise ValueError(f"{model_dir}: unknown architecture {arch!r}; cannot build its random-init twin")
    model = untrained_twin(cls, config, seed)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    for f in model_dir.iterdir():  # tokenizer files and the like; config, weights, code and card are rewritten
        model_code = f.suffix == ".py" and f.name != "tokenization_scfm.py"  # the AutoTokenizer entry travels too
        if f.is_file() and f.name not in ("config.json", "README.md") and not f.name.endswith(WEIGHT_SUFFIXES) \
                and not model_code:
            shutil.copy2(f, out_dir / f.name)
    save_export(model, None, out_dir, source=f"random-init control (untrained weights, seed {int(seed)}) of "
                                             f"{model_dir.resolve()}: not a trained model")
    (out_dir / MARKER).write_text(json.dumps({"source": str(model_dir.resolve()), "architecture": arch,
                                              "seed": int(seed), "weights": "random (model initialiser)"}, indent=2))
    return out_dir
