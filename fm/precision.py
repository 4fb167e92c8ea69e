"""Precision that fits the hardware: bf16 only where it is computed natively.

On CPUs without AVX512-BF16 or AMX (e.g. AVX2-only machines), PyTorch emulates bf16 and autocast/bf16 weights
run 3.5–5× slower than fp32 (measured on such a 2-core machine, DESIGN.md "Known traps"); on CPUs with
AVX512-BF16 a bf16 matmul ran 2.3× faster than fp32 (eval/perf/RESULTS.md). So `train.mixed_precision=auto`
asks the hardware, and an explicit 'bf16' on a CPU without it falls back to fp32 with one warning.
"""
from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger("fm")


def training_device() -> torch.device:
    """The device accelerate will train on: CUDA when present and not forced off (ACCELERATE_USE_CPU)."""
    forced_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return torch.device("cuda" if torch.cuda.is_available() and not forced_cpu else "cpu")


def native_bf16(device: torch.device | str) -> bool:
    """True where bf16 matmuls run natively: CUDA devices that support bf16, CPUs with AVX512-BF16 or AMX."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)
    return False


def resolve_mixed_precision(requested: str, device: torch.device | str | None = None) -> str:
    """The accelerate mixed_precision to use for `requested` (no | bf16 | fp16 | auto) on `device`."""
    device = torch.device(device) if device is not None else training_device()
    if requested == "auto":
        chosen = "bf16" if native_bf16(device) else "no"
        log.info("train.mixed_precision=auto: %s on %s", "bf16" if chosen == "bf16" else "fp32", device.type)
        return chosen
    if requested == "bf16" and device.type == "cpu" and not native_bf16(device):
        log.warning("train.mixed_precision=bf16 on a CPU without native bf16 (no AVX512-BF16/AMX): emulated bf16 is "
                    "several times slower than fp32 here, so this run uses fp32 (set 'auto' to choose silently)")
        return "no"
    return requested


__all__ = ["native_bf16", "resolve_mixed_precision", "training_device"]
