"""`fm bench` runs end to end at a tiny size and reports consistent figures (speeds themselves are benchmarks,
never asserted)."""
from __future__ import annotations

from conftest import KANG, real_file

from fm.bench import real_flops, run_bench


def test_real_flops_counts_tokens_not_padding():
    import numpy as np

    one = real_flops(np.array([100]), 64, 2, 128)
    assert real_flops(np.array([100, 100]), 64, 2, 128) == 2 * one
    assert real_flops(np.array([200]), 64, 2, 128) > 2 * one  # attention grows with the square of the length


def test_bench_runs_at_debug_size(capsys):
    res = run_bench(size="debug", data=str(real_file(KANG)), n_cells=16, batch_size=8, train_batch=4, train_batches=1,
                    reps=1, min_genes=0, vs_scgpt=None, max_genes=256, profile=0, compile_blocks=False)
    out = capsys.readouterr().out
    assert "| fm.embed cells/s |" in out and "fp32 matmul peak" in out
    assert res["embed_cells_s"] > 0 and res["train_tokens_s"] > 0 and res["peak_fp32_gflops"] > 0
    assert 0 < res["embed_gflops"] < 10 * res["peak_fp32_gflops"]
