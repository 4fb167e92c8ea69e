"""The model code an exported directory carries, so `AutoModel.from_pretrained(dir, trust_remote_code=True)` works
where scfm is not installed.

transformers' remote-code loader (dynamic_module_utils) copies a class's module file plus the files it imports
*relatively* (`from .x import y`) from the model directory; `custom_object_save` copies files verbatim, so our
absolute `from fm.x import y` imports would still need package `fm`. Here the import closure of the exported
classes is computed from the source (ast: `from fm.x`, `from .x`, `from fm import x`, lazy imports inside
functions included; imports inside `try` are optional by construction, as transformers' check_imports treats
them, and are not followed) and each module is written flat into the directory (fm/heads/annotation.py →
heads_annotation.py, fm/heads/__init__.py → heads.py) with its fm imports rewritten to flat relative ones.
"""
from __future__ import annotations

import ast
import importlib.util
import sys
import tempfile
from pathlib import Path

PACKAGE = "fm"
THIRD_PARTY = {"numpy", "torch", "transformers"}
"""What the exported code may import besides the standard library (a loader needs exactly these installed)."""


def flat_name(module: str) -> str:
    """fm.heads.annotation → heads_annotation; fm.heads (a package __init__) → heads."""
    parts = module.split(".")
    if parts[0] != PACKAGE or len(parts) < 2:
        raise ValueError(f"{module}: not a submodule of {PACKAGE}")
    return "_".join(parts[1:])


def _source(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ImportError(f"{module}: source not found")
    return Path(spec.origin)


def _is_package(module: str) -> bool:
    return _source(module).name == "__init__.py"


def _resolve(module: str, node: ast.ImportFrom) -> list[tuple[str, str | None]]:
    """(fm module the import needs, name bound to the whole module or None) for one `from … import …`."""
    if node.level:
        base = module.split(".") if _is_package(module) else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if target.split(".")[0] != PACKAGE:
        return []
    out = []
    for alias in node.names:  # `from fm.heads import annotation` names a module; `from fm.heads import X` a name
        sub = f"{target}.{alias.name}"
        if alias.name != "*" and _is_package(target) and importlib.util.find_spec(sub) is not None:
            out.append((sub, alias.asname or alias.name))
        elif target == PACKAGE:
            raise ValueError(f"{module}: `from {PACKAGE} import {alias.name}` imports the package __init__; import "
                             f"from the defining module instead")
        else:
            out.append((target, None))
    return out


def _imports(module: str) -> list[tuple[ast.stmt, bool, list[tuple[str, str | None]]]]:
    """Every fm import statement of a module: (node, inside a try block, resolved targets)."""
    tree = ast.parse(_source(module).read_text())
    found = []

    def visit(node, in_try):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ImportFrom):
                targets = _resolve(module, child)
                if targets:
                    found.append((child, in_try, targets))
            elif isinstance(child, ast.Import) and any(a.name.split(".")[0] == PACKAGE for a in child.names):
                raise ValueError(f"{module}:{child.lineno}: `import {PACKAGE}…` is not supported in model code; "
                                 f"use `from {PACKAGE}.x import y`")
            visit(child, in_try or isinstance(child, ast.Try))

    visit(tree, False)
    return found


def module_closure(modules: list[str]) -> list[str]:
    """The fm modules the given modules need (themselves included), in discovery order."""
    seen, todo = [], list(modules)
    while todo:
        module = todo.pop(0)
        if module in seen:
            continue
        seen.append(module)
        for _, in_try, targets in _imports(module):
            if not in_try:
                todo.extend(target for target, _ in targets)
    return seen


def rewrite(module: str, closure: list[str]) -> str:
    """The module's source with its fm imports as flat relative imports (`from .heads_annotation import X`)."""
    lines, modules = _source(module).read_text().splitlines(keepends=True), []
    for node, in_try, targets in sorted(_imports(module), key=lambda item: -item[0].lineno):
        indent = lines[node.lineno - 1][: node.col_offset]
        names = ", ".join(a.name + (f" as {a.asname}" if a.asname else "") for a in node.names)
        target, bound = targets[0]
        if in_try and any(t not in closure for t, _ in targets):  # optional, not exported: the ImportError expected
            new = f"{indent}raise ImportError({target + ' is not part of the exported model code'!r})\n"
        elif bound is not None:  # `from fm.heads import annotation`: the module itself
            new = f"{indent}from . import " + ", ".join(f"{flat_name(t)} as {b}" for t, b in targets) + "\n"
            modules.extend(flat_name(t) for t, _ in targets)
        else:
            new = f"{indent}from .{flat_name(target)} import {names}\n"
        lines[node.lineno - 1: node.end_lineno] = [new]
    if modules:  # transformers copies the files named by `from .x import`; it does not see `from . import x`
        lines.append("\n\nif False:  # written by fm/remote_code.py: lists those files for transformers' copier\n")
        lines.extend(f"    from .{m} import __name__  # noqa: F401\n" for m in dict.fromkeys(modules))
    return "".join(lines)


def third_party_imports(source: str) -> set[str]:
    """Top-level packages a written module needs as transformers' check_imports sees them (try blocks skipped)."""
    from transformers.dynamic_module_utils import get_imports

    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(source)
    try:
        found = set(get_imports(f.name))
    finally:
        Path(f.name).unlink()
    return {m for m in found if m not in sys.stdlib_module_names and m != "__future__"}


def write_model_code(classes: list[type], directory: str | Path) -> dict[str, str]:
    """Write the import closure of `classes` flat into `directory`; returns {class name: "flat_module.Class"}."""
    directory = Path(directory)
    modules = module_closure([c.__module__ for c in classes])
    for module in modules:
        source = rewrite(module, modules)
        extra = third_party_imports(source) - THIRD_PARTY
        if extra:
            raise ValueError(f"{module}: the exported model code would need {sorted(extra)} (only "
                             f"{sorted(THIRD_PARTY)} and the standard library are allowed): import them lazily "
                             "inside a try block or move the code out of the model's import closure")
        (directory / f"{flat_name(module)}.py").write_text(source)
    return {c.__name__: f"{flat_name(c.__module__)}.{c.__name__}" for c in classes}


__all__ = ["THIRD_PARTY", "flat_name", "module_closure", "rewrite", "third_party_imports", "write_model_code"]
