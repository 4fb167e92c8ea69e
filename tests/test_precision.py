"""Precision by hardware (fm/precision.py) and the fused optimizer step: bf16 only where it is native."""
from __future__ import annotations

import logging

import pytest
import torch

from fm import precision
from fm.precision import native_bf16, resolve_mixed_precision


@pytest.mark.parametrize("native", [True, False])
def test_auto_and_bf16_follow_the_cpu(monkeypatch, caplog, native):
    monkeypatch.setattr(precision, "native_bf16", lambda device: native)
    assert resolve_mixed_precision("auto", "cpu") == ("bf16" if native else "no")
    with caplog.at_level(logging.WARNING, logger="fm"):
        assert resolve_mixed_precision("bf16", "cpu") == ("bf16" if native else "no")
    warned = [r for r in caplog.records if "without native bf16" in r.getMessage()]
    assert len(warned) == (0 if native else 1)
    assert resolve_mixed_precision("no", "cpu") == "no"


def test_native_bf16_reads_the_cpu_flags():
    flags = open("/proc/cpuinfo").read() if __import__("os").path.exists("/proc/cpuinfo") else None
    if flags is None:
        pytest.skip("no /proc/cpuinfo")
    expected = "avx512_bf16" in flags or "amx_bf16" in flags or "amx_tile" in flags
    assert native_bf16("cpu") == expected


def test_training_uses_the_fused_adamw(tmp_path, small_h5ad_path, monkeypatch):
    """The loop builds AdamW with fused=True on CPU (train.fused_optimizer), and it trains."""
    from conftest import tiny_overrides

    from fm.config import load_config
    from fm.paths import recipe_path
    from fm.pretrain import run_pretraining

    seen = {}
    original = torch.optim.AdamW.__init__

    def spy(self, params, **kw):
        seen.update(kw)
        original(self, params, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "__init__", spy)
    cfg = load_config(recipe_path("debug"), tiny_overrides(tmp_path / "run", [small_h5ad_path], steps=2))
    run_pretraining(cfg)
    assert seen.get("fused") is True


def test_inference_autocasts_bf16_on_gpus_only(monkeypatch):
    from fm.inference import inference_precision

    model = torch.nn.Linear(2, 2)
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    assert not isinstance(inference_precision(torch.device("cpu"), model), torch.autocast)  # CPU: fp32, exact
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constructing a CUDA autocast on a machine without CUDA warns
        ctx = inference_precision(torch.device("cuda"), model)
    assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.bfloat16
    monkeypatch.setenv("FM_INFERENCE_FP32", "1")
    assert not isinstance(inference_precision(torch.device("cuda"), model), torch.autocast)

