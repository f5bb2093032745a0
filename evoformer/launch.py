"""Start ``evoformer.train`` under torchrun with the right number of processes.

    python -m evoformer.launch [--cpu-processes N] -- <evoformer.train arguments>

- CUDA visible: one process per visible GPU (``CUDA_VISIBLE_DEVICES``, which Slurm sets to the
  job's allocation), NCCL.
- No CUDA (a laptop, CI, or a Slurm node with fake GPUs): ``--cpu-processes`` processes with gloo;
  the log says so.
- Multi-node Slurm jobs (``SLURM_NNODES`` > 1, one task per node started by ``srun``): c10d
  rendezvous on the first node of the allocation, keyed on ``SLURM_JOB_ID``, on port
  29500 + (job id mod 1000).

The launcher ignores SIGUSR1 (Slurm's warning before the time limit, sent to every process of
the job step) so that only the training processes react to it by checkpointing; SIGTERM is
forwarded to the workers by torchrun itself.

No orphans: the launcher watches the Snakemake process that started it (its nearest ancestor
running snakemake; without one, its parent) and sends itself SIGTERM when that process is gone
(``kill -9`` of Snakemake): torchrun passes it on, the workers checkpoint and stop. The workers
in turn die with the launcher (``evoformer.train.die_with_parent``).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import torch

log = logging.getLogger("evoformer.launch")


def first_node(nodelist: str) -> str:
    """First host of a Slurm nodelist (``scontrol show hostnames``)."""
    out = subprocess.run(
        ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True
    )
    return out.stdout.split()[0]


def rendezvous_port(job_id: str) -> int:
    """Rendezvous port of a multi-node job: 29500 + (job id mod 1000), so that two jobs whose
    first node is the same (shared nodes) do not pick the same port."""
    return 29500 + (int(job_id) % 1000 if job_id.isdigit() else 0)


def torchrun_args(cpu_processes: int, env: dict[str, str]) -> list[str]:
    """torchrun's arguments (before the module) for this machine / Slurm allocation."""
    if torch.cuda.is_available():
        nproc = torch.cuda.device_count()
        how = f"{nproc} CUDA device(s) visible (CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES')})"
    elif env.get("CUDA_VISIBLE_DEVICES", "").strip():
        # GPUs allocated (e.g. by Slurm) but CUDA unusable (CPU-only torch, fake GPUs): one
        # CPU process per allocated device, so the world size follows the allocation
        nproc = len(env["CUDA_VISIBLE_DEVICES"].split(","))
        how = (
            f"no usable CUDA device (CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']}): "
            f"CPU fallback with gloo, {nproc} processes (one per allocated device)"
        )
    else:
        nproc = cpu_processes
        how = (
            f"no CUDA device visible (CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES')}): "
            f"CPU fallback with gloo, {nproc} processes"
        )
    nnodes = int(env.get("SLURM_NNODES", "1"))
    if nnodes > 1:
        host = first_node(env["SLURM_JOB_NODELIST"])
        port = rendezvous_port(env.get("SLURM_JOB_ID", ""))
        args = [
            f"--nnodes={nnodes}",
            f"--nproc-per-node={nproc}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={host}:{port}",
            f"--rdzv-id={env.get('SLURM_JOB_ID', 'evoformer')}",
        ]
        how += f", {nnodes} nodes, rendezvous at {host}:{port}"
    else:
        args = ["--standalone", f"--nproc-per-node={nproc}"]
    log.info("launching torchrun: %s", how)
    return args


def is_snakemake(cmdline: list[str]) -> bool:
    """``snakemake ...``, ``python .../bin/snakemake ...`` or ``python -m snakemake ...`` (not a
    shell whose script path or command text merely contains the word)."""
    names = [os.path.basename(c) for c in cmdline[:3]]
    if names and names[0] == "snakemake":
        return True
    if len(names) < 2 or not names[0].startswith("python"):
        return False
    return names[1] == "snakemake" or names[1:3] == ["-m", "snakemake"]


def watched_ancestor() -> tuple[int, float] | None:
    """(pid, create time) of the nearest ancestor running snakemake, else of the parent."""
    import psutil

    try:
        me = psutil.Process()
        parent = me.parent()
        for proc in me.parents():
            if is_snakemake(proc.cmdline()):
                return proc.pid, proc.create_time()
        return (parent.pid, parent.create_time()) if parent is not None else None
    except psutil.Error:
        return None


def stop_when_gone(pid: int, created: float, interval_s: float = 2.0) -> None:
    """Daemon thread: SIGTERM to this process once ``pid`` (started at ``created``) is gone."""
    import psutil

    def alive() -> bool:
        try:
            return psutil.Process(pid).create_time() == created
        except psutil.Error:
            return False

    def watch() -> None:
        while alive():
            time.sleep(interval_s)
        log.warning("process %d that started this training is gone: stopping the training", pid)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="watch-ancestor", daemon=True).start()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        raise SystemExit("usage: python -m evoformer.launch [--cpu-processes N] -- <train args>")
    split = argv.index("--")
    p = argparse.ArgumentParser(description="start evoformer.train under torchrun")
    p.add_argument("--cpu-processes", type=int, default=2)
    a = p.parse_args(argv[:split])
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s launch %(message)s", stream=sys.stderr
    )
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    ancestor = watched_ancestor()
    if ancestor is not None:
        stop_when_gone(*ancestor)
    cmd = torchrun_args(a.cpu_processes, dict(os.environ))
    from torch.distributed.run import main as torchrun_main

    torchrun_main([*cmd, "--module", "evoformer.train", *argv[split + 1 :]])


if __name__ == "__main__":
    main()
