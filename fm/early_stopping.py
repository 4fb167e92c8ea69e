"""Early stopping on held-out cells, and the best-on-validation weights (used by fm/train.py).

Why: a fine-tune on a few thousand cells over-fits (or stops gaining) long before a fixed step budget
runs out, and the last weights are then not the best ones. So the loop watches one held-out value
(`train.early_stopping_metric`, lower is better — by default the validation loss), stops after
`train.early_stopping_patience` evaluations in a row without a new best, and exports the weights of
the best evaluation instead of the last.

- Every rank decides alike without another collective: the watched value comes from
  `fm.train.evaluate`, which reduces over processes, so every rank sees the same number.
- The best weights are a CPU copy of `accelerator.get_state_dict(model)` (collective: every rank
  calls `capture`; ZeRO-3 gathers the shards) kept on the main process, and written into each
  checkpoint (BEST_WEIGHTS, before trainer_state.json marks it complete) with the tracker's state
  in trainer_state.json, so `--resume` continues with the same best, count and weights.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

log = logging.getLogger("fm")
BEST_WEIGHTS = "best_weights.pt"


@dataclass
class EarlyStopping:
    """Tracks the best held-out value, the evaluations since it, and its weights (main process only)."""

    patience: int
    """Evaluations without improvement before stopping; 0 = off (nothing tracked, the last weights export)."""
    metric: str = "eval_loss"
    best: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    stopped_at: int | None = None
    """The step at which patience ran out (None while training may continue)."""
    weights: dict | None = field(default=None, repr=False)

    @property
    def enabled(self) -> bool:
        return self.patience > 0

    @property
    def should_stop(self) -> bool:
        return self.stopped_at is not None

    def update(self, metrics: dict[str, float], step: int, count: bool = True) -> bool:
        """Record one evaluation; True when it is a new best (then call `capture`). `count=False` (the
        final evaluation) can set a new best but never stops the run. A non-finite value never improves."""
        if not self.enabled or not metrics:
            return False
        if self.metric not in metrics:
            raise KeyError(f"train.early_stopping_metric={self.metric!r} is not among the held-out values "
                           f"{sorted(metrics)}")
        value = float(metrics[self.metric])
        if math.isfinite(value) and (self.best is None or value < self.best):
            self.best, self.best_step, self.bad_evals = value, step, 0
            return True
        if count:
            self.bad_evals += 1
            if self.bad_evals >= self.patience:
                self.stopped_at = step
        return False

    def capture(self, accelerator, model) -> None:
        """Copy the current weights as the best (collective: call on every rank)."""
        state_dict = accelerator.get_state_dict(model)
        if accelerator.is_main_process:
            self.weights = {k: v.detach().to("cpu", copy=True) for k, v in state_dict.items()}

    def state(self) -> dict:
        """What trainer_state.json keeps (the weights go to BEST_WEIGHTS beside it)."""
        return {"metric": self.metric, "patience": self.patience, "best": self.best, "best_step": self.best_step,
                "bad_evals": self.bad_evals, "stopped_at": self.stopped_at}

    def checkpoint_files(self) -> dict[str, object]:
        """Objects save_checkpoint writes into a checkpoint (main process)."""
        return {BEST_WEIGHTS: self.weights} if self.weights is not None else {}

    def restore(self, state: dict | None, ckpt: Path, main: bool) -> None:
        """Continue from a checkpoint's tracker state and best weights (a run saved with the same metric)."""
        if not self.enabled or not state:
            return
        if state.get("metric") != self.metric:
            log.warning("resume: the checkpoint tracked %s, this run %s; the best so far is forgotten",
                        state.get("metric"), self.metric)
            return
        self.best, self.best_step = state["best"], state["best_step"]
        self.bad_evals, self.stopped_at = state["bad_evals"], state["stopped_at"]
        if main and (ckpt / BEST_WEIGHTS).is_file():
            self.weights = torch.load(ckpt / BEST_WEIGHTS, map_location="cpu", weights_only=True)

    def describe_stop(self, step: int, epoch: int) -> str:
        return (f"early stopping at step {step} (epoch {epoch}): {self.metric} has not improved for "
                f"{self.bad_evals} evaluation(s) (train.early_stopping_patience={self.patience}); best "
                f"{self.best:.4f} at step {self.best_step}")
