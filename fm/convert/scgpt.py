"""scGPT checkpoints (`args.json` + `vocab.json` + `best_model.pt`, as released: whole-human, blood, brain …)
as configurations of our own model, and back.

scGPT's `TransformerModel` is, in scfm terms: Post-LN blocks with ReLU (`norm_first=False`, `activation="relu"`),
a LayerNorm on the gene embedding (`gene_norm`), no LayerNorm on the summed embedding (`embedding_norm=False`),
`<cls>` a gene token carrying the pad value (`cls_value`). Its value input, by `input_emb_style`: `continuous`
(the released models) an MLP of the bin number, every value through it, clamped at 512 (`value_encoding=
"bin_values"`, `learned_value_sentinels=False`, `value_max=512`); `category` a table of bin ids + LayerNorm
(`value_encoding="bins"`, `value_norm`; scGPT's pad/mask ids n_bins / n_bins+1 are our mask/pad swapped);
`scaling` the bin number times the gene vector (`value_combine="scale"`). Its ExprDecoder is `expression_decoder="scgpt"`, its
inner-product MVC decoder is ours. The key map below is the whole difference; no scGPT code is used.

Tokenisation differences that remain (documented, not bugs): scGPT breaks bin ties (a value equal to a quantile
edge, most entries of a count cell) at random with numpy's global RNG; we take the lower median of its possible
draws (fm/binning.py), so a value may differ by the draw but always lies in scGPT's set. A cell with more genes
than max_seq_len - 1 keeps scGPT's random subset there, its most expressed genes here. Token order inside a cell
does not change outputs (no positional embedding), up to float rounding in the attention sums.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch

from fm.configuration_scfm import SCGPT_ARCHITECTURE, ScFMConfig
from fm.convert.common import (CheckpointFormatError, check_keys, map_gene_names, read_json, read_state_dict,
                               token_names, write_report)
from fm.export import save_export
from fm.tokenizer import CellTokenizer

log = logging.getLogger("fm")

ARGS_FILE, VOCAB_FILE, WEIGHTS_FILE = "args.json", "vocab.json", "best_model.pt"
SOURCE_ARGS_FILE = "scgpt_args.json"  # the original args.json, kept in an export for the way back

_LAYER = r"transformer_encoder\.layers\.(\d+)\."
# scGPT key (regex) → scfm key of ScFMForMaskedExpression (format string over the regex groups)
KEY_MAP = [
    (r"encoder\.embedding\.weight", "scfm.embeddings.gene.weight"),
    (r"encoder\.enc_norm\.(weight|bias)", "scfm.embeddings.gene_norm.{0}"),
    (_LAYER + r"self_attn\.Wqkv\.(weight|bias)", "scfm.layers.{0}.attn.qkv.{1}"),  # flash-attention names
    (_LAYER + r"self_attn\.in_proj_(weight|bias)", "scfm.layers.{0}.attn.qkv.{1}"),  # nn.MultiheadAttention
    (_LAYER + r"self_attn\.out_proj\.(weight|bias)", "scfm.layers.{0}.attn.out.{1}"),
    (_LAYER + r"linear1\.(weight|bias)", "scfm.layers.{0}.mlp.fc.{1}"),
    (_LAYER + r"linear2\.(weight|bias)", "scfm.layers.{0}.mlp.proj.{1}"),
    (_LAYER + r"norm1\.(weight|bias)", "scfm.layers.{0}.ln1.{1}"),
    (_LAYER + r"norm2\.(weight|bias)", "scfm.layers.{0}.ln2.{1}"),
    (r"decoder\.fc\.(0|2|4)\.(weight|bias)", "gep_head.{0}.{1}"),
    (r"mvc_decoder\.gene2query\.(weight|bias)", "mvc_head.query.{0}"),
    (r"mvc_decoder\.W\.weight", "mvc_head.W.weight"),
]
# the value encoder per input_emb_style ("scaling" has none: the value multiplies the gene vector)
VALUE_MAPS = {
    "continuous": [(r"value_encoder\.linear1\.(weight|bias)", "scfm.embeddings.value.fc1.{0}"),
                   (r"value_encoder\.linear2\.(weight|bias)", "scfm.embeddings.value.fc2.{0}"),
                   (r"value_encoder\.norm\.(weight|bias)", "scfm.embeddings.value.norm.{0}")],
    "category": [(r"value_encoder\.embedding\.weight", "scfm.embeddings.value.weight"),
                 (r"value_encoder\.enc_norm\.(weight|bias)", "scfm.embeddings.value_norm.{0}")],
    "scaling": [],
}
# scGPT's classification decoder, imported when it was trained (n_cls > 1) as ScFMForAnnotation's scGPT-shaped head
CLASSIFIER_MAP = [
    (r"cls_decoder\._decoder\.(\d+)\.(weight|bias)", "classifier_head.layers.{0}.{1}"),
    (r"cls_decoder\.out_layer\.(weight|bias)", "classifier_head.out.{0}"),
]
EXTRA_FILE = "scgpt_extra.safetensors"  # tensors scfm does not use (the placeholder classifier), for the way back
# the classification decoder of a pretrained checkpoint (n_cls = 1: a placeholder, never trained) is not imported
DROPPED = re.compile(r"^cls_decoder\.")
_UNSUPPORTED_ARGS = {  # args.json settings that change the architecture in ways scfm does not represent
    "use_batch_labels": "batch-label embeddings", "DSBN": "domain-specific batch norm",
    "domain_spec_batchnorm": "domain-specific batch norm", "explicit_zero_prob": "zero-probability decoders",
    "pre_norm": "Pre-LN blocks without a final norm",
}


def is_scgpt_dir(path: Path) -> bool:
    """Any of scGPT's three files, and no scfm config.json: a scGPT directory (an incomplete one then gets an error
    naming the missing file rather than 'no config.json')."""
    path = Path(path)
    return (path.is_dir() and not (path / "config.json").is_file()
            and any((path / name).is_file() for name in (ARGS_FILE, VOCAB_FILE, WEIGHTS_FILE)))


def input_style(args: dict, source: Path) -> str:
    """args.json's input_emb_style, checked against the pad/mask values scGPT pairs with it."""
    style = args.get("input_emb_style", "continuous")
    if style not in VALUE_MAPS:
        raise CheckpointFormatError(f"{source / ARGS_FILE}: unknown input_emb_style {style!r} "
                                    f"(scGPT's are {sorted(VALUE_MAPS)})")
    n_bins = int(args.get("n_bins", 51))
    # scGPT's settings: category bins use ids n_bins (pad) and n_bins + 1 (mask); the others -2 / -1
    want = (n_bins, n_bins + 1) if style == "category" else (-2, -1)
    got = (args.get("pad_value", want[0]), args.get("mask_value", want[1]))
    if tuple(float(v) for v in got) != tuple(float(v) for v in want):
        raise CheckpointFormatError(f"{source / ARGS_FILE}: pad_value/mask_value {got} for input_emb_style "
                                    f"{style!r}; scGPT uses {want} (other values are not importable)")
    return style


def n_classes(state: dict) -> int:
    """Classes of the checkpoint's classification decoder (1: scGPT's untrained placeholder, or none)."""
    out = state.get("cls_decoder.out_layer.weight")
    return 1 if out is None else int(out.shape[0])


def scgpt_config(args: dict, mapping, source: Path, state: dict | None = None) -> ScFMConfig:
    """The ScFMConfig that is scGPT's architecture with these args.json settings."""
    for key, what in _UNSUPPORTED_ARGS.items():
        if args.get(key):
            raise CheckpointFormatError(f"{source / ARGS_FILE}: {key}={args[key]!r} ({what}) is not importable yet")
    style = input_style(args, source)
    try:
        d_model, n_heads = int(args["embsize"]), int(args.get("nheads", args.get("nhead")))
        n_layers, d_ff = int(args["nlayers"]), int(args["d_hid"])
    except (KeyError, TypeError) as err:
        raise CheckpointFormatError(f"{source / ARGS_FILE}: lacks the architecture setting {err} "
                                    "(embsize, nheads, nlayers, d_hid)") from err
    table = [int(i) for i in mapping.ids]
    classes = n_classes(state or {})
    head = {}
    if classes > 1:  # a fine-tuned classifier: scGPT does not store class names; args.json's id2type if present
        names = args.get("id2type") or {}
        id2label = {i: str(names.get(str(i), names.get(i, f"class_{i}"))) for i in range(classes)}
        blocks = {int(k.split(".")[2]) for k in state if k.startswith("cls_decoder._decoder.")}
        head = dict(architectures=["ScFMForAnnotation"], num_labels=classes, id2label=id2label,
                    label2id={v: k for k, v in id2label.items()}, classifier="scgpt",
                    classifier_layers=(max(blocks) // 3 + 2) if blocks else 1)
    return ScFMConfig(
        vocab_size=mapping.vocab_size, gene_table=table, n_bins=int(args.get("n_bins", 51)),
        **(SCGPT_ARCHITECTURE | dict(value_encoding="bins" if style == "category" else "bin_values",
                                     )),
        value_norm=style == "category", value_combine="scale" if style == "scaling" else "sum", d_model=d_model,
        n_layers=n_layers, n_heads=n_heads, d_ff=d_ff, dropout=float(args.get("dropout", 0.2)),
        max_genes=int(args.get("max_seq_len", 1201)) - 1, mvc=True,
        zero_fraction=float(args.get("fm_zero_fraction", 0.0)), **({"architectures": ["ScFMForMaskedExpression"]} | head))


def _key_map(style: str, classifier: bool) -> list[tuple[str, str]]:
    return KEY_MAP + VALUE_MAPS[style] + (CLASSIFIER_MAP if classifier else [])


def _swap_pad_mask(table: torch.Tensor) -> torch.Tensor:
    """Category value rows: scGPT keeps <pad> at n_bins and <mask> at n_bins + 1, we the other way round
    (the swap is its own inverse, so it serves both directions)."""
    order = list(range(table.shape[0]))
    order[-2], order[-1] = order[-1], order[-2]
    return table[order].contiguous()


def scgpt_state_dict(state: dict[str, torch.Tensor], source: Path, style: str = "continuous") -> dict[str, torch.Tensor]:
    """scGPT keys → scfm keys; any key outside the map (other than the placeholder classifier) is an error."""
    out, unknown = {}, []
    compiled = [(re.compile(f"^{p}$"), t) for p, t in _key_map(style, n_classes(state) > 1)]
    for key, tensor in state.items():
        for pattern, target in compiled:
            m = pattern.match(key)
            if m:
                out[target.format(*m.groups())] = tensor.float().contiguous()
                break
        else:
            if not DROPPED.match(key):
                unknown.append(key)
    if "scfm.embeddings.value.weight" in out:
        out["scfm.embeddings.value.weight"] = _swap_pad_mask(out["scfm.embeddings.value.weight"])
    if unknown:
        raise CheckpointFormatError(f"{source}: unexpected keys {unknown[:8]} ({len(unknown)}) — a scGPT variant "
                                    "scfm does not import")
    return out


def load_scgpt(src: str | Path):
    """(model, tokenizer, report) from a scGPT checkpoint directory, in memory: the ScFMForMaskedExpression that
    computes what scGPT's TransformerModel computes, in eval mode."""
    from fm.modeling_scfm import ScFMForMaskedExpression

    src = Path(src)
    args = read_json(src / ARGS_FILE, "scGPT's model settings (embsize, nlayers, nheads, d_hid …)")
    vocab = read_json(src / VOCAB_FILE, "scGPT's gene vocabulary (token → index)")
    if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
        raise CheckpointFormatError(f"{src / VOCAB_FILE}: expected a JSON object token → integer index")
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    if sorted(vocab.values()) != list(range(len(tokens))):
        raise CheckpointFormatError(f"{src / VOCAB_FILE}: indices are not 0..{len(tokens) - 1}")
    for special in ("<pad>", "<cls>"):
        if special not in vocab:
            raise CheckpointFormatError(f"{src / VOCAB_FILE}: no {special} token")
    state = read_state_dict(src / WEIGHTS_FILE)
    emb = state.get("encoder.embedding.weight")
    if emb is not None and emb.shape[0] != len(tokens):
        raise CheckpointFormatError(f"{src}: {WEIGHTS_FILE} has {emb.shape[0]} gene rows, {VOCAB_FILE} "
                                    f"{len(tokens)} tokens — the files belong to different models")
    mapping = map_gene_names(tokens)
    config = scgpt_config(args, mapping, src, state)
    weights = scgpt_state_dict(state, src, input_style(args, src))
    if config.architectures[0] == "ScFMForAnnotation":
        from fm.heads.annotation import ScFMForAnnotation

        model = ScFMForAnnotation(config)
        # a fine-tuned classifier: the pretraining decoders have no place in the annotation model
        dropped = sorted(k for k in weights if k.startswith(("gep_head.", "mvc_head.")))
        weights = {k: v for k, v in weights.items() if k not in dropped}
    else:
        model = ScFMForMaskedExpression(config)
    check_keys(weights, {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}, src / WEIGHTS_FILE)
    model.load_state_dict(weights, strict=True)
    model.eval()
    n_genes = sum(1 for t in tokens if not (t.startswith("<") and t.endswith(">")))
    tokenizer = CellTokenizer(n_bins=config.n_bins, gene_table=config.gene_table, model_genes=mapping.model_genes)
    report = {"format": "scgpt", "source": str(src.resolve()), "n_genes": n_genes,
              "n_mapped": n_genes - len(mapping.unmapped) - len(mapping.shared),
              "unmapped": mapping.unmapped, "shared": mapping.shared, "summary": mapping.summary(n_genes),
              "architecture": config.architectures[0],
              "dropped_keys": sorted(k for k in state if DROPPED.match(k) and n_classes(state) == 1), "args": args,
              "extra": {k: state[k] for k in state if DROPPED.match(k) and n_classes(state) == 1}}
    log.info("scGPT %s: %s", src, mapping.summary(n_genes))
    return model, tokenizer, report


def convert_scgpt(src: str | Path, out: str | Path) -> Path:
    """`fm convert scgpt SRC OUT`: a normal scfm export of the scGPT checkpoint at SRC."""
    model, tokenizer, report = load_scgpt(src)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_export(model, tokenizer, out, source=f"converted from scGPT checkpoint {Path(src).resolve()}")
    (out / SOURCE_ARGS_FILE).write_text(json.dumps(report.pop("args"), indent=1))
    extra = report.pop("extra")
    if extra:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in extra.items()}, out / EXTRA_FILE)
    write_report(out, report)
    return out


# ------------------------------------------------------------------------------------ scfm → scGPT
_REQUIRED = dict(norm_first=False, activation="relu", gene_norm=True, embedding_norm=False, cls_value=True,
                 learned_value_sentinels=False, expression_decoder="scgpt", mvc=True)


def scgpt_style(config: ScFMConfig) -> str | None:
    """The input_emb_style an scfm config is, or None when it is none of scGPT's."""
    if config.value_combine == "scale" and config.value_encoding == "bin_values":
        return "scaling"
    if config.value_encoding == "bin_values" and not config.value_norm:
        return "continuous"
    if config.value_encoding == "bins" and config.value_norm:
        return "category"
    return None


def export_scgpt(model_dir: str | Path, out: str | Path) -> Path:
    """`fm convert --to scgpt MODEL OUT`: an scfm model with scGPT's architecture settings as scGPT's files
    (args.json, vocab.json, best_model.pt: a plain state dict with the flash-attention `Wqkv` names)."""
    from safetensors.torch import load_file

    model_dir, out = Path(model_dir), Path(out)
    config = ScFMConfig.from_pretrained(model_dir)
    wrong = {k: getattr(config, k) for k, v in _REQUIRED.items() if getattr(config, k) != v}
    style = scgpt_style(config)
    if style is None:
        wrong["value_encoding"] = config.value_encoding
    if wrong or config.condition_keys or config.gene_table is None:
        raise ValueError(f"{model_dir}: not scGPT's architecture ({wrong or 'condition tokens or a full gene table'}); "
                         f"export to scGPT needs {_REQUIRED}, a compact gene table and no condition tokens")
    ours = load_file(model_dir / "model.safetensors")
    reverse = [(re.compile("^" + r"([^.]+)".join(map(re.escape, re.split(r"\{\d\}", t))) + "$"), p)
               for p, t in _key_map(style, True)]
    state = load_file(model_dir / EXTRA_FILE) if (model_dir / EXTRA_FILE).is_file() else {}
    for key, tensor in ours.items():
        for pattern, source in reverse:
            m = pattern.match(key)
            if m:
                state[_fill(source, m.groups())] = (_swap_pad_mask(tensor) if key == "scfm.embeddings.value.weight"
                                                    else tensor.clone())
                break
    tokenizer = CellTokenizer.from_pretrained(model_dir)
    names = token_names(config.gene_table, tokenizer.model_genes)
    args_path = model_dir / SOURCE_ARGS_FILE
    args = json.loads(args_path.read_text()) if args_path.is_file() else {}
    pad_value, mask_value = (config.n_bins, config.n_bins + 1) if style == "category" else (-2, -1)
    args.update(embsize=config.d_model, nheads=config.n_heads, d_hid=config.d_ff, nlayers=config.n_layers,
                dropout=config.dropout, pad_token="<pad>", pad_value=pad_value, mask_value=mask_value,
                input_emb_style=style, include_zero_gene=config.zero_fraction > 0, n_bins=config.n_bins, max_seq_len=config.max_genes + 1)
    if config.zero_fraction:  # scfm's share of measured-but-unexpressed genes (scGPT's scripts ignore the key)
        args["fm_zero_fraction"] = config.zero_fraction
    out.mkdir(parents=True, exist_ok=True)
    (out / ARGS_FILE).write_text(json.dumps(args, indent=1))
    (out / VOCAB_FILE).write_text(json.dumps({name: i for i, name in enumerate(names)}))
    torch.save(state, out / WEIGHTS_FILE)
    return out


def _fill(pattern: str, groups: tuple[str, ...]) -> str:
    """The scGPT key of a KEY_MAP pattern with its capture groups filled in (alternations resolved)."""
    it = iter(groups)
    key = re.sub(r"\((?:[^()]*)\)", lambda _: next(it), pattern)
    key = key.replace("\\.", ".")
    if key.startswith("transformer_encoder") and "in_proj_" in key:
        key = key.replace("in_proj_", "Wqkv.")
    return key


__all__ = ["convert_scgpt", "export_scgpt", "is_scgpt_dir", "load_scgpt", "scgpt_config", "scgpt_state_dict"]
