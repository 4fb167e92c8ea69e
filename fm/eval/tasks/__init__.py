"""One module per task; each defines MAIN_METRIC, HIGHER_IS_BETTER, CONTROLS, METHODS and
`run(dataset, methods, seed, ctx) -> list[dict]` (see fm/eval/registry.py and eval/README.md)."""
