"""Worker for tests/test_distributed.py: the toy early-stopping run of tests/test_train.py (one weight,
held-out loss falls then rises) under `accelerate launch`; each rank writes what it decided to
OUT/rank<R>.json, so the test checks that every rank stopped at the same step with the same best.

    accelerate launch --config_file recipes/accelerate/ddp.yaml tests/dist_early_stop.py OUT
"""
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train import _toy_run

out = Path(sys.argv[1])
result, exported = _toy_run(out, early_stopping_patience=3, batch_size=4)  # 2 × 4 = the 1-process test's 8
rank = int(os.environ.get("RANK", "0"))
(out / f"rank{rank}.json").write_text(json.dumps({
    "world": int(os.environ.get("WORLD_SIZE", "1")), "step": result.step, "best_step": result.best_step,
    "early_stopped": result.early_stopped, "theta": float(exported["theta.weight"]) if exported else None}))
