"""Data: reading AnnData files into the sparse cell-row format, batching with the collator."""
from fm.data.collator import CellCollator, LabeledCellCollator
from fm.data.sources import encode_files, find_h5ad_files, open_anndata

__all__ = ["CellCollator", "LabeledCellCollator", "encode_files", "find_h5ad_files", "open_anndata"]
