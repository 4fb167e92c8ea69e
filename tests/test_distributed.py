"""Distributed training, launched for real: `accelerate launch` processes on CPU over gloo (DDP as
MULTI_CPU), DeepSpeed ZeRO-2/3 on CPU, two "nodes" on 127.0.0.1 through slurm/pretrain.sbatch with
a stand-in srun, SIGKILL + resume on another world size, SIGTERM → checkpoint → requeue → resume.

Every run is a tiny model (d_model 32, 2 layers, 64 genes) on small_h5ad_path's cells (real PBMC when
the shared data is there, else conftest's generated stand-in) for STEPS optimizer
steps with the same global batch of 16 cells and seed, so all runs are comparable step by step with
the 1-process reference. World size, distributed type, ranks, node ranks and per-rank micro-batch
and cell counts are read from trainer_state.json, written inside the run: a job that silently
trained N independent copies (or one process) fails here.

Tolerances: 2 processes × 8 cells vs 1 × 16 differ only by float summation order and by how the
masked-token mean is weighted (mean of rank means, see fm.train._log_row): losses agree within
LOSS_RTOL = 1e-3 over the first COMPARE steps (the gap is largest when ranks score unequal
masked-token counts) and within 5% over the whole run; LR is identical. The same world size
preempted and resumed is exact (SAME_RTOL = 1e-4). The module takes a few minutes on 2 cores.
"""
from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_overrides

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: accelerate, python
STEPS, COMPARE = 24, 10
LOSS_RTOL, SAME_RTOL = 1e-3, 1e-4
TIMEOUT = 300
DATA: Path  # small_h5ad_path, set by _data below


@pytest.fixture(scope="module", autouse=True)
def _data(small_h5ad_path):
    global DATA
    DATA = small_h5ad_path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra) -> dict:
    e = {k: v for k, v in os.environ.items() if k not in
         ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU", "DS_ACCELERATOR")}
    e.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", PATH=f"{BIN}:{e.get('PATH', '')}",
             FM_DATA_DIR=str(DATA.parents[1]))
    e.update(extra)
    return e


CPU = {"ACCELERATE_USE_CPU": "1"}  # DDP on CPU = MULTI_CPU over gloo (DESIGN "Known traps")
DS = {"DS_ACCELERATOR": "cpu"}  # NOT ACCELERATE_USE_CPU: it would silently turn DeepSpeed into MULTI_CPU


def overrides(out: Path, batch: int, **extra) -> list[str]:
    return tiny_overrides(out, [DATA], STEPS, **{"train.batch_size": batch, "train.save_every": 10,
                                                             "train.save_total_limit": 10, **extra})


def accelerate(config: str, nproc: int, *args: str) -> list[str]:
    return [str(BIN / "accelerate"), "launch", "--config_file", f"recipes/accelerate/{config}.yaml",
            "--num_processes", str(nproc), "--main_process_port", str(free_port()), *args]


def pretrain(*args: str) -> list[str]:
    return ["-m", "fm.cli", "pretrain", "debug", *args]


def run(cmd: list[str], environ: dict, log: Path, check: bool = True) -> subprocess.CompletedProcess:
    with log.open("a") as f:
        p = subprocess.run(cmd, cwd=REPO, env=environ, stdout=f, stderr=subprocess.STDOUT, timeout=TIMEOUT)
    if check and p.returncode:
        pytest.fail(f"{' '.join(cmd[:8])} … exited {p.returncode}; log tail:\n" + log.read_text()[-4000:])
    return p


def start(cmd: list[str], environ: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=REPO, env=environ, stdout=log.open("a"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def kill_tree(pid: int, sig=signal.SIGKILL) -> None:
    """`pid` and all its descendants (torchelastic starts workers in their own sessions, so killing
    the launcher's process group would leave them running)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(parents.get(p, []))
    for p in tree:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


def logged(out: Path) -> dict[int, dict]:
    path = out / "train_log.csv"
    if not path.is_file():
        return {}
    with path.open() as f:
        rows = list(csv.DictReader(f))
    steps = [int(float(r["step"])) for r in rows]
    assert len(steps) == len(set(steps)), f"duplicate steps in {path}: {steps}"
    return {s: {k: float(v) for k, v in r.items()} for s, r in zip(steps, rows)}


def wait_for_step(out: Path, step: int, proc: subprocess.Popen, log: Path) -> int:
    deadline = time.time() + TIMEOUT
    while time.time() < deadline:
        try:
            done = max(logged(out), default=0)
        except (ValueError, KeyError, csv.Error):  # a row half written
            done = 0
        if done >= step:
            return done
        if proc.poll() is not None:
            pytest.fail(f"run ended (exit {proc.returncode}) before step {step}:\n" + log.read_text()[-4000:])
        time.sleep(0.05)
    pytest.fail(f"no step {step} within {TIMEOUT}s")


def state(out: Path, step: int | None = None) -> dict:
    ckpts = sorted((out / "checkpoints").glob("step_*/trainer_state.json"), key=lambda p: int(p.parent.name[5:]))
    path = ckpts[-1] if step is None else out / "checkpoints" / f"step_{step}" / "trainer_state.json"
    return json.loads(path.read_text())


def assert_processes(st: dict, world: int, dist_type: str, micro: int, batch: int, nodes=(0,)) -> None:
    """What each process did, as recorded inside the run."""
    assert st["world_size"] == world and st["distributed_type"] == dist_type, st
    procs = st["processes"]
    assert [p["rank"] for p in procs] == list(range(world)), procs
    assert {p["node_rank"] for p in procs} == set(nodes), procs
    for p in procs:
        assert p["micro_batches"] == micro and p["cells"] == micro * batch, procs


def assert_same_curve(a: dict, b: dict, steps, rtol: float) -> None:
    for s in steps:
        assert b[s]["lr"] == pytest.approx(a[s]["lr"], rel=1e-9), f"lr at step {s}"
        assert b[s]["loss"] == pytest.approx(a[s]["loss"], rel=rtol), f"loss at step {s}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """1 process, batch 16 (accelerate launch with recipes/accelerate/single.yaml)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    run(accelerate("single", 1, *pretrain(*overrides(out, 16))), env(), out.parent / "log.txt")
    return out


@pytest.fixture(scope="module")
def ddp(tmp_path_factory) -> Path:
    """2 processes × batch 8 (recipes/accelerate/ddp.yaml, MULTI_CPU)."""
    out = tmp_path_factory.mktemp("ddp") / "run"
    run(accelerate("ddp", 2, *pretrain(*overrides(out, 8))), env(**CPU), out.parent / "log.txt")
    return out


def test_ddp_two_processes_match_one_process(reference, ddp):
    assert_processes(state(reference), 1, "NO", STEPS, 16)
    assert_processes(state(ddp), 2, "MULTI_CPU", STEPS, 8)
    a, b = logged(reference), logged(ddp)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    assert_same_curve(a, b, range(1, COMPARE + 1), LOSS_RTOL)
    assert_same_curve(a, b, range(1, STEPS + 1), 0.05)  # the whole run stays on the same curve
    assert a[STEPS]["loss"] < 0.8 * a[1]["loss"]  # and it is a curve that learns


def test_sigkill_then_resume_on_one_process(tmp_path, reference):
    """2 processes killed with SIGKILL mid-run; resumed on 1 process with the same global batch
    (batch 16 instead of 2 × 8): it continues at the same cell and finishes on the reference curve."""
    out, log = tmp_path / "run", tmp_path / "log.txt"
    proc = start(accelerate("ddp", 2, *pretrain(*overrides(out, 8, **{"train.save_every": 5}))), env(**CPU), log)
    try:
        wait_for_step(out, 8, proc, log)
    finally:
        kill_tree(proc.pid)  # the launcher and both workers at once, no chance to clean up
        proc.wait()
    time.sleep(0.5)
    assert f"steps {STEPS};" not in log.read_text() and not (out / "model").exists(), "the run was not killed"
    killed_at = max(logged(out))
    saved = state(out)["step"]
    assert killed_at < STEPS and 0 <= killed_at - saved <= 5, (killed_at, saved)
    run(accelerate("single", 1, *pretrain(*overrides(out, 16, **{"train.save_every": 5}), "--resume")), env(), log)
    assert f"resumed from {out / 'checkpoints' / f'step_{saved}'} at step {saved}" in log.read_text()
    final = state(out)
    assert final["step"] == STEPS
    assert_processes(final, 1, "NO", STEPS - saved, 16)  # only the lost steps were redone
    a, b = logged(reference), logged(out)
    assert sorted(b) == list(range(1, STEPS + 1))
    assert_same_curve(a, b, range(saved + 1, min(saved + COMPARE, STEPS) + 1), LOSS_RTOL)
    assert_same_curve(a, b, range(1, STEPS + 1), 0.05)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_trains_and_exports(tmp_path, reference, stage):
    """ZeRO-2/3 on 2 CPU processes: same curve as 1 process; the export (ZeRO-3: gathered from
    shards by get_state_dict on all ranks) loads with fm.load and embeds like the in-memory model."""
    import anndata as ad
    from transformers import AutoModel

    import fm

    out, log, npy = tmp_path / "run", tmp_path / "log.txt", tmp_path / "in_memory.npy"
    pbmc = DATA
    run(accelerate(f"zero{stage}", 2, "tests/dist_zero_embed.py", str(npy), str(pbmc), "64",
                   *overrides(out, 8, **{"train.save_every": STEPS})), env(**DS), log)
    st = state(out)
    assert_processes(st, 2, "DEEPSPEED", STEPS, 8)
    shards = sorted(p.name for p in (out / "checkpoints" / f"step_{STEPS}" / "pytorch_model").iterdir())
    assert len([s for s in shards if "optim_states" in s]) == 2, shards  # optimizer state partitioned
    assert_same_curve(logged(reference), logged(out), range(1, COMPARE + 1), LOSS_RTOL)

    model = fm.load(out / "model")
    backbone, info = AutoModel.from_pretrained(out / "model", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert all(v.numel() > 0 for v in model.state_dict().values())  # full tensors, not ZeRO-3 placeholders
    emb = fm.embed(ad.read_h5ad(pbmc)[:64].copy(), model, batch_size=32)
    np.testing.assert_allclose(emb, np.load(npy), rtol=1e-4, atol=1e-5)


def fake_slurm_bin(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    for name in ("srun", "scontrol"):
        (bin_dir / name).write_text(f'#!/bin/sh\nexec "{sys.executable}" "{REPO / "tests" / "dist_fake_slurm.py"}" '
                                    f'{name} "$@"\n')
        (bin_dir / name).chmod(0o755)
    return bin_dir


def test_slurm_two_nodes_preempt_requeue_resume(tmp_path, ddp):
    """slurm/pretrain.sbatch itself, with faked SLURM variables and a stand-in srun starting one
    launcher per "node" (machine ranks 0 and 1 on 127.0.0.1). USR1 (SLURM's --signal warning) →
    the script TERMs the step → all ranks checkpoint at the same step → `scontrol requeue`. The
    requeued job (the same script again) resumes and trains to the end on the DDP curve."""
    out, log, calls = tmp_path / "run", tmp_path / "log.txt", tmp_path / "slurm_calls.jsonl"
    slurm_env = env(**CPU, PATH=f"{fake_slurm_bin(tmp_path)}:{BIN}:{os.environ.get('PATH', '')}",
                    FAKE_SLURM_LOG=str(calls), SLURM_JOB_ID="4242", SLURM_JOB_NUM_NODES="2",
                    SLURM_JOB_NODELIST="127.0.0.1,127.0.0.1", SLURM_SUBMIT_DIR=str(REPO), GPUS_PER_NODE="1")
    job = ["bash", "slurm/pretrain.sbatch", "debug", *overrides(out, 8)]

    proc = start(job, {**slurm_env, "MAIN_PORT": str(free_port())}, log)
    signalled_at = wait_for_step(out, 4, proc, log)
    os.kill(proc.pid, signal.SIGUSR1)  # what `#SBATCH --signal=B:USR1@300` does
    assert proc.wait(timeout=TIMEOUT) == 0, log.read_text()[-4000:]
    st = state(out)
    assert signalled_at <= st["step"] < STEPS, "the checkpoint is taken after the signal, before the end"
    assert st["step"] == max(logged(out)), "no step after the checkpoint"
    assert "stopped by signal" in log.read_text()
    assert not (out / "model").exists()
    srun_calls = [json.loads(line) for line in calls.read_text().splitlines()]
    assert ["scontrol", "requeue", "4242"] in srun_calls
    launch = next(c for c in srun_calls if c[0] == "srun")[-1]
    for flag in ("exec accelerate launch", "--num_machines 2", "--num_processes 2", "--machine_rank $SLURM_NODEID",
                 "--main_process_ip 127.0.0.1", "-m fm.cli pretrain debug", "--resume"):
        assert flag in launch, (flag, launch)

    run(job, {**slurm_env, "MAIN_PORT": str(free_port())}, log)  # the requeued job
    assert f"resumed from {out / 'checkpoints' / 'step_{}'.format(st['step'])} at step" in log.read_text()
    final = state(out)
    assert final["step"] == STEPS and (out / "model" / "model.safetensors").is_file()
    assert_processes(final, 2, "MULTI_CPU", STEPS - st["step"], 8, nodes=(0, 1))
    a, b = logged(ddp), logged(out)
    assert sorted(b) == list(range(1, STEPS + 1))
    assert_same_curve(a, b, range(1, STEPS + 1), SAME_RTOL)


def test_early_stopping_stops_every_rank_at_the_same_step(tmp_path):
    """Two DDP processes decide from the reduced held-out loss: both stop at the step a 1-process run
    with the same global batch stops at, and rank 0 exports that run's best weights."""
    sys.path.insert(0, str(REPO / "tests"))
    from test_train import _toy_run

    single, single_export = _toy_run(tmp_path / "one", early_stopping_patience=3)
    out = tmp_path / "two"
    run(accelerate("ddp", 2, "tests/dist_early_stop.py", str(out)), env(**CPU), tmp_path / "log.txt")
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    for r in ranks:
        assert (r["step"], r["best_step"], r["early_stopped"]) == (single.step, single.best_step, True), r
    assert ranks[0]["theta"] == pytest.approx(float(single_export["theta.weight"]), abs=1e-6)
    assert ranks[1]["theta"] is None, "only rank 0 exports"
    assert state(out)["world_size"] == 2 and state(out)["early_stopping"]["stopped_at"] == single.step
