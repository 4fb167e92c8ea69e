"""Where things live: the real-data directory (one setting) and the shipped vocabulary."""
from __future__ import annotations

import os
from pathlib import Path

DATA_DIR_ENV = "FM_DATA_DIR"
_REPO_ROOT = Path(__file__).resolve().parents[1]


def data_dir() -> Path:
    """The real-data directory: $FM_DATA_DIR, else `../shared/data` beside the project checkout.

    Relative paths are taken from the current directory; the default is tried from the
    current directory first, then beside the source checkout (editable installs), so the
    README commands work from the repo root and tests work from anywhere.
    """
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env).expanduser().resolve()
    for base in (Path.cwd(), _REPO_ROOT):
        candidate = (base / ".." / "shared" / "data").resolve()
        if candidate.is_dir():
            return candidate
    return (Path.cwd() / ".." / "shared" / "data").resolve()


def fixtures_dir() -> Path:
    """The checkpoint fixtures (scGPT / Geneformer formats with reference outputs): $FM_FIXTURES_DIR, else
    `fixtures/` beside the data directory (../shared/fixtures)."""
    env = os.environ.get("FM_FIXTURES_DIR")
    return Path(env).expanduser().resolve() if env else data_dir().parent / "fixtures"


def h5ad_path(name: str) -> Path:
    """Path of a named file in the data directory's h5ad/ folder (may not exist)."""
    return data_dir() / "h5ad" / name


def vocab_dir() -> Path:
    """Directory holding the gene-vocabulary artifacts: inside the wheel, else the checkout's tokenizers/."""
    shipped = Path(__file__).resolve().parent / "_vocab"
    if (shipped / "tokenizer_config.json").is_file():
        return shipped
    return _REPO_ROOT / "tokenizers"


def recipe_path(name_or_path: str | Path) -> Path:
    """A recipe file: an existing path as given, else a shipped recipe by name ('debug' → pretrain/debug.yaml)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    for root in (Path(__file__).resolve().parent / "_recipes", _REPO_ROOT / "recipes"):
        for candidate in (root / path, root / "pretrain" / f"{path}.yaml", root / "finetune" / f"{path}.yaml",
                          root / f"{path}.yaml"):
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(f"recipe not found: {name_or_path} (a YAML path, or a shipped name like 'debug')")


def remove_stale_temp_files(directory: str | Path) -> list[Path]:
    """Delete `.tmp*` files a killed writer left in `directory` (safetensors writes `.tmpXXXXXX` beside the target
    and renames it; a kill in between leaves it behind, and no later save removes it). Returns what was removed."""
    removed = [p for p in Path(directory).glob(".tmp*") if p.is_file()]
    for p in removed:
        p.unlink(missing_ok=True)
    return removed


def respect_umask(*paths: str | Path) -> None:
    """Give files the mode the user's umask asks for (0644 under umask 022): temp-file-then-rename writers
    (tempfile.mkstemp, safetensors) create 0600 files, which other users of a shared model directory cannot read.
    Directories are walked; only regular files are changed."""
    mask = os.umask(0)
    os.umask(mask)
    mode = 0o666 & ~mask
    for path in map(Path, paths):
        for p in ([path] if path.is_file() else path.rglob("*") if path.is_dir() else []):
            if p.is_file() and (p.stat().st_mode & 0o777) != mode:
                p.chmod(mode)
