"""Read h5ad files (backed, row chunks) into EncodedCells with one tokenizer."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import anndata as ad

from fm.tokenizer import CellTokenizer, EncodedCells

log = logging.getLogger("fm")


def find_h5ad_files(paths: Sequence[str | Path]) -> list[Path]:
    """Expand directories into their *.h5ad files (sorted, so runs are reproducible)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(p.glob("*.h5ad")))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"data path not found: {p}. Set FM_DATA_DIR to the real-data directory "
                                    "or give existing .h5ad files/directories in data.paths.")
    if not files:
        raise FileNotFoundError(f"no .h5ad files in {list(map(str, paths))}")
    return files


def open_anndata(path: str | Path, backed: bool = True) -> ad.AnnData:
    """Open an h5ad lazily (X stays on disk); a corrupt or truncated file gets an error naming it."""
    path = Path(path)
    try:
        return ad.read_h5ad(path, backed="r" if backed else None)
    except Exception as e:  # h5py/anndata raise many types for damaged files
        raise ValueError(f"{path}: cannot read this h5ad ({type(e).__name__}: {e}). "
                         "Is the file complete and an AnnData h5ad?") from e


def encode_files(paths: Sequence[str | Path], tokenizer: CellTokenizer, fit_conditions: bool = True,
                 drop_empty: bool = False) -> EncodedCells:
    """Tokenise every file with the same tokenizer; condition categories are fitted over all files first."""
    files = find_h5ad_files(paths)
    adatas = [open_anndata(f) for f in files]
    if fit_conditions:
        for f, a in zip(files, adatas):
            tokenizer.fit_conditions(a.obs, str(f))
    parts = []
    for f, a in zip(files, adatas):
        parts.append(tokenizer.encode(a, source=str(f), drop_empty=drop_empty))
        log.info("%s: %d cells, %d nonzero vocabulary entries", f.name, len(parts[-1]), parts[-1].indptr[-1])
        if a.isbacked:
            a.file.close()
    return EncodedCells.concat(parts)
