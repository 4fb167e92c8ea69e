"""The benchmark module of a task, found through the task registry (fm.tasks.registry: each entry's
`eval`). Modules are imported lazily so `fm eval` on one task never pays for (or breaks on) another
task's libraries."""
from __future__ import annotations

from types import ModuleType

REQUIRED_ATTRS = ("MAIN_METRIC", "HIGHER_IS_BETTER", "CONTROLS", "DATASET_KEYS", "METHODS", "prepare", "score")
"""What fm.eval.harness.run_task calls or reads; `finalize` and `REPORT_PLOTS` are optional."""


def get_task(name: str) -> ModuleType:
    """Import a task's benchmark module and check it defines the interface the harness relies on."""
    from fm.tasks import registry

    task = registry.get(name)
    if task.eval is None:
        raise ValueError(f"task {name!r} has no benchmark module (its registry entry's `eval`)")
    module = task.load("eval")
    missing = [a for a in REQUIRED_ATTRS if not hasattr(module, a)]
    if missing:
        raise ValueError(f"benchmark module of task {name!r} ({getattr(module, '__name__', module)}) lacks "
                         f"{', '.join(missing)}")
    return module
