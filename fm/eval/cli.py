"""`fm eval SUITE.yaml … [--profile ci|cpu|full] [--model DIR …] --output DIR` (wired into fm/cli.py)."""
from __future__ import annotations


def _cmd_eval(args) -> int:
    from fm.eval.harness import run_suites

    df = run_suites(args.suites, profile=args.profile, models=args.model or [], output_dir=args.output,
                    seeds=args.seeds, controls=not args.no_controls, methods=args.methods, datasets=args.datasets,
                    progress=False if args.quiet else None, keep_checkpoints=args.keep_checkpoints)
    where = args.output if len(args.suites) == 1 else f"{args.output}/<task>"
    print(f"{len(df)} result rows; wrote {where}/results.csv, results.md, plots and meta.json")
    return 0


def add_eval_parser(sub) -> None:
    """Register the `eval` subcommand on fm's subparsers."""
    p = sub.add_parser("eval", help="benchmark suites: baselines, controls and FM checkpoints (needs the [eval] extra)")
    p.add_argument("suites", nargs="+", help="suite YAML(s), e.g. eval/annotation.yaml; several → one subdir per task")
    p.add_argument("--profile", default="cpu", choices=["ci", "cpu", "full"],
                   help="suite size: ci (minutes, one seed), cpu (3 seeds, a 2-core machine), full (5 seeds, GPU)")
    p.add_argument("--model", action="extend", nargs="+", default=None,
                   help="exported model directory (repeatable); adds the FM methods of each suite")
    p.add_argument("--output", required=True, help="output directory")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="override the profile's seeds")
    p.add_argument("--methods", nargs="+", default=None, help="run only these of the suite's methods")
    p.add_argument("--datasets", nargs="+", default=None, help="run only these of the suite's datasets")
    p.add_argument("--no-controls", action="store_true",
                   help="skip the random-init twin rows (<method>[<model>:random_init] / [<model>:scratch]) "
                        "that every FM method gets by default")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bar (it is shown only when stderr is a terminal; FM_PROGRESS=1/0 overrides)")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep the training checkpoints of the harness's fine-tunes (default: only their exported models)")
    p.set_defaults(func=_cmd_eval)
