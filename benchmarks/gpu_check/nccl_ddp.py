"""Item ``nccl_ddp``: an NCCL process group and DDP steps under torchrun, one rank per GPU."""

from __future__ import annotations

import contextlib
import datetime
import gc
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.gpu_check.common import Context, clean
from benchmarks.gpu_check.processes import child_env, log_tail, run_group
from benchmarks.gpu_check.sizes import StepConfig
from benchmarks.gpu_check.step import build


def item_nccl_ddp(ctx: Context, partial: Callable[[dict], None]) -> dict[str, Any]:
    folder = ctx.out / "nccl_ddp"
    folder.mkdir(parents=True, exist_ok=True)
    result_path = folder / "result.json"
    result_path.unlink(missing_ok=True)
    nproc = 1 if ctx.dry else max(1, torch.cuda.device_count())
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "benchmarks.gpu_check",
        "--ddp-worker",
        str(result_path),
    ]
    if ctx.dry:
        cmd.append("--cpu-dry-run")
    timeout = max(30.0, min(180.0, ctx.remaining()))
    log_path = folder / "worker.log"
    env = {**child_env(ctx), "NCCL_DEBUG": os.environ.get("NCCL_DEBUG", "INFO")}
    rc, secs = run_group(cmd, log_path, env, timeout)
    res: dict[str, Any] = {"nproc": nproc, "exit_code": rc, "seconds": secs, "log": str(log_path)}
    with contextlib.suppress(OSError, json.JSONDecodeError):
        res.update(json.loads(result_path.read_text()))
    res["passed"] = rc == 0 and bool(res.get("all_reduce_ok")) and bool(res.get("steps_ok"))
    if not res["passed"]:
        res["log_tail"] = log_tail(log_path)
        res["errors"] = [f"worker {'timed out' if rc == 124 else f'exited {rc}'}; log: {log_path}"]
    return res


class _LossForward(torch.nn.Module):
    """``forward(batch) = model.loss(batch)`` so DDP all-reduces the whole loss graph."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        return self.model.loss(batch)


def ddp_worker(result_path: Path, dry: bool) -> int:
    """One torchrun rank: NCCL (gloo on CPU) process group, all-reduce, 3 DDP training steps."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and not dry
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    backend = "nccl" if cuda else "gloo"
    t0 = time.perf_counter()
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=120))
    out: dict[str, Any] = {"backend": dist.get_backend(), "world_size": dist.get_world_size()}
    out["init_s"] = time.perf_counter() - t0
    t = torch.full((4,), float(rank + 1), device=device)
    dist.all_reduce(t)
    expected = world * (world + 1) / 2
    out["all_reduce_ok"] = bool(torch.allclose(t.cpu(), torch.full((4,), expected)))
    cfg = StepConfig(
        name="ddp",
        model={"preset": "bioformer", "c_m": 32, "c_z": 16, "c_opm": 8, "n_blocks": 2},
        n_hvg=31,
        n_bins=11,
        micro_batch=4,
        precision="bf16" if cuda else "fp32",
    )
    model, _, batch = build(cfg, device)
    ddp = DDP(_LossForward(model), device_ids=[local] if cuda else None)
    optimizer = torch.optim.AdamW(ddp.parameters(), lr=1e-3, weight_decay=0.01)
    losses = []
    for _ in range(3):
        autocast = (
            torch.autocast(device.type, dtype=torch.bfloat16)
            if cfg.precision == "bf16"
            else contextlib.nullcontext()
        )
        with autocast:
            loss, _ = ddp(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ddp.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    # parameters identical on every rank after the synchronised steps
    digest = torch.stack([p.detach().float().sum() for p in model.parameters()]).sum().reshape(1)
    gathered = [torch.zeros_like(digest) for _ in range(world)]
    dist.all_gather(gathered, digest)
    out["params_in_sync"] = bool(all(torch.allclose(g, gathered[0]) for g in gathered))
    out["losses"] = losses
    out["steps_ok"] = all(math.isfinite(x) for x in losses) and out["params_in_sync"]
    out["precision"] = cfg.precision
    out["device"] = torch.cuda.get_device_name(device) if cuda else "cpu"
    if cuda:
        with contextlib.suppress(Exception):
            v = torch.cuda.nccl.version()
            out["nccl_version"] = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
    out["seconds"] = time.perf_counter() - t0
    dist.barrier()
    del ddp
    gc.collect()
    dist.destroy_process_group()
    if rank == 0:
        from evoformer.io import write_text_atomic

        write_text_atomic(result_path, json.dumps(clean(out), indent=2) + "\n")
    return 0
