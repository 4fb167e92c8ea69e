"""Stand-ins for `srun` and `scontrol`, so slurm/*.sbatch runs unchanged on one machine.

    python dist_fake_slurm.py srun [--opt=val ...] CMD ...   one CMD per node (SLURM_JOB_NUM_NODES),
        each with SLURM_NODEID/SLURM_PROCID = its index, as `srun --ntasks-per-node=1` starts them;
        SIGTERM/SIGINT/SIGUSR1 are forwarded to every task (as srun forwards signals to the step).
    python dist_fake_slurm.py scontrol show hostnames a,b    one name per line
    python dist_fake_slurm.py scontrol requeue JOBID         recorded, nothing else
Every call is appended as a JSON line to $FAKE_SLURM_LOG, so a test can check the launch line.
"""
import json
import os
import signal
import subprocess
import sys


def record(argv):
    with open(os.environ["FAKE_SLURM_LOG"], "a") as f:
        f.write(json.dumps(argv) + "\n")


def srun(args):
    while args and args[0].startswith("-"):  # srun options (only --x=y forms are used by our scripts)
        args = args[1:]
    nodes = int(os.environ.get("SLURM_JOB_NUM_NODES", "1"))
    tasks = [subprocess.Popen(args, env={**os.environ, "SLURM_NODEID": str(i), "SLURM_PROCID": str(i),
                                         "SLURM_LOCALID": "0", "SLURM_NTASKS": str(nodes)})
             for i in range(nodes)]

    def forward(signum, frame):
        for t in tasks:
            if t.poll() is None:
                t.send_signal(signum)

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(s, forward)
    codes = [t.wait() for t in tasks]
    return next((c for c in codes if c), 0)


def main(argv):
    record(argv)
    if argv[0] == "srun":
        return srun(argv[1:])
    if argv[:3] == ["scontrol", "show", "hostnames"]:
        print("\n".join(argv[3].split(",")))
        return 0
    if argv[:2] == ["scontrol", "requeue"]:
        return 0
    raise SystemExit(f"fake slurm: unsupported {argv}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
