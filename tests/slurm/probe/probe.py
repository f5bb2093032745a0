"""Job scripts of the Slurm probe workflow (tests/slurm/probe/Snakefile).

    python probe.py prep INPUT OUTPUT            # CPU job; fails on a corrupt input
    python probe.py launch [--hold] --out JSON   # torchrun, one process per GPU, gloo
    python probe.py table PREP RUN_INFO OUTPUT   # CPU job

Every subcommand prints ``SLURM_JOB_ID=<id>`` first (into the rule's log). ``launch``
mirrors ``evoformer.launch``: it ignores SIGUSR1 (only the training processes react to
it), counts the GPUs in CUDA_VISIBLE_DEVICES and starts torchrun in-process, with a c10d
rendezvous on the job's first node when SLURM_NNODES > 1. Its workers (``worker``) write
``run_info.json``: SLURM_JOB_ID, CUDA_VISIBLE_DEVICES, world_size and one entry per rank.
With ``--hold`` the first attempt writes ``<out dir>/holding.<rank>`` once its signal
handlers are installed and runs until Slurm ends it: SIGUSR1 writes
``<out dir>/usr1.<rank>``, SIGTERM a "checkpoint" ``<out dir>/ckpt.<rank>`` and exits
non-zero; an attempt that finds all checkpoints resumes from them and finishes.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def banner() -> None:
    print(f"SLURM_JOB_ID={os.environ.get('SLURM_JOB_ID', '')}", flush=True)
    print(f"host={socket.gethostname()} node={os.environ.get('SLURMD_NODENAME', '')}", flush=True)


def prep(inp: str, out: str) -> None:
    text = Path(inp).read_text()
    if not text.startswith("PROBE-INPUT"):
        raise SystemExit(f"corrupt input {inp}: expected a PROBE-INPUT file")
    Path(out).write_text(f"{text.strip()}\nSLURM_JOB_ID={os.environ.get('SLURM_JOB_ID', '')}\n")


def table(prep_file: str, run_info: str, out: str) -> None:
    info = json.loads(Path(run_info).read_text())
    rows = [
        "stage\tslurm_job_id",
        f"prep\t{Path(prep_file).read_text().split('SLURM_JOB_ID=')[1].strip()}",
        f"train\t{info['SLURM_JOB_ID']}",
        f"table\t{os.environ.get('SLURM_JOB_ID', '')}",
    ]
    Path(out).write_text("\n".join(rows) + "\n")


def launch(hold: bool, out: str) -> None:
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    nproc = len([d for d in cvd.split(",") if d.strip()]) or 1
    nnodes = int(os.environ.get("SLURM_NNODES", "1"))
    if nnodes > 1:
        first = subprocess.run(
            ["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()[0]
        args = [
            f"--nnodes={nnodes}",
            f"--nproc-per-node={nproc}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={first}:29511",
            f"--rdzv-id={os.environ.get('SLURM_JOB_ID', 'probe')}",
        ]
    else:
        args = ["--standalone", f"--nproc-per-node={nproc}"]
    print(
        f"launch: CUDA_VISIBLE_DEVICES={cvd} nnodes={nnodes} torchrun {' '.join(args)}", flush=True
    )
    from torch.distributed.run import main as torchrun_main

    worker_args = [__file__, "worker", "--out", out] + (["--hold"] if hold else [])
    torchrun_main([*args, *worker_args])


def worker(hold: bool, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    state = Path(out).parent
    state.mkdir(parents=True, exist_ok=True)
    me = {
        "rank": rank,
        "local_rank": int(os.environ.get("LOCAL_RANK", "0")),
        "node": os.environ.get("SLURMD_NODENAME", socket.gethostname()),
        "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "SLURM_JOB_ID": os.environ.get("SLURM_JOB_ID"),
        "pid": os.getpid(),
    }
    resumed = False
    if hold:
        resumed = all((state / f"ckpt.{r}").exists() for r in range(world))
        if not resumed:

            def on_usr1(signum, frame):
                (state / f"usr1.{rank}").write_text(time.ctime())

            def on_term(signum, frame):
                (state / f"ckpt.{rank}").write_text(os.environ.get("SLURM_JOB_ID", ""))
                os._exit(1)

            signal.signal(signal.SIGUSR1, on_usr1)
            signal.signal(signal.SIGTERM, on_term)
            (state / f"holding.{rank}").write_text(os.environ.get("SLURM_JOB_ID", ""))
            print(f"rank {rank}: holding until Slurm's time limit", flush=True)
            while True:
                time.sleep(0.5)
    ranks: list = [None] * world
    dist.all_gather_object(ranks, me)
    if rank == 0:
        info = {
            "SLURM_JOB_ID": os.environ.get("SLURM_JOB_ID"),
            "SLURM_NNODES": os.environ.get("SLURM_NNODES"),
            "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "world_size": world,
            "resumed": resumed,
            "ranks": ranks,
        }
        Path(out).write_text(json.dumps(info, indent=1) + "\n")
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("prep")
    a.add_argument("inp")
    a.add_argument("out")
    a = sub.add_parser("table")
    a.add_argument("prep")
    a.add_argument("run_info")
    a.add_argument("out")
    for name in ("launch", "worker"):
        a = sub.add_parser(name)
        a.add_argument("--out", required=True)
        a.add_argument("--hold", action="store_true")
    args = p.parse_args(argv)
    if args.cmd != "worker":
        banner()
    if args.cmd == "prep":
        prep(args.inp, args.out)
    elif args.cmd == "table":
        table(args.prep, args.run_info, args.out)
    elif args.cmd == "launch":
        launch(args.hold, args.out)
    else:
        worker(args.hold, args.out)


if __name__ == "__main__":
    sys.exit(main())
