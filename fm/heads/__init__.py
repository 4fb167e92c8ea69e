"""Task heads on the scfm backbone: one `ScFMFor<Task>` class per task in fm/heads/<task>.py.

See fm/heads/annotation.py for the pattern every head follows. The task registry
(fm.tasks.registry) names each task's head; fm.load finds a head there by config.architectures[0],
importing only that head's module.
"""
from __future__ import annotations

IGNORE_INDEX = -100
"""Label of a cell (or position) without a target: skipped by the loss (PyTorch's cross-entropy default)."""

__all__ = ["IGNORE_INDEX"]
