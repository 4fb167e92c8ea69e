"""What every checkpoint importer shares: reading a foreign weights file without unpickling objects, mapping
the checkpoint's own gene names onto our vocabulary, and building / saving the scfm model they become.

An imported model is an ordinary scfm export: `config.json` (an ScFMConfig whose architecture fields describe
the foreign model), `model.safetensors`, the tokenizer files. Its gene-embedding rows stay in the checkpoint's
own token order (`ScFMConfig.gene_table` = our id of each row), so exporting back is a plain copy.
"""
from __future__ import annotations

import json
import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fm.vocab import GeneVocab

log = logging.getLogger("fm")

SPECIAL_IDS = {"<pad>": GeneVocab.pad_id, "<cls>": GeneVocab.cls_id, "<mask>": GeneVocab.mask_id,
               "<eoc>": GeneVocab.eoc_id, "<unk>": GeneVocab.unk_id,
               **{f"<unused{i}>": i for i in range(GeneVocab.unk_id + 1, GeneVocab.n_special)}}
"""Special tokens a checkpoint vocabulary may hold → our special ids (our own <unusedN> come back from an export
in a checkpoint format; any other <…> token gets an id of its own)."""

REPORT_FILE = "conversion_report.json"


class CheckpointFormatError(ValueError):
    """A foreign checkpoint that cannot be read as its format says (names the file and what is wrong)."""


def read_json(path: Path, what: str) -> dict:
    """A JSON file of a checkpoint directory, or an error naming it."""
    if not path.is_file():
        raise CheckpointFormatError(f"{path}: missing — {what}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointFormatError(f"{path}: not valid JSON ({err})") from err


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a PyTorch weights file, read with `weights_only=True`: a pickled object (a whole model, a
    custom class) is refused by the restricted unpickler and never executed. A `{"model_state_dict": …}` or
    `{"state_dict": …}` wrapper and DDP's `module.` prefixes are unwrapped."""
    if not path.is_file():
        raise CheckpointFormatError(f"{path}: missing — the checkpoint's weights (a state dict of tensors)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointFormatError(
            f"{path}: not a plain state dict of tensors — refused without executing it ({first}). Save the weights "
            "with torch.save(model.state_dict(), path) and convert that file.") from err
    for wrapper in ("model_state_dict", "state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        kind = type(obj).__name__ if not isinstance(obj, dict) else "a dict with non-tensor values"
        raise CheckpointFormatError(f"{path}: expected a state dict of tensors, found {kind}")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


@dataclass
class GeneMapping:
    """The checkpoint's token table in our ids: `ids[r]` is the scfm id of the checkpoint's token r (its
    embedding row). Genes our vocabulary does not know get ids from len(vocab) on (`n_extra` of them)."""

    ids: np.ndarray  # int64, one per checkpoint token, distinct
    model_genes: dict[str, int]  # checkpoint gene name → id, for the tokenizer (specials excluded)
    n_extra: int
    unmapped: list[str] = field(default_factory=list)  # names without a vocabulary entry (kept by name)
    shared: list[str] = field(default_factory=list)  # names whose vocabulary gene another name already took

    @property
    def vocab_size(self) -> int:
        return len(GeneVocab.default()) + self.n_extra

    def summary(self, total: int) -> str:
        text = (f"{total - len(self.unmapped) - len(self.shared)}/{total} checkpoint genes map onto the scfm "
                f"vocabulary (symbols and Ensembl IDs of user data find them)")
        if self.unmapped:
            text += (f"; {len(self.unmapped)} are not in it (retired or non-GENCODE names, e.g. {self.unmapped[:5]}): "
                     "they keep their rows and are matched by exactly that name only")
        if self.shared:
            text += f"; {len(self.shared)} name a gene another token already maps to (e.g. {self.shared[:3]}): matched by name only"
        return text


def map_gene_names(tokens: list[str], species: str | None = None) -> GeneMapping:
    """Our id for each checkpoint token (in the checkpoint's order): specials → our specials, genes (symbols or
    Ensembl IDs) → vocabulary ids, the rest → new ids after the vocabulary, so every row stays reachable."""
    vocab = GeneVocab.default()
    names = np.asarray(tokens, dtype=object)
    special = np.array([t in SPECIAL_IDS for t in tokens])
    ids = np.full(len(tokens), -1, dtype=np.int64)
    ids[special] = [SPECIAL_IDS[t] for t in names[special]]
    genes = np.flatnonzero(~special)
    looked = vocab.lookup(names[genes], species=species) if genes.size else np.zeros(0, np.int64)
    taken: set[int] = set(ids[special].tolist())
    unmapped, shared = [], []
    next_id = len(vocab)
    for pos, vid in zip(genes, looked):
        if vid >= 0 and vid not in taken:
            ids[pos] = vid
            taken.add(int(vid))
            continue
        (shared if vid >= 0 else unmapped).append(str(names[pos]))
        ids[pos], next_id = next_id, next_id + 1
    model_genes = {str(names[p]): int(ids[p]) for p in genes}
    return GeneMapping(ids, model_genes, next_id - len(vocab), unmapped, shared)


def token_names(mapping_ids: list[int], model_genes: dict[str, int] | None) -> list[str]:
    """Name of each row for an export in a checkpoint format: the checkpoint's own name where the model came from
    one, else the vocabulary's symbol (its Ensembl ID when it has none); specials by their token."""
    vocab = GeneVocab.default()
    by_id = {v: k for k, v in (model_genes or {}).items()}
    special = {v: k for k, v in SPECIAL_IDS.items()}
    out = []
    for i in mapping_ids:
        if i in by_id:
            out.append(by_id[i])
        elif i in special:
            out.append(special[i])
        elif i < len(vocab):
            out.append(vocab.symbols[i] or vocab.tokens[i])
        else:
            raise ValueError(f"row id {i} is outside the vocabulary and has no checkpoint name")
    return out


def check_keys(state_dict: dict, expected: set[str], source: Path, optional: set[str] = frozenset()) -> None:
    """Missing or unexpected checkpoint keys, named (an architecture variant we do not represent)."""
    missing = sorted(expected - set(state_dict) - set(optional))
    unexpected = sorted(set(state_dict) - expected - set(optional))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:8]}{' …' if len(missing) > 8 else ''} ({len(missing)})")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:8]}{' …' if len(unexpected) > 8 else ''} ({len(unexpected)})")
        raise CheckpointFormatError(f"{source}: {'; '.join(parts)} — this checkpoint's architecture differs from "
                                    "the one its config describes, or it is a variant scfm does not import")


def write_report(out: Path, report: dict) -> None:
    (Path(out) / REPORT_FILE).write_text(json.dumps(report, indent=2))


__all__ = ["CheckpointFormatError", "GeneMapping", "REPORT_FILE", "SPECIAL_IDS", "check_keys", "map_gene_names",
           "read_json", "read_state_dict", "token_names", "write_report"]
