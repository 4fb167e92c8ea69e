"""One module per task; each defines MAIN_METRIC, HIGHER_IS_BETTER, CONTROLS, DATASET_KEYS,
METHODS (name → function), `prepare(dataset, seed, ctx)`, `score(prepared, output)` and optionally
`finalize(prepared, outputs)`; the harness runs them (fm/eval/harness.py `run_task`, eval/README.md)."""
