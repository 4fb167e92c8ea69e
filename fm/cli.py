"""`fm` command line: pretrain | finetune | embed | convert | demo | eval | corpus | bench."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("anndata", "h5py", "urllib3", "filelock", "fsspec", "accelerate"):  # accelerate: INFO per checkpoint
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _quiet_deepspeed_on_cpu() -> None:
    """DeepSpeed is imported by accelerate / transformers whenever it is installed (saving any model unwraps it
    through accelerate), and then warns "Setting accelerator to CPU" on every CPU-only command. Naming the CPU
    accelerator up front — what DeepSpeed would detect anyway — silences it; a GPU machine and a user's own
    DS_ACCELERATOR are left alone."""
    if "DS_ACCELERATOR" in os.environ:
        return
    import torch

    gpu = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available()) or \
        torch.backends.mps.is_available()
    if not gpu:
        os.environ["DS_ACCELERATOR"] = "cpu"


def _report_run(result, cfg, label: str) -> int:
    """Exit code and one summary line per job (rank 0) for a training run of any kind."""
    from fm.train import EXIT_PREEMPTED

    code = EXIT_PREEMPTED if result.stopped else 0  # SIGTERM: checkpoint saved; the job script requeues
    if os.environ.get("RANK", "0") != "0":
        return code
    if result.stopped:
        print(f"stopped by signal at step {result.step}; checkpoint saved in {cfg.train.output_dir}; "
              "rerun with --resume")
    elif result.history:
        first, last = result.history[0], result.history[-1]
        print(f"{label}: steps {result.step}; loss {first['loss']:.4f} (step {int(first['step'])}) → "
              f"{last['loss']:.4f} (step {int(last['step'])}); model: {result.export_dir}")
    return code


def _cmd_pretrain(args) -> int:
    from fm.config import load_config
    from fm.paths import recipe_path
    from fm.pretrain import run_pretraining

    cfg = load_config(recipe_path(args.recipe), args.overrides)
    return _report_run(run_pretraining(cfg, resume=args.resume), cfg, "pretrain")


def _cmd_finetune(args) -> int:
    from fm.config import load_config
    from fm.paths import recipe_path
    from fm.tasks import run_finetune

    cfg = load_config(recipe_path(args.recipe), args.overrides)
    return _report_run(run_finetune(cfg, resume=args.resume), cfg, cfg.task.name)


def _cmd_embed(args) -> int:
    import anndata as ad

    import fm
    from fm.data import open_anndata
    from fm.paths import respect_umask

    model = fm.load(args.model, device=args.device)
    model.cell_tokenizer.allow_untrained_genes = args.allow_untrained_genes
    adata = open_anndata(args.input, backed=False)
    try:
        fm.embed(adata, model, batch_size=args.batch_size, key_added=args.key, progress=True,
                 drop_empty=args.drop_empty, layer=args.layer, use_raw=args.use_raw, gene_key=args.gene_key,
                 allow_non_counts=True if args.allow_non_counts else None)
    except (ValueError, KeyError) as e:  # name the file: the API's messages say "input"
        text = str(e.args[0] if isinstance(e, KeyError) and e.args else e)
        text = f"{args.input}:{text[len('input:'):]}" if text.startswith("input:") else f"{args.input}: {text}"
        raise type(e)(text) from e
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    # write beside the target then rename: an interrupted write never clobbers an existing file
    fd, tmp = tempfile.mkstemp(suffix=".h5ad", dir=out.parent)
    os.close(fd)
    try:
        ad.AnnData.write_h5ad(adata, tmp)
        respect_umask(tmp)  # mkstemp creates 0600
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)
    print(f"wrote {out}: obsm[{args.key!r}] {adata.obsm[args.key].shape}")
    return 0


def _cmd_convert(args) -> int:
    from fm.convert import FORMATS, convert

    if args.to:
        if len(args.paths) != 2:
            raise ValueError("usage: fm convert --to scgpt MODEL_DIR OUT (an scfm export with scGPT's architecture)")
        from fm.convert.scgpt import export_scgpt

        out = export_scgpt(*args.paths)
        print(f"wrote {out}: scGPT's args.json, vocab.json, best_model.pt")
        return 0
    if len(args.paths) != 3 or args.paths[0] not in FORMATS:
        raise ValueError(f"usage: fm convert {{{','.join(FORMATS)}}} SRC OUT [--dictionaries DIR], or fm convert "
                         "--to scgpt MODEL_DIR OUT")
    fmt, src, out = args.paths
    if args.dictionaries and fmt != "geneformer":
        raise ValueError("--dictionaries is for geneformer checkpoints only")
    out = convert(fmt, src, out, args.dictionaries)
    from fm.convert.common import REPORT_FILE

    report = json.loads((out / REPORT_FILE).read_text())
    print(f"wrote {out}: an scfm export of the {fmt} checkpoint {src}\n  {report.get('summary', '')}")
    return 0


def _cmd_demo(args) -> int:
    from fm.demo import run_demo

    return run_demo(output_dir=args.output_dir, overrides=args.overrides)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("scfm")
    except PackageNotFoundError:  # a source checkout on PYTHONPATH, not installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fm", description="scfm: single-cell foundation models")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug-level logging and full tracebacks")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="pretrain from a recipe (YAML) with dotted overrides")
    p.add_argument("recipe", help="recipe YAML path, or a shipped name such as 'debug' or 'base'")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.max_steps=20")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in train.output_dir")
    p.set_defaults(func=_cmd_pretrain)

    from fm.tasks.registry import TASKS

    p = sub.add_parser("finetune", help=f"fine-tune a task head (task.name: {' | '.join(TASKS)}) from model.init_from=DIR")
    p.add_argument("recipe", help="recipe YAML path, e.g. recipes/finetune/annotation.yaml")
    p.add_argument("overrides", nargs="*", help="section.key=value; model.init_from=<exported model dir> is required")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in train.output_dir")
    p.set_defaults(func=_cmd_finetune)

    p = sub.add_parser("embed", help="zero-shot cell embeddings into obsm of an .h5ad")
    p.add_argument("--model", required=True,
                   help="exported model directory, or a scGPT / Geneformer checkpoint directory as released")
    p.add_argument("--input", required=True, help=".h5ad of raw counts (cells x genes)")
    p.add_argument("--output", required=True, help=".h5ad to write: the input plus obsm[KEY]")
    p.add_argument("--key", "--key-added", dest="key", default="X_fm", help="obsm key of the embedding")
    p.add_argument("--batch-size", type=int, default=64, help="cells per forward pass (default 64)")
    p.add_argument("--device", default=None, help="torch device, e.g. cpu, cuda, cuda:1 (default: cpu)")
    p.add_argument("--drop-empty", action="store_true", help="give cells without vocabulary genes NaN rows")
    p.add_argument("--layer", default=None, help="read counts from adata.layers[LAYER] instead of X")
    p.add_argument("--use-raw", action="store_true", help="read counts and genes from adata.raw")
    p.add_argument("--gene-key", default=None, help="var column holding gene symbols / Ensembl IDs (default: var_names)")
    p.add_argument("--allow-non-counts", action="store_true", help="accept non-integer values (binned as they are)")
    p.add_argument("--allow-untrained-genes", action="store_true",
                   help="embed even when most input genes are ones the model never trained on (another species/panel)")
    p.set_defaults(func=_cmd_embed)

    p = sub.add_parser("convert", help="import a scGPT / Geneformer checkpoint as an scfm export (or export to scGPT)")
    p.add_argument("paths", nargs="+", metavar="FORMAT SRC OUT", help="scgpt|geneformer SRC OUT; with --to: MODEL_DIR OUT")
    p.add_argument("--dictionaries", default=None,
                   help="geneformer: directory of the token and gene-median dictionaries (default: SRC, then its parent)")
    p.add_argument("--to", choices=["scgpt"], default=None, help="export an scfm model in this checkpoint format")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("demo", help="the end-to-end job: pretrain the debug recipe, embed, write .h5ad, summarise")
    p.add_argument("--output-dir", default="runs/demo", help="run directory (default runs/demo); an earlier demo there is reused")
    p.add_argument("overrides", nargs="*", help="recipe overrides, e.g. train.max_steps=50")
    p.set_defaults(func=_cmd_demo)
    __import__("fm.eval.cli", fromlist=["add_eval_parser"]).add_eval_parser(sub)
    __import__("fm.bench", fromlist=["add_bench_parser"]).add_bench_parser(sub)
    __import__("fm.data.corpus_cli", fromlist=["add_corpus_parser"]).add_corpus_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    _quiet_deepspeed_on_cpu()
    try:
        return args.func(args)
    except (ValueError, KeyError, FileNotFoundError, FileExistsError, TypeError) as e:
        if args.verbose:
            raise
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"fm {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
