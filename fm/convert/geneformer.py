"""Import Geneformer checkpoints (V1 and V2) as scfm models: numerically exact, used through scfm's normal API.

A Geneformer checkpoint is a Hugging Face `BertForMaskedLM` directory (config.json + model.safetensors or
pytorch_model.bin) plus two dictionaries Geneformer ships beside its code: the token dictionary (Ensembl ID →
token id; `<pad>` 0, `<mask>` 1; V2 adds `<cls>`, `<eos>`) and the gene median dictionary (Ensembl ID → the
non-zero median that the rank-value encoding divides by), as JSON or as Geneformer's pickles. The pickles are
read by a restricted unpickler that builds plain dicts of str/int/float (and numpy scalars) and refuses any other
object without executing it.

The result is an ScFMConfig with backbone "bert" (fm/modeling_bert.py): the BERT weights unchanged, the word
embedding rows in the checkpoint's token order (`gene_table` = our id of each row, via `map_gene_names`), the
per-row medians (`gene_medians`, which make the collator produce Geneformer's rank-value order), V2's <cls>/<eos>
(`add_cls_eos`, <eos> → our <eoc>) and Geneformer's EmbExtractor defaults: emb_layer -1 (the penultimate
layer), mean over genes for V1, the <cls> token for V2.
"""
from __future__ import annotations

import io
import logging
import pickle
from pathlib import Path

import numpy as np
import torch

from fm.configuration_scfm import ScFMConfig
from fm.convert.common import (CheckpointFormatError, check_keys, map_gene_names, read_json, read_state_dict,
                               write_report)
from fm.export import save_export
from fm.tokenizer import CellTokenizer

log = logging.getLogger("fm")

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
TOKEN_DICTIONARY = "token_dictionary"  # file stems: token_dictionary*.json / *.pkl (e.g. token_dictionary_gc104M.pkl)
MEDIAN_DICTIONARY = "gene_median_dictionary"
DROPPED_PREFIXES = ("bert.pooler.", "classifier.")  # a pooler / classifier of a fine-tuned checkpoint: not imported
BERT_CONFIG_DROP = ("architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "_name_or_path")


# ------------------------------------------------------------------ dictionaries


class _PlainDataUnpickler(pickle.Unpickler):
    """Unpickles containers of plain data only: dict/list/str/int/float need no global; numpy scalars (a median
    stored as np.float64) need numpy's scalar reconstructor and dtype, which are the only globals allowed."""

    ALLOWED = {("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str):
        if (module, name) == ("numpy", "dtype"):
            return _numeric_dtype
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused global {module}.{name}")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refused persistent id")


def _numeric_dtype(*args):
    """numpy.dtype for the unpickler, numeric kinds only (an object dtype would let a scalar carry any object)."""
    dtype = np.dtype(*args)
    if dtype.kind not in "biuf":
        raise pickle.UnpicklingError(f"refused numpy dtype {dtype}")
    return dtype


def _plain(value, path: Path):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return value
    raise CheckpointFormatError(f"{path}: expected str/int/float values, found {type(value).__name__}")


def read_dictionary(path: Path) -> dict:
    """A Geneformer dictionary (JSON or pickle) as {str: int | float}; a pickle holding anything but plain data
    is refused without executing it."""
    path = Path(path)
    if path.suffix == ".json":
        data = read_json(path, "a Geneformer dictionary")
    else:
        try:
            data = _PlainDataUnpickler(io.BytesIO(path.read_bytes())).load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as err:
            raise CheckpointFormatError(
                f"{path}: not a plain pickled dictionary — refused without executing it ({err}). Geneformer's "
                "dictionaries hold only gene IDs and numbers; convert this one to JSON ({gene: value}) if it is "
                "trusted.") from err
    if not isinstance(data, dict) or not data:
        raise CheckpointFormatError(f"{path}: expected a non-empty dictionary, found {type(data).__name__}")
    out = {}
    for key, value in data.items():
        if not isinstance(key, str):
            raise CheckpointFormatError(f"{path}: expected string keys (gene IDs / tokens), found {key!r}")
        out[key] = _plain(value, path)
    return out


def _candidates(directory: Path, stem: str) -> list[Path]:
    return sorted(p for p in directory.glob(f"{stem}*") if p.suffix in (".json", ".pkl", ".pickle") and p.is_file())


def find_dictionaries(dirs: list[Path], n_tokens: int) -> tuple[Path, Path]:
    """The token and median dictionaries: in the first directory that has a token dictionary; among several
    (Geneformer ships gc30M and gc104M side by side) the one with `n_tokens` entries, and its median twin."""
    for directory in dirs:
        tokens = _candidates(directory, TOKEN_DICTIONARY)
        if not tokens:
            continue
        if len(tokens) > 1:
            sized = [p for p in tokens if len(read_dictionary(p)) == n_tokens]
            tokens = sized or tokens
        token_path = tokens[0]
        suffix = token_path.stem[len(TOKEN_DICTIONARY):]
        medians = _candidates(directory, MEDIAN_DICTIONARY)
        twin = [p for p in medians if p.stem == MEDIAN_DICTIONARY + suffix]
        if twin or len(medians) == 1:
            return token_path, (twin or medians)[0]
        raise CheckpointFormatError(
            f"{directory}: token dictionary {token_path.name} but "
            + (f"several median dictionaries {[p.name for p in medians]} and none named {MEDIAN_DICTIONARY}{suffix}"
               if medians else f"no {MEDIAN_DICTIONARY}*.json/.pkl beside it"))
    raise CheckpointFormatError(
        f"no Geneformer dictionaries ({TOKEN_DICTIONARY}*.json/.pkl and {MEDIAN_DICTIONARY}*.json/.pkl) in "
        f"{', '.join(str(d) for d in dirs)} — pass dictionaries= the directory that holds them (Geneformer "
        "ships them in its geneformer/ package directory)")


# ------------------------------------------------------------------ checkpoint


def _model_dir(src: Path) -> Path:
    if (src / "config.json").is_file():
        return src
    if (src / "model" / "config.json").is_file():
        return src / "model"
    raise CheckpointFormatError(f"{src / 'config.json'}: missing — the Geneformer checkpoint's BertConfig (pass the "
                                "model directory, or its parent holding model/)")


def _weights(model_dir: Path) -> Path:
    for name in WEIGHT_FILES:
        if (model_dir / name).is_file():
            return model_dir / name
    raise CheckpointFormatError(f"{model_dir / WEIGHT_FILES[0]}: missing — the checkpoint's weights "
                                f"({' or '.join(WEIGHT_FILES)})")


def _token_names(token_dict: dict, path: Path, n_tokens: int) -> list[str]:
    ids = np.array(list(token_dict.values()))
    if ids.dtype.kind not in "iu" or sorted(ids.tolist()) != list(range(len(ids))):
        raise CheckpointFormatError(f"{path}: token ids must be the integers 0..{len(ids) - 1}, each once")
    if len(ids) != n_tokens:
        raise CheckpointFormatError(f"{path}: {len(ids)} tokens, but the checkpoint's vocab_size is {n_tokens} — "
                                    "a token dictionary of another Geneformer version")
    names = [""] * len(ids)
    for name, i in token_dict.items():
        names[i] = name
    if names[0] != "<pad>":
        raise CheckpointFormatError(f"{path}: token 0 is {names[0]!r}, Geneformer's <pad> expected")
    return names


def _map_state_dict(state: dict, source: Path, with_head: bool, model) -> tuple[dict, list[str]]:
    """Checkpoint keys → ours (bert. → scfm.bert. with an MLM head, else bert.; cls. → mlm_head.), checked."""
    dropped = sorted(k for k in state if k.startswith(DROPPED_PREFIXES))
    state = {k: v for k, v in state.items() if not k.startswith(DROPPED_PREFIXES)}
    ours = set(model.state_dict())
    prefix = "scfm.bert." if with_head else "bert."

    def theirs(key: str) -> str:
        if key.startswith(prefix):
            return "bert." + key[len(prefix):]
        return "cls." + key[len("mlm_head."):] if key.startswith("mlm_head.") else key

    tied = {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}
    expected = {theirs(k) for k in ours} - tied
    check_keys(state, expected, source, optional=tied | {"bert.embeddings.position_ids"})
    for key, twin in (("cls.predictions.decoder.weight", "bert.embeddings.word_embeddings.weight"),
                      ("cls.predictions.decoder.bias", "cls.predictions.bias")):
        if key in state and not torch.equal(state[key], state[twin]):
            raise CheckpointFormatError(f"{source}: {key} differs from {twin}; scfm imports Geneformer's tied MLM "
                                        "decoder only")
    mapped = {}
    for key, value in state.items():
        if key in tied or key == "bert.embeddings.position_ids":
            continue
        mapped[prefix + key[len("bert."):] if key.startswith("bert.") else "mlm_head." + key[len("cls."):]] = value
    return mapped, dropped


def load_geneformer(src, dictionaries=None) -> tuple:
    """(model in eval mode, fp32, with `model.cell_tokenizer`; its CellTokenizer; a report dict) of a Geneformer
    checkpoint directory `src` (or its parent holding model/). `dictionaries`: the directory with the token and
    median dictionaries (default: src, then its parent)."""
    from fm.modeling_bert import ScFMBertForMaskedLM, ScFMBertModel

    src = Path(src)
    model_dir = _model_dir(src)
    weights = _weights(model_dir)
    bert = read_json(model_dir / "config.json", "the Geneformer checkpoint's BertConfig")
    if bert.get("model_type") != "bert":
        raise CheckpointFormatError(f"{model_dir / 'config.json'}: model_type {bert.get('model_type')!r}, "
                                    "a Geneformer checkpoint is a BERT ('bert')")
    n_tokens = int(bert.get("vocab_size", 0))
    dirs = [Path(dictionaries)] if dictionaries is not None else list(dict.fromkeys([src, model_dir, src.parent]))
    token_path, median_path = find_dictionaries(dirs, n_tokens)
    names = _token_names(read_dictionary(token_path), token_path, n_tokens)
    medians = read_dictionary(median_path)
    v2 = "<cls>" in names and "<eos>" in names
    special = {n for n in names if n.startswith("<") and n.endswith(">")}
    # <eos> becomes our <eoc> (end of cell); <pad>, <mask>, <cls> are ours already
    mapping = map_gene_names(["<eoc>" if n == "<eos>" else n for n in names])
    gene_medians = [0.0 if n in special else float(medians.get(n, 0.0)) for n in names]

    state = read_state_dict(weights)
    with_head = any(k.startswith("cls.predictions.") for k in state)
    cls = ScFMBertForMaskedLM if with_head else ScFMBertModel
    positions = int(bert.get("max_position_embeddings", 512))
    config = ScFMConfig(
        vocab_size=mapping.vocab_size, gene_table=mapping.ids.tolist(), backbone="bert",
        bert_config={k: v for k, v in bert.items() if k not in BERT_CONFIG_DROP}, embedding_layer=-1,
        gene_medians=gene_medians, add_cls_eos=v2, value_encoding="geneformer", pooling="cls" if v2 else "mean",
        max_genes=positions - 2 * v2, mvc=False, architectures=[cls.__name__])
    model = cls(config)
    mapped, dropped = _map_state_dict(state, weights, with_head, model)
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    missing = [k for k in missing if not k.startswith("mlm_head.predictions.decoder.")]
    if missing or unexpected:  # check_keys passed, so this is a bug of the mapping: never load silently
        raise CheckpointFormatError(f"{weights}: keys left after mapping: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if with_head:
        model.tie_weights()
    model = model.float().eval()

    tokenizer = CellTokenizer(gene_table=mapping.ids.tolist(), model_genes=mapping.model_genes)
    model.cell_tokenizer = tokenizer
    n_genes = len(names) - len(special)
    report = {
        "format": "geneformer", "version": "V2" if v2 else "V1", "architecture": cls.__name__,
        "weights": str(weights), "token_dictionary": str(token_path), "gene_median_dictionary": str(median_path),
        "n_tokens": len(names), "n_genes": n_genes,
        "n_genes_mapped": n_genes - len(mapping.unmapped) - len(mapping.shared),
        "n_genes_unmapped": len(mapping.unmapped), "unmapped_examples": mapping.unmapped[:10],
        "n_genes_shared": len(mapping.shared), "shared_examples": mapping.shared[:10],
        "n_genes_with_median": int(sum(m > 0 for m in gene_medians)),
        "max_genes": config.max_genes, "add_cls_eos": v2, "pooling": config.pooling,
        "embedding_layer": config.embedding_layer, "dropped_keys": dropped,
        "summary": mapping.summary(n_genes),
    }
    log.info("geneformer %s: %s", report["version"], report["summary"])
    return model, tokenizer, report


def convert_geneformer(src, out, dictionaries=None) -> Path:
    """Write a Geneformer checkpoint as an scfm export directory `out` (config.json, model.safetensors, tokenizer
    files, conversion_report.json); `fm.load(out)` returns the same model."""
    model, tokenizer, report = load_geneformer(src, dictionaries)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_export(model, tokenizer, out, source=f"converted from Geneformer checkpoint {Path(src).resolve()}")
    write_report(out, report)
    return out


__all__ = ["convert_geneformer", "find_dictionaries", "load_geneformer", "read_dictionary"]
