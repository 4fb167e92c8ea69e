"""Task name → module path. Modules are imported lazily so `fm eval` on one task never pays for
(or breaks on) another task's libraries."""
from __future__ import annotations

import importlib
from types import ModuleType

TASKS: dict[str, str] = {
    "annotation": "fm.eval.tasks.annotation",
    "batch_correction": "fm.eval.tasks.batch_correction",
    "imputation": "fm.eval.tasks.imputation",
    "modality_prediction": "fm.eval.tasks.modality_prediction",
    "cci": "fm.eval.tasks.cci",
}

REQUIRED_ATTRS = ("MAIN_METRIC", "HIGHER_IS_BETTER", "CONTROLS", "DATASET_KEYS", "METHODS", "prepare", "score")
"""What fm.eval.harness.run_task calls or reads; `finalize` and `REPORT_PLOTS` are optional."""


def get_task(name: str) -> ModuleType:
    """Import a task module and check it defines the interface the harness relies on."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    module = importlib.import_module(TASKS[name])
    missing = [a for a in REQUIRED_ATTRS if not hasattr(module, a)]
    if missing:
        raise ValueError(f"task module {TASKS[name]} lacks {', '.join(missing)}")
    return module
