"""Task heads on the scfm backbone, one `ScFMFor<Task>` class per task, one module per head.

See fm/heads/classification.py for the pattern every head follows. Modules are imported lazily
(`head_class`), so loading one task's checkpoint never imports another task's code.
"""
from __future__ import annotations

import importlib

from fm.heads.classification import IGNORE_INDEX, ScFMForCellClassification

HEAD_MODULES: dict[str, str] = {
    "ScFMForCellClassification": "fm.heads.classification",
    "ScFMForExpressionImputation": "fm.heads.imputation",
    "ScFMForBatchIntegration": "fm.heads.integration",
    "ScFMForProteinPrediction": "fm.heads.protein",
    "ScFMForNicheExpression": "fm.heads.niche",
}
"""Architecture name (config.architectures[0]) → module defining it, for fm.load."""


def head_class(name: str) -> type | None:
    """The ScFMFor<Task> class called `name`, or None when no head has that name."""
    module = HEAD_MODULES.get(name)
    return getattr(importlib.import_module(module), name) if module else None


__all__ = ["HEAD_MODULES", "IGNORE_INDEX", "ScFMForCellClassification", "head_class"]
