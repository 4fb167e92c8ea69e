"""The task registry: one entry per fine-tuning task, and the only list of tasks in the code.

An entry names everything a task is made of, as "module:attribute" strings resolved on first use
(so `import fm` and `fm --help` never import a task's torch/scanpy code):

    config     its TaskConfig subclass (its own fields, validated in __post_init__), chosen by task.name
    head       its ScFMFor<Task> class (fm.load picks it by config.architectures[0])
    collator   the collator its run() trains with
    run        run(cfg, resume=False, adatas=None) -> TrainResult: the whole `fm finetune` job
    inference  its public functions, exported lazily as fm.<name>
    eval       its benchmark module for `fm eval` (fm/eval/tasks/<task>.py)
    recipe     its default fine-tuning recipe (default: the shipped recipes/finetune/<task>.yaml)

Every reader goes through here: fm.config (task.name → config class), fm.finetune / `fm finetune`
(run), fm.load (head), `fm.<function>` (inference), the eval harness (eval). Adding a task is one
`Task(...)` below (or `register(Task(...))` from outside the package) plus the files it names; see
the README's "Adding a task".
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any


def resolve(ref: Any) -> Any:
    """A "package.module:attribute" string → the object (imported now); anything else is returned as is."""
    if not isinstance(ref, str):
        return ref
    module, _, attribute = ref.partition(":")
    obj = importlib.import_module(module)
    for part in attribute.split(".") if attribute else ():
        obj = getattr(obj, part)
    return obj


def ref_name(ref: Any) -> str:
    """The attribute name a reference points at, without importing it ("m:ScFMForX" → "ScFMForX")."""
    return ref.rpartition(":")[2].rpartition(".")[2] if isinstance(ref, str) else ref.__name__


@dataclass(frozen=True)
class Task:
    """One fine-tuning task (see the module docstring for what each field is)."""

    name: str
    config: Any
    head: Any
    collator: Any
    run: Any
    inference: tuple = ()
    eval: Any = None
    recipe: Any = None
    legacy_heads: tuple[str, ...] = field(default=())
    """Former names of the head class, so checkpoints exported under them still load."""

    @property
    def head_name(self) -> str:
        return ref_name(self.head)

    def load(self, part: str):
        """The resolved object of one field ('config', 'head', 'collator', 'run', 'eval')."""
        return resolve(getattr(self, part))

    def recipe_path(self):
        """Path of the default fine-tuning recipe (a YAML path, or a shipped name such as 'finetune/cci')."""
        from fm.paths import recipe_path

        return recipe_path(str(self.recipe or f"finetune/{self.name}"))

    def functions(self) -> dict[str, Any]:
        """Public inference functions by name (unresolved references)."""
        return {ref_name(f): f for f in self.inference}


def _task(name: str, head: str, collator: str, inference: tuple[str, ...], legacy: tuple[str, ...] = ()) -> Task:
    """A built-in task: config `<Name>Config`, run and inference in fm.tasks.<name>, head in fm.heads.<name>."""
    module = f"fm.tasks.{name}"
    config = "".join(p.capitalize() for p in name.split("_")) + "Config"
    return Task(name=name, config=f"{module}:{config}", head=f"fm.heads.{name}:{head}", collator=collator,
                run=f"{module}:run", inference=tuple(f"{module}:{f}" for f in inference),
                eval=f"fm.eval.tasks.{name}", legacy_heads=legacy)


TASKS: dict[str, Task] = {t.name: t for t in (
    _task("annotation", "ScFMForAnnotation", "fm.data.collator:LabeledCellCollator", ("annotate", "transfer_labels"),
          ("ScFMForCellClassification",)),
    _task("imputation", "ScFMForImputation", "fm.tasks.imputation:ImputationCollator", ("impute",),
          ("ScFMForExpressionImputation",)),
    _task("batch_correction", "ScFMForBatchCorrection", "fm.tasks.batch_correction:BatchCorrectionCollator",
          ("integrate",), ("ScFMForBatchIntegration",)),
    _task("modality_prediction", "ScFMForModalityPrediction", "fm.data.collator:LabeledCellCollator",
          ("predict_protein",), ("ScFMForProteinPrediction",)),
    _task("cci", "ScFMForCCI", "fm.data.collator:LabeledCellCollator", ("interactions",), ("ScFMForNicheExpression",)),
)}
"""Built-in tasks, in the order the docs list them."""


def register(task: Task, replace: bool = False) -> Task:
    """Add a task (e.g. from a plugin or a test); an existing name is an error unless `replace`."""
    if task.name in TASKS and not replace:
        raise ValueError(f"task {task.name!r} is already registered")
    clash = {fn for fn in task.functions() for other in TASKS.values() if other.name != task.name
             and fn in other.functions()}
    if clash:
        raise ValueError(f"task {task.name!r}: inference function name(s) {sorted(clash)} already exported by another task")
    TASKS[task.name] = task
    return task


def unregister(name: str) -> None:
    TASKS.pop(name, None)


def get(name: str) -> Task:
    """The task called `name`, or a ValueError listing the known ones."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name]


def task_for_head(architecture: str) -> Task | None:
    """The task whose head class is called `architecture` (current or legacy name), or None."""
    for task in TASKS.values():
        if architecture == task.head_name or architecture in task.legacy_heads:
            return task
    return None


def inference_function(name: str):
    """The public inference function called `name` (fm.<name>), or None."""
    for task in TASKS.values():
        ref = task.functions().get(name)
        if ref is not None:
            return resolve(ref)
    return None


def inference_names() -> list[str]:
    return [fn for task in TASKS.values() for fn in task.functions()]


__all__ = ["TASKS", "Task", "get", "inference_function", "inference_names", "ref_name", "register", "resolve",
           "task_for_head", "unregister"]
