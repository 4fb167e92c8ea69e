"""scverse conventions shared by every public AnnData function (fm.embed, fm.annotate, fm.transfer_labels,
fm.impute, fm.integrate, fm.predict_protein, fm.interactions).

Every one of them takes, besides its own arguments:

  layer=None            read counts from adata.layers[layer] instead of X
  use_raw=False         read counts from adata.raw.X, genes from adata.raw.var_names
  gene_key=None         var column holding the gene symbols / Ensembl IDs (default: var_names)
  allow_non_counts=None accept non-integer values (binned as they are)
  key_added=            name of the output key (`key=` is kept as an alias of it)
  copy=False            as scanpy: True computes on `adata` (read only) and returns a modified copy, leaving
                        `adata` untouched; False writes into `adata` and returns what the function returns
                        (the embedding, labels, matrix, frame), as before.

The four input settings override the model tokenizer's saved ones (`layer`, `gene_key`, `allow_non_counts`) for
that call only: run_batched reads with `tokenizer.with_input(...)`, a copy; model.cell_tokenizer is never changed.

Views: an AnnData view (`adata[mask]`) cannot hold results — anndata turns it into a copy on the first write, so
the parent never sees them. With copy=False a view is an error naming the two ways out (`adata = adata[mask].copy()`
first, or `copy=True`); with copy=True a view is fine (the returned copy is a real AnnData).

Provenance: each call records adata.uns["fm"][<output key>] = {"model", "model_sha256", "model_sha256_of",
"scfm_version", "function", "settings"} (h5ad-writable: None settings are left out).
"""
from __future__ import annotations

import hashlib

INPUT_ARGS = ("layer", "use_raw", "gene_key", "allow_non_counts")
MODEL_SHA256_OF = "sha256 of the model's config JSON (to_json_string) + '\\n' + its parameter count"


def output_key(key_added: str | None, key: str | None, default: str) -> str:
    """key_added, or its alias key, or the function's default; both given and different is an error."""
    if key_added is not None and key is not None and key_added != key:
        raise ValueError(f"key={key!r} and key_added={key_added!r} name the same output; pass only key_added")
    return key_added or key or default


def start_call(adata, copy: bool, function: str, key_added, key, default: str, layer=None, use_raw=False,
               gene_key=None, allow_non_counts=None) -> tuple[str, dict]:
    """What every AnnData function does first: its output key (key_added, alias key, default), the view check,
    and its input settings as run_batched's keywords."""
    key = output_key(key_added, key, default)
    check_writable(adata, copy, function)
    return key, {"layer": layer, "use_raw": use_raw, "gene_key": gene_key, "allow_non_counts": allow_non_counts}


def check_writable(adata, copy: bool, function: str) -> None:
    """Before any work: a view with copy=False is an error (its results would never reach the parent)."""
    if getattr(adata, "is_view", False) and not copy:
        raise ValueError(f"{function}: adata is a view (a subset such as adata[mask]); results written into a view "
                         "are lost to its parent AnnData. Make it a real AnnData first (adata = adata[mask].copy()) "
                         "or pass copy=True to get the results back in a new AnnData.")


def output_adata(adata, copy: bool):
    """The AnnData results are written into: adata itself, or (copy=True) an in-memory copy of it."""
    if not copy:
        return adata
    return adata.to_memory() if getattr(adata, "isbacked", False) else adata.copy()


def model_fingerprint(model) -> tuple[str, str]:
    """(model path or name, sha256 of its config JSON + parameter count): cheap, no pass over the weights."""
    config = model.config
    name = str(getattr(model, "name_or_path", "") or getattr(config, "_name_or_path", "") or type(model).__name__)
    n_params = sum(p.numel() for p in model.parameters())
    digest = hashlib.sha256(f"{config.to_json_string(use_diff=False)}\n{n_params}".encode()).hexdigest()
    return name, digest


def _plain(value):
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return value if isinstance(value, (str, int, float, bool)) else str(value)


def record(adata, key: str, model, function: str, settings: dict) -> dict:
    """Write (and return) the provenance of one call into adata.uns["fm"][key]."""
    import fm

    name, digest = model_fingerprint(model)
    entry = {"model": name, "model_sha256": digest, "model_sha256_of": MODEL_SHA256_OF,
             "scfm_version": fm.__version__, "function": function,
             "settings": {k: _plain(v) for k, v in settings.items() if v is not None}}
    previous = adata.uns.get("fm", {})
    adata.uns["fm"] = {**(dict(previous) if isinstance(previous, dict) else {}), key: entry}
    return entry


__all__ = ["INPUT_ARGS", "check_writable", "start_call", "model_fingerprint", "output_adata", "output_key", "record"]
