"""Process-group helpers of a training run (torchrun's environment, NCCL on GPU, gloo on CPU).

:func:`setup_distributed` starts the group; :func:`reduce_step` is the one collective of every
optimizer step (loss, finiteness, signal flags); :func:`close_distributed` ends the group
safely; :func:`die_with_parent` ties a worker to its torchrun launcher.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import gc
import os
import signal
import sys
from typing import NamedTuple

import torch
import torch.distributed as dist


def setup_distributed(timeout_s: int) -> tuple[int, int, torch.device]:
    """Init the process group from torchrun's env (NCCL on CUDA, gloo on CPU); (rank, world, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return rank, world, device


def all_reduce_(t: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=op)
    return t


class StepFlags(NamedTuple):
    """What every rank learns from the one collective of an optimizer step."""

    loss: float  # mean over the ranks
    finite: bool  # loss and gradient norm finite on every rank
    save: bool  # a rank got SIGUSR1 or SIGTERM: checkpoint
    stop: bool  # a rank got SIGTERM: checkpoint and stop


def reduce_step(
    loss: torch.Tensor, grad_norm: torch.Tensor, signals: tuple[float, float]
) -> StepFlags:
    """One all-reduce per step, before the update: the local loss (scalar), whether it and the
    gradient norm (scalar) are finite, and this rank's signal flags (save, stop), so that all
    ranks skip a non-finite step, checkpoint and stop together."""
    bad = ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
    t = torch.stack([loss.detach().double(), bad.double()])
    t = all_reduce_(torch.cat([t, torch.tensor(signals, dtype=torch.float64, device=t.device)]))
    world = dist.get_world_size() if dist.is_initialized() else 1
    v = t.tolist()
    return StepFlags(v[0] / world, v[1] == 0, v[2] > 0, v[3] > 0)


def close_distributed() -> None:
    """Destroy the process group once nothing else holds it.

    Call after dropping the DDP model: its reducer holds the process group, and a gloo group
    freed through the reducer's Python object is destroyed with the GIL held, which deadlocks
    with gloo's worker threads freeing the last collective's tensors (they need the GIL).
    ``destroy_process_group`` frees it with the GIL released.
    """
    gc.collect()  # the DDP wrapper may sit in reference cycles
    if dist.is_initialized():
        dist.destroy_process_group()


def die_with_parent() -> None:
    """Ask Linux to send this process SIGTERM when its parent (torchrun) dies, so a training
    process never outlives its launcher (it then checkpoints and stops, as on any SIGTERM)."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
