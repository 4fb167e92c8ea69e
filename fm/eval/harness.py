"""Suite YAML → results: validate the suite, resolve the profile, loop seeds × datasets, run every
method of the task module on what its `prepare` shares (FM methods once per --model, every method
timed), score each output, hand the rows to the report writer.

A suite is strict (unknown keys are errors) because a typo such as `label_kye` would otherwise
silently evaluate the wrong thing. The format is documented in eval/README.md.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import pandas as pd
import yaml

from fm.eval.context import EvalContext, timed
from fm.eval.controls import RANDOM_INIT, SCRATCH, row_name
from fm.eval.registry import get_task
from fm.progress import progress_bar

log = logging.getLogger("fm.eval")

PROFILES = ("ci", "cpu", "full")
SUITE_KEYS = {"task", "description", "seeds", "methods", "datasets", "profiles", "caps"}
PROFILE_KEYS = {"datasets", "methods", "seeds", "caps"}
DATASET_KEYS = {"name", "file", "label_key", "batch_key", "max_cells", "split", "description", "layer", "use_raw",
                "keep_spike_ins"}
COLUMNS = ["task", "dataset", "method", "metric", "value", "seed", "runtime_s"]


def is_fm_method(name: str) -> bool:
    """FM methods (names starting with 'fm') run once per --model and are skipped without one."""
    return name == "fm" or name.startswith("fm_")


def _fail(path, msg):
    raise ValueError(f"{path}: {msg}")


def load_suite(path: str | Path) -> dict:
    """Read and validate a suite file; returns the parsed dict (task module attached as '_module')."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"suite file {path} not found")
    suite = yaml.safe_load(path.read_text()) or {}
    if not isinstance(suite, dict):
        _fail(path, "a suite is a mapping with keys task, datasets, methods, profiles")
    unknown = set(suite) - SUITE_KEYS
    if unknown:
        _fail(path, f"unknown top-level keys {sorted(unknown)}; allowed: {sorted(SUITE_KEYS)}")
    for key in ("task", "datasets", "methods"):
        if key not in suite:
            _fail(path, f"missing required key {key!r}")
    module = get_task(suite["task"])
    allowed = DATASET_KEYS | set(module.DATASET_KEYS)
    names = []
    for i, entry in enumerate(suite["datasets"]):
        if not isinstance(entry, dict) or "name" not in entry or "file" not in entry:
            _fail(path, f"datasets[{i}] needs at least 'name' and 'file'")
        bad = set(entry) - allowed
        if bad:
            _fail(path, f"dataset {entry['name']!r}: unknown keys {sorted(bad)}; allowed: {sorted(allowed)}")
        names.append(entry["name"])
    if len(set(names)) != len(names):
        _fail(path, f"duplicate dataset names in {names}")
    for m in suite["methods"]:
        if m not in module.METHODS:
            _fail(path, f"unknown method {m!r} for task {suite['task']}; known: {sorted(module.METHODS)}")
    for prof, spec in (suite.get("profiles") or {}).items():
        if prof not in PROFILES:
            _fail(path, f"unknown profile {prof!r}; allowed: {list(PROFILES)}")
        spec = spec or {}
        bad = set(spec) - PROFILE_KEYS
        if bad:
            _fail(path, f"profile {prof!r}: unknown keys {sorted(bad)}; allowed: {sorted(PROFILE_KEYS)}")
        for d in spec.get("datasets", []):
            if d not in names:
                _fail(path, f"profile {prof!r} names dataset {d!r}, not in datasets {names}")
        for m in spec.get("methods", []):
            if m not in suite["methods"]:
                _fail(path, f"profile {prof!r} names method {m!r}, not in methods {suite['methods']}")
    suite["_module"] = module
    suite["_path"] = str(path)
    return suite


def resolve_profile(suite: dict, profile: str, seeds: list[int] | None = None, methods: list[str] | None = None,
                    datasets: list[str] | None = None) -> dict:
    """The datasets, methods, seeds and caps one profile runs (profile values override the top level;
    `seeds` / `methods` / `datasets` given by the caller override the profile: a subset of the suite)."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; allowed: {list(PROFILES)}")
    spec = (suite.get("profiles") or {}).get(profile) or {}
    names = [d["name"] for d in suite["datasets"]]
    for given, allowed, what in ((methods, suite["methods"], "methods"), (datasets, names, "datasets")):
        unknown = sorted(set(given or ()) - set(allowed))
        if unknown:
            raise ValueError(f"--{what} {unknown} not in the suite's {what}: {list(allowed)}")
    wanted = datasets or spec.get("datasets")
    chosen = [d for d in suite["datasets"] if wanted is None or d["name"] in wanted]
    caps = {**(suite.get("caps") or {}), **(spec.get("caps") or {})}
    return {"datasets": chosen, "methods": list(methods or spec.get("methods", suite["methods"])),
            "seeds": list(seeds if seeds is not None else spec.get("seeds", suite.get("seeds", [0]))),
            "caps": caps}


def method_runs(method: str, ctx: EvalContext, seed: int) -> list[tuple[str, Path | None, bool]]:
    """(label, model_dir, is_twin) of each run of a method: a baseline once (label = its name, model_dir
    None); an FM method once per checkpoint and, with ctx.controls, once more on its random-init twin
    for this seed (fm.eval.controls; the row is named after the run, see run_task)."""
    if not is_fm_method(method):
        return [(method, None, False)]
    runs = []
    for m in ctx.models:
        label = EvalContext.model_label(m)
        runs.append((label, m, False))
        if ctx.controls:
            runs.append((label, ctx.random_init_twin(m, seed), True))
    return runs


def run_task(module, dataset: dict, methods: list[str], seed: int, ctx: EvalContext, bar=None) -> list[dict]:
    """One dataset × seed of a task module → rows {dataset, method, metric, value, runtime_s}.

    `module.prepare` builds what every method shares (cells, split, genes, truth) once; each method
    is `METHODS[name](prepared, ctx)`, FM ones `(prepared, ctx, model_dir)` (rows `name[<model>]`, and
    with controls `name[<model>:random_init]` or, when the method fine-tuned, `name[<model>:scratch]`
    on the random-init twin — fm.eval.controls), timed alone (runtime_s),
    and returns an output that `module.score` turns into metrics, or None to skip itself (it says
    why). `module.finalize(prepared, outputs)`, where defined, adds metrics that need every method's
    output at once (agreement between methods, one scib-metrics pass); its rows come last.
    `bar` (a tqdm, optional) advances by one per method run.
    """
    prepared = module.prepare(dataset, seed, ctx)
    finalize = getattr(module, "finalize", None)
    rows, outputs, runtimes = [], {}, {}

    def add(name, values):
        rows.extend({"dataset": dataset["name"], "method": name, "metric": metric, "value": float(value),
                     "runtime_s": runtimes[name]} for metric, value in values.items())

    for method in methods:
        fn = module.METHODS[method]
        for label, model_dir, twin in method_runs(method, ctx, seed):
            calls = ctx.finetune_calls
            if bar is not None:
                bar.set_postfix_str(f"{dataset['name']} seed {seed}: {label}", refresh=False)
            with timed() as t:
                output = fn(prepared, ctx) if model_dir is None else fn(prepared, ctx, model_dir)
            if bar is not None:
                bar.update(1)
            if output is None:
                continue
            control = (SCRATCH if ctx.finetune_calls > calls else RANDOM_INIT) if twin else None
            name = label if model_dir is None else row_name(method, label, control)
            runtimes[name] = t.seconds
            values = module.score(prepared, output)
            add(name, values)
            main = f", {module.MAIN_METRIC} {values[module.MAIN_METRIC]:.4g}" if module.MAIN_METRIC in values else ""
            log.info("%s %s %s seed %d%s (%.1f s)", module.__name__.rsplit(".", 1)[-1], dataset["name"], name, seed,
                     main, t.seconds)
            if finalize is not None:
                outputs[name] = output
    if finalize is not None:
        for name, values in finalize(prepared, outputs).items():
            add(name, values)
    return rows


def run_suite(suite_path, profile: str = "cpu", models=(), output_dir="runs/eval", seeds=None,
              data_dir=None, write: bool = True, controls: bool = True, methods=None, datasets=None,
              progress: bool | None = None, keep_checkpoints: bool = False) -> pd.DataFrame:
    """Run one suite and (by default) write results.csv, results.md, plots and meta.json.

    `controls` (default on) adds the random-init twin rows of every FM method (fm.eval.controls);
    they cost as much again as the FM methods themselves. `progress`: a bar of method runs
    (methods × datasets × seeds) on stderr (None: when stderr is a TTY; fm.progress). `keep_checkpoints`:
    keep the harness fine-tunes' training checkpoints (default: only their exported models).

    A dataset × seed that fails is logged and left out; the others still run, results.csv is rewritten after
    each one (a killed run keeps what finished), the report names the failures (meta.json "failures"), and
    the call then raises EvalFailed — so a late failure never discards finished results.

    Returns the tidy results (task, dataset, method, metric, value, seed, runtime_s).
    """
    from fm.paths import data_dir as default_data_dir

    t0 = time.perf_counter()
    suite = load_suite(suite_path)
    module = suite["_module"]
    plan = resolve_profile(suite, profile, seeds, methods, datasets)
    methods_given = methods
    models = [Path(m) for m in models]
    for m in models:
        if not (m / "config.json").is_file():
            raise FileNotFoundError(f"--model {m}: no config.json — pass an exported model directory (runs/<name>/model)")
    methods = [m for m in plan["methods"] if models or not is_fm_method(m)]
    skipped = [m for m in plan["methods"] if m not in methods]
    if skipped:
        log.info("no --model given: skipping FM methods %s", skipped)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    ctx = EvalContext(output_dir=output_dir, profile=profile, models=models,
                      data_dir=Path(data_dir) if data_dir else default_data_dir(), caps=plan["caps"],
                      controls=controls, keep_checkpoints=keep_checkpoints)
    rows, failures = [], []
    per_seed = sum(len(models) * (1 + bool(controls)) if is_fm_method(m) else 1 for m in methods)  # = method_runs
    n_runs = per_seed * len(plan["datasets"]) * len(plan["seeds"])
    with progress_bar(n_runs, f"eval {suite['task']}", "runs", progress) as bar:
        for dataset in plan["datasets"]:
            for seed in plan["seeds"]:
                log.info("%s: dataset %s, seed %d, methods %s", suite["task"], dataset["name"], seed, methods)
                done = bar.n
                try:
                    found = run_task(module, dataset, methods, seed, ctx, bar)
                except Exception as e:  # noqa: BLE001 — any failure of one dataset must not lose the others
                    failures.append({"dataset": dataset["name"], "seed": seed, "error": f"{type(e).__name__}: {e}"})
                    log.error("%s: dataset %s, seed %d FAILED (%s: %s); continuing with the others", suite["task"],
                              dataset["name"], seed, type(e).__name__, e)
                    bar.update(per_seed - (bar.n - done))
                    continue
                rows.extend({"task": suite["task"], "seed": seed, **row} for row in found)
                if write:  # what finished survives a later failure or a kill
                    _tidy(rows).to_csv(output_dir / "results.csv", index=False)
    df = _tidy(rows)
    if write:
        from fm.eval.report import write_report

        write_report(df, output_dir, suite=suite, profile=profile, seeds=plan["seeds"], models=models,
                     caps=plan["caps"], runtime_s=time.perf_counter() - t0, fm_controls=controls and bool(models),
                     failures=failures, subset={"methods": methods_given, "datasets": datasets, "seeds": seeds})
    if failures:
        raise EvalFailed(f"{suite['task']}: {len(failures)} dataset run(s) failed: "
                         + "; ".join(f"{f['dataset']} seed {f['seed']}: {f['error']}" for f in failures)
                         + f". The results of the others are in {output_dir}/results.csv", df)
    return df


class EvalFailed(ValueError):
    """Some dataset runs of a suite failed; `.results` holds the rows of those that finished (also written)."""

    def __init__(self, message: str, results: pd.DataFrame):
        super().__init__(message)
        self.results = results


def _tidy(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    for col in COLUMNS:
        if col not in df.columns:
            df[col] = pd.Series(dtype=float)
    return df[COLUMNS]


def run_suites(suite_paths, profile="cpu", models=(), output_dir="runs/eval", seeds=None,
               controls: bool = True, methods=None, datasets=None, progress: bool | None = None,
               keep_checkpoints: bool = False) -> pd.DataFrame:
    """Several suites: each into output_dir/<task>/, plus a combined results.md at output_dir.
    `methods` / `datasets` (a subset) apply to a single suite only."""
    if len(suite_paths) == 1:
        return run_suite(suite_paths[0], profile, models, output_dir, seeds, controls=controls, methods=methods,
                         datasets=datasets, progress=progress, keep_checkpoints=keep_checkpoints)
    if methods or datasets:
        raise ValueError("--methods / --datasets pick from one suite; run the suites one at a time")
    from fm.eval.report import write_combined

    output_dir = Path(output_dir)
    t0 = time.perf_counter()
    frames, tasks, failed = [], [], []
    for path in suite_paths:
        task = load_suite(path)["task"]
        try:
            frames.append(run_suite(path, profile, models, output_dir / task, seeds, controls=controls,
                                    progress=progress, keep_checkpoints=keep_checkpoints))
        except EvalFailed as e:  # the other suites still run; the combined report shows what finished
            frames.append(e.results)
            failed.append(str(e))
        tasks.append(task)
    write_combined(output_dir, tasks, profile=profile, runtime_s=time.perf_counter() - t0)
    df = pd.concat(frames, ignore_index=True)
    if failed:
        raise EvalFailed(" | ".join(failed), df)
    return df
