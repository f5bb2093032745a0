"""Train one BioFormer experiment on binned single-cell data, on 1..N processes (DDP).

Read top to bottom: settings -> distributed setup -> data -> model/optimizer -> resume ->
training loop (validation each epoch, checkpoints, signals) -> final outputs.

Launched by ``python -m evoformer.launch`` (a thin wrapper around ``torchrun``) from the
``train`` rule; also runs as a single process without torchrun::

    python -m evoformer.train --binned results/pbmc68k/hvg64/bins11 --split results/pbmc68k/split.tsv \
        --spec '{"model": {...}, "train": {...}, "fold": -1, "final": false}' \
        --out results/pbmc68k/<exp>/train --ckpt-dir checkpoints/<exp>

Outputs (``--out``): ``model.pt`` (final weights + resolved config), ``metrics.tsv`` (one row per
logged step and per validation), ``learning_curve.png``, ``performance_summary.json`` and
``run_info.json`` (world size, devices, Slurm job id). The peak memory in the summary is
``torch.cuda.max_memory_allocated`` on GPU and, on CPU, the profiler's allocator peak of one
training step (``peak_memory_source``: ``profiler``; the process RSS is kept beside it). With
``--preflight`` (the pre-flight's ``preflight.json``) a micro-batch the pre-flight lowered
(``memory.auto_micro_batch``) replaces the configured one. With ``train.memory_snapshot`` on
GPU, ``memory_snapshot.pickle`` holds the allocator history of the first steps. Checkpoints
live in ``--ckpt-dir``, a folder the rule does not declare as output, so Snakemake's cleanup
of a failed job keeps them; a rerun resumes from ``last.pt`` and bit-for-bit continues the
interrupted run.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import hashlib
import json
import logging
import math
import os
import platform
import random
import resource
import signal
import socket
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from evoformer.data.arrays import BinnedData
from evoformer.errors import InputError
from evoformer.io import atomic_path, write_text_atomic
from evoformer.memory.measured import record_cpu_peak
from evoformer.model import BioFormer, ModelConfig, apply_value_mask, load_prior_network
from evoformer.train_config import TrainConfig

log = logging.getLogger("evoformer.train")
CHECKPOINT_FORMAT = 1


# ----------------------------------------------------------------------------- data
class CellBatches:
    """Serves micro-batches of cells (or of S-cell groups) from the memory-mapped binned arrays.

    Every rank opens the ``.npy`` files memory-mapped; nothing reads the h5ad. Rows are grouped
    into MSAs of ``S`` cells (S = 1: each cell on its own); the item index is the group index.
    """

    def __init__(self, data: BinnedData, rows: np.ndarray, labels: np.ndarray, s: int) -> None:
        self.data = data
        n_groups = len(rows) // s
        self.groups = rows[: n_groups * s].reshape(n_groups, s)  # [n_groups, S] row indices
        self.labels = labels  # [N] int64, -1 = unknown

    def __len__(self) -> int:
        return len(self.groups)

    def batch(self, items: list[int] | np.ndarray) -> dict[str, torch.Tensor]:
        """Batch for group indices ``items``: gene_ids/values/pad_mask [B, S, L], labels [B, S]."""
        rows = self.groups[np.asarray(items)]  # [B, S]
        flat = np.sort(rows.ravel())  # sorted reads are kinder to the page cache
        order = np.argsort(np.argsort(rows.ravel()))
        values = np.asarray(self.data.values[flat])[order].astype(np.int64)  # [B*S, L]
        gi = self.data.gene_index
        gene_index = (
            np.asarray(gi[flat])[order] if gi.shape[0] > 1 else np.broadcast_to(gi, values.shape)
        )
        b, s = rows.shape
        gene_index = torch.as_tensor(np.asarray(gene_index, dtype=np.int64)).view(b, s, -1)
        pad_mask = gene_index >= 0
        return {
            "gene_ids": gene_index.clamp(min=0),
            "values": torch.as_tensor(values).view(b, s, -1),
            "pad_mask": pad_mask,
            "labels": torch.as_tensor(self.labels[rows]),
        }


def select_rows(
    split: pd.DataFrame, cells: pd.DataFrame, fold: int, final: bool
) -> dict[str, np.ndarray]:
    """Row indices (into the binned arrays) of the training and validation cells.

    fold = -1: train on ``split == train``, validate on ``split == val``.
    fold = k >= 0: cross-validation; train on train+val cells with ``fold != k``, validate on ``fold == k``.
    final: train on all train+val cells, no validation (the retrain of the selected grid point).
    Test cells are never returned.
    """
    row_of = pd.Series(np.arange(len(cells)), index=cells["cell_id"].astype(str))
    split = split.assign(cell_id=split["cell_id"].astype(str))
    split = split[split["cell_id"].isin(row_of.index)]
    trval = split[split["split"].isin(["train", "val"])]
    if final:
        tr, va = trval, trval.iloc[:0]
    elif fold >= 0:
        if not (trval["fold"] == fold).any():
            raise InputError(
                f"split table has no cells in fold {fold} (is split.n_folds > {fold}?)"
            )
        tr, va = trval[trval["fold"] != fold], trval[trval["fold"] == fold]
    else:
        tr, va = split[split["split"] == "train"], split[split["split"] == "val"]
    return {"train": row_of[tr["cell_id"]].to_numpy(), "val": row_of[va["cell_id"]].to_numpy()}


def label_codes(cells: pd.DataFrame) -> tuple[np.ndarray, list[str]]:
    """Integer label per row (-1 where unknown or no label column) and the sorted label names."""
    if "label" not in cells:
        return np.full(len(cells), -1, dtype=np.int64), []
    lab = cells["label"]
    names = sorted(lab.dropna().astype(str).unique())
    code = {n: i for i, n in enumerate(names)}
    return np.array([code.get(str(x), -1) if pd.notna(x) else -1 for x in lab], np.int64), names


def mask_generator(seed: int, *parts: int) -> torch.Generator:
    """A generator seeded from (seed, parts): masks depend on the position, not on history."""
    digest = hashlib.sha256(repr((seed, *parts)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def masked(batch: dict[str, torch.Tensor], ratio: float, n_bins: int, gen: torch.Generator) -> dict:
    """Add the masked-value task to a batch: ``values`` masked, ``target`` and ``loss_mask``."""
    values, loss_mask = apply_value_mask(batch["values"], batch["pad_mask"], ratio, n_bins, gen)
    return {**batch, "values": values, "target": batch["values"], "loss_mask": loss_mask}


# ----------------------------------------------------------------------------- distributed
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


# ----------------------------------------------------------------------------- checkpoints
def config_hash(spec: dict[str, Any], data_meta: dict[str, Any], world: int) -> str:
    """What a checkpoint must match to be resumed: model/train config, data shape, world size."""
    key = {"spec": spec, "data": data_meta, "world_size": world, "format": CHECKPOINT_FORMAT}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def rng_state(device: torch.device) -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(path: Path, state: dict[str, Any], rank: int, device: torch.device) -> None:
    """Gather every rank's RNG state and write ``path`` atomically from rank 0."""
    states = [None] * dist.get_world_size() if dist.is_initialized() else None
    if states is not None:
        dist.all_gather_object(states, rng_state(device))
    else:
        states = [rng_state(device)]
    if rank == 0:
        with atomic_path(path) as tmp:
            torch.save({**state, "rng": states}, tmp)
    if dist.is_initialized():
        dist.barrier()


def load_checkpoint(path: Path, expected_hash: str) -> dict[str, Any] | None:
    """The checkpoint at ``path`` if there is one; refuse corrupt or other-config checkpoints."""
    if not path.exists():
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a corrupt file
        raise InputError(
            f"checkpoint {path} is corrupt ({type(e).__name__}); delete it to restart"
        ) from e
    if not isinstance(ckpt, dict) or ckpt.get("config_hash") != expected_hash:
        got = ckpt.get("config_hash") if isinstance(ckpt, dict) else None
        raise InputError(
            f"checkpoint {path} was written for another configuration (hash {got}, this run "
            f"{expected_hash}); delete it to restart"
        )
    return ckpt


class SignalFlags:
    """SIGUSR1 (Slurm's warning before the time limit): checkpoint and go on.
    SIGTERM: checkpoint and stop. Acted on at the next optimizer-step boundary on every rank."""

    def __init__(self) -> None:
        self.save = False
        self.stop = False
        signal.signal(signal.SIGUSR1, self._usr1)
        signal.signal(signal.SIGTERM, self._term)

    def _usr1(self, *_: Any) -> None:
        self.save = True

    def _term(self, *_: Any) -> None:
        self.save = self.stop = True

    def agreed(self, device: torch.device) -> tuple[bool, bool]:
        """(save, stop) agreed across ranks: any rank signalled -> all act at the same step."""
        t = torch.tensor([float(self.save), float(self.stop)], device=device)
        all_reduce_(t, dist.ReduceOp.MAX)
        self.save = self.stop = False
        return bool(t[0]), bool(t[1])


# ----------------------------------------------------------------------------- helpers
class LossForward(torch.nn.Module):
    """``forward(batch) = model.loss(batch)``: lets DDP see (and all-reduce) the whole loss graph."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        return self.model.loss(batch)


def lr_lambda(cfg: TrainConfig, total_steps: int):
    """Linear warmup to 1, cosine decay to ``min_lr_ratio`` at ``total_steps``."""

    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        frac = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac))

    return f


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, source): CUDA's max allocated on GPU, else this process's max resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda.max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "rss"


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


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def system_info(device: torch.device, world: int) -> dict[str, Any]:
    info = {
        "hostname": socket.gethostname(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "world_size": world,
        "cpu_threads_per_process": torch.get_num_threads(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_nodelist": os.environ.get("SLURM_JOB_NODELIST"),
    }
    return info


@torch.no_grad()
def validate(
    model: torch.nn.Module,
    cells: CellBatches,
    cfg: TrainConfig,
    n_bins: int,
    rank: int,
    world: int,
    device: torch.device,
    autocast: Any,
) -> dict[str, float]:
    """Masked-value loss and bin accuracy on this rank's shard of the validation cells, all-reduced.

    Masks are seeded by batch position, so every validation sees the same masked positions.
    """
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss*n, correct, n
    idx = np.arange(rank, len(cells), world)
    for i in range(0, len(idx), cfg.micro_batch_size):
        items = idx[i : i + cfg.micro_batch_size]
        batch = masked(
            cells.batch(items), cfg.mask_ratio, n_bins, mask_generator(cfg.seed, -1, int(items[0]))
        )
        batch = {k: v.to(device) for k, v in batch.items()}
        n = batch["loss_mask"].sum().double()
        with autocast:
            loss, metrics = model(batch)
        acc = torch.as_tensor(metrics.get("bin_acc", 0.0), dtype=torch.float64, device=device)
        sums += torch.stack([loss.double() * n, acc * n, n])
    all_reduce_(sums)
    model.train()
    n = max(sums[2].item(), 1.0)
    return {"val_loss": sums[0].item() / n, "val_bin_acc": sums[1].item() / n}


def plot_learning_curve(metrics: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    tr = metrics[metrics["kind"] == "train"]
    va = metrics[metrics["kind"] == "val"]
    ax.plot(tr["step"], tr["loss"], label="train loss")
    if len(va):
        ax.plot(va["step"], va["val_loss"], "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("masked-value loss")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- main
def train(binned: Path, split_path: Path, spec: dict[str, Any], out: Path, ckpt_dir: Path) -> None:
    """Run (or resume) one training run; see the module docstring for inputs and outputs."""
    cfg = TrainConfig.from_dict(spec.get("train"))
    model_cfg = ModelConfig.from_dict(spec.get("model"))
    fold, final = int(spec.get("fold", -1)), bool(spec.get("final", False))

    rank, world, device = setup_distributed(cfg.dist_timeout_s)
    accum = cfg.grad_accumulation(world)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    precision = (
        cfg.precision if cfg.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    )
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    )
    if rank == 0:
        where = f"{world} x {device.type}" + (
            " (no CUDA device: CPU fallback with gloo)" if device.type == "cpu" else ""
        )
        log.info("training on %s, precision %s, grad accumulation %d", where, precision, accum)

    # data: memory-mapped arrays, rows of this run's train/val cells
    data = BinnedData.open(binned)
    n_bins = int(data.meta["n_bins"])
    labels, label_names = label_codes(data.cells)
    rows = select_rows(pd.read_csv(split_path, sep="\t"), data.cells, fold, final)
    s = model_cfg.n_cells_per_msa
    train_cells = CellBatches(data, rows["train"], labels, s)
    val_cells = CellBatches(data, rows["val"], labels, s)
    if len(train_cells) < cfg.micro_batch_size * world:
        raise InputError(
            f"{split_path}: {len(train_cells)} training items is fewer than one global micro-batch "
            f"({cfg.micro_batch_size} x {world} processes)"
        )
    sampler = torch.utils.data.DistributedSampler(
        range(len(train_cells)),
        num_replicas=world,
        rank=rank,
        shuffle=True,
        seed=cfg.seed,
        drop_last=True,
    )
    steps_per_epoch = len(sampler) // (cfg.micro_batch_size * accum)
    if steps_per_epoch < 1:
        raise InputError(
            f"train.global_batch_size {cfg.global_batch_size} exceeds the {len(train_cells)} training items"
        )
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)

    # model, optimizer, schedule
    torch.manual_seed(cfg.seed)
    n_labels = len(label_names) if cfg.label_head else 0
    if cfg.label_head and not n_labels:
        raise InputError(f"train.label_head is true but {binned}/cells.tsv has no label column")
    prior = None
    if spec.get("prior"):
        prior = load_prior_network(spec["prior"], data.genes["gene_id"].astype(str).tolist())
    raw_model = BioFormer(
        model_cfg, n_genes=len(data.genes), n_bins=n_bins, n_labels=n_labels, prior=prior
    )
    raw_model.to(device)
    # DDP only synchronises gradients of computations run through its forward, so the loss is
    # computed inside forward by a thin wrapper: model(batch) -> (loss, metrics).
    model: torch.nn.Module = LossForward(torch.compile(raw_model) if cfg.compile else raw_model)
    if world > 1:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(raw_model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))

    # resume
    chash = config_hash(
        {**spec, "model": model_cfg.to_dict(), "train": cfg.to_dict()}, data.meta, world
    )
    ckpt_path = ckpt_dir / "last.pt"
    step, history, timers = 0, [], {"batch": 0.0, "forward": 0.0, "backward": 0.0, "optimizer": 0.0}
    samples_done, train_time = 0, 0.0
    ckpt = load_checkpoint(ckpt_path, chash)
    if ckpt is not None:
        raw_model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        step, history, timers = ckpt["step"], ckpt["history"], ckpt["timers"]
        samples_done, train_time = ckpt["samples_done"], ckpt["train_time"]
        set_rng_state(ckpt["rng"][rank], device)
        if rank == 0:
            log.info("resumed from %s at step %d/%d", ckpt_path, step, total_steps)
        del ckpt
    else:
        # the per-rank dropout stream starts from (seed, rank)
        torch.manual_seed(cfg.seed * 1000 + rank)

    def checkpoint() -> None:
        state = {
            "format": CHECKPOINT_FORMAT,
            "config_hash": chash,
            "model": raw_model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "step": step,
            "history": history,
            "timers": timers,
            "samples_done": samples_done,
            "train_time": train_time,
        }
        save_checkpoint(ckpt_path, state, rank, device)

    flags = SignalFlags()
    profiler = None
    if cfg.profiler.enabled and rank == 0:
        profiler = torch.profiler.profile(
            schedule=torch.profiler.schedule(
                wait=max(0, cfg.profiler.start_step - 1),
                warmup=1,
                active=cfg.profiler.active_steps,
                repeat=1,
            ),
            on_trace_ready=torch.profiler.tensorboard_trace_handler(str(out / "profile")),
            profile_memory=True,
            record_shapes=True,
        )
        profiler.start()
    bar = None
    if rank == 0 and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=step, desc="train")

    # ------------------------------------------------------------------ training loop
    snapshot_until = None  # CUDA allocator history of the first steps (train.memory_snapshot)
    if cfg.memory_snapshot and rank == 0:
        if device.type == "cuda":
            torch.cuda.memory._record_memory_history(max_entries=1_000_000)
            snapshot_until = min(step + 3, total_steps)
        else:
            log.info("train.memory_snapshot records CUDA allocations: nothing to record on CPU")
    model.train()
    cpu_peak: int | None = None  # profiler peak of one step on CPU
    last_loss = float("nan")
    window = {"loss": 0.0, "n": 0, "t": 0.0, "samples": 0}
    stopped = False
    while step < total_steps and not stopped:
        epoch, in_epoch = divmod(step, steps_per_epoch)
        sampler.set_epoch(epoch)
        order = list(sampler)
        for _ in range(in_epoch, steps_per_epoch):
            # on CPU, one step (the second: AdamW's moments exist) under the profiler's
            # allocator timeline gives the step's peak tensor memory (RSS counts far more)
            measure = (
                device.type == "cpu"
                and cpu_peak is None
                and profiler is None
                and (step >= 1 or total_steps == 1)
            )
            meter = record_cpu_peak(raw_model, optimizer) if measure else None
            if meter is not None:
                meter.__enter__()
            t_step = time.perf_counter()
            loss_sum = torch.zeros((), device=device)
            for micro in range(accum):
                i0 = ((step - epoch * steps_per_epoch) * accum + micro) * cfg.micro_batch_size
                items = order[i0 : i0 + cfg.micro_batch_size]
                gen = mask_generator(cfg.seed, epoch, step, micro, rank)
                batch = masked(train_cells.batch(items), cfg.mask_ratio, n_bins, gen)
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                if n_labels == 0:
                    batch.pop("labels")
                sync_ctx = model.no_sync() if world > 1 and micro < accum - 1 else nullcontext()
                with sync_ctx:
                    t0 = time.perf_counter()
                    with autocast:
                        loss, _ = model(batch)
                    sync(device)
                    t1 = time.perf_counter()
                    (loss / accum).backward()
                    sync(device)
                    t2 = time.perf_counter()
                timers["forward"] += t1 - t0
                timers["backward"] += t2 - t1
                loss_sum += loss.detach() / accum
            t3 = time.perf_counter()
            grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if meter is not None:
                meter.__exit__(None, None, None)
                cpu_peak = meter.result.peak_bytes
            scheduler.step()
            sync(device)
            t4 = time.perf_counter()
            timers["optimizer"] += t4 - t3
            step += 1
            if snapshot_until is not None and step >= snapshot_until:
                with atomic_path(out / "memory_snapshot.pickle") as tmp:
                    torch.cuda.memory._dump_snapshot(str(tmp))
                torch.cuda.memory._record_memory_history(enabled=None)
                snapshot_until = None
                log.info("allocator history written to %s", out / "memory_snapshot.pickle")
            step_time = t4 - t_step
            timers["batch"] += step_time
            train_time += step_time
            samples_done += cfg.global_batch_size
            last_loss = all_reduce_(loss_sum.clone()).item() / world
            window["loss"] += last_loss
            window["n"] += 1
            window["t"] += step_time
            window["samples"] += cfg.global_batch_size
            if profiler is not None:
                profiler.step()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{last_loss:.4f}")
            if step % cfg.log_every == 0 or step == total_steps:
                mem, _ = peak_memory(device)
                speed = window["samples"] / max(window["t"], 1e-9)
                row = {
                    "kind": "train",
                    "step": step,
                    "epoch": epoch,
                    "loss": window["loss"] / window["n"],
                    "lr": scheduler.get_last_lr()[0],
                    "grad_norm": float(grad_norm),
                    "samples_per_s": speed,
                    "step_time_ms": 1000 * window["t"] / window["n"],
                    "peak_memory_mb": mem / 2**20,
                }
                history.append(row)
                if rank == 0 and bar is None:
                    log.info(
                        "Step %d/%d | Loss: %.4f | Speed: %.1f samples/sec | Memory: %.1f MB | Time: %.1fms",
                        step,
                        total_steps,
                        row["loss"],
                        speed,
                        row["peak_memory_mb"],
                        row["step_time_ms"],
                    )
                window = {"loss": 0.0, "n": 0, "t": 0.0, "samples": 0}
            end_of_epoch = step % steps_per_epoch == 0 or step == total_steps
            if end_of_epoch and len(val_cells):
                v = validate(model, val_cells, cfg, n_bins, rank, world, device, autocast)
                history.append({"kind": "val", "step": step, "epoch": epoch, **v})
                if rank == 0:
                    log.info(
                        "Validation after epoch %d | loss %.4f | bin accuracy %.4f",
                        epoch,
                        v["val_loss"],
                        v["val_bin_acc"],
                    )
            want_save, want_stop = flags.agreed(device)
            if want_save or (step % cfg.ckpt_every == 0 and step < total_steps):
                checkpoint()
                if rank == 0:
                    log.info(
                        "checkpoint written at step %d (%s)",
                        step,
                        "signal" if want_save else f"every {cfg.ckpt_every} steps",
                    )
            if want_stop:
                if rank == 0:
                    log.warning("stopping on SIGTERM after checkpointing step %d", step)
                stopped = True
                break
            if step >= total_steps:
                break
    if profiler is not None:
        profiler.stop()
    if bar is not None:
        bar.close()

    peak, peak_source = peak_memory(device)
    rss = peak if peak_source == "rss" else None
    if cpu_peak is not None:
        peak, peak_source = cpu_peak, "profiler"
    peaks = all_reduce_(
        torch.tensor([float(peak), float(rss or 0)], device=device), dist.ReduceOp.MAX
    )
    if stopped:
        del model  # see close_distributed
        close_distributed()
        sys.exit(143)

    # ------------------------------------------------------------------ final outputs (rank 0)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        metrics = pd.DataFrame(history)
        with atomic_path(out / "metrics.tsv") as tmp:
            metrics.to_csv(tmp, sep="\t", index=False, float_format="%.6g")
        plot_learning_curve(metrics, out / "learning_curve.png")
        n = max(step, 1)
        summary = {
            "total_samples": samples_done,
            "total_steps": step,
            "average_speed_samples_per_s": samples_done / max(train_time, 1e-9),
            "average_batch_time_ms": 1000 * timers["batch"] / n,
            "average_forward_time_ms": 1000 * timers["forward"] / n,
            "average_backward_time_ms": 1000 * timers["backward"] / n,
            "average_optimizer_time_ms": 1000 * timers["optimizer"] / n,
            "peak_memory_bytes": int(peaks[0].item()),
            "peak_memory_mb": peaks[0].item() / 2**20,
            "peak_memory_source": peak_source,
            "peak_rss_bytes": int(peaks[1].item()) if rss is not None else None,
            "precision": precision,
            "grad_accumulation": accum,
            "final_loss": last_loss,
            "config": {
                "model": model_cfg.to_dict(),
                "train": cfg.to_dict(),
                "fold": fold,
                "final": final,
            },
            "system": system_info(device, world),
        }
        write_text_atomic(out / "performance_summary.json", json.dumps(summary, indent=2) + "\n")
        run_info = {
            "SLURM_JOB_ID": os.environ.get("SLURM_JOB_ID"),
            "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
            **system_info(device, world),
            "steps": step,
            "config_hash": chash,
            "n_train_items": len(train_cells),
            "n_val_items": len(val_cells),
        }
        write_text_atomic(out / "run_info.json", json.dumps(run_info, indent=2) + "\n")
        with atomic_path(out / "model.pt") as tmp:
            torch.save(
                {
                    "model": raw_model.state_dict(),
                    "model_config": model_cfg.to_dict(),
                    "n_genes": len(data.genes),
                    "n_bins": n_bins,
                    "n_labels": n_labels,
                    "label_names": label_names,
                    "train_config": cfg.to_dict(),
                },
                tmp,
            )
        ckpt_path.unlink(missing_ok=True)  # done: a later rerun (e.g. new code) starts afresh
    if dist.is_initialized():
        dist.barrier()
    del model  # DDP's reducer holds the process group: see close_distributed
    close_distributed()


def apply_preflight(spec: dict[str, Any], path: Path) -> dict[str, Any]:
    """``spec`` with the micro-batch the pre-flight chose when it lowered the configured one
    (``memory.auto_micro_batch``); gradient accumulation follows from the global batch."""
    try:
        pf = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: cannot read the pre-flight result ({e})") from e
    if not pf.get("adjusted"):
        return spec
    if "micro_batch_size" not in pf:
        raise InputError(f"{path}: key 'micro_batch_size' is missing")
    train = {**(spec.get("train") or {}), "micro_batch_size": int(pf["micro_batch_size"])}
    log.info(
        "micro_batch_size %s -> %d from the pre-flight (%s)",
        (spec.get("train") or {}).get("micro_batch_size"),
        train["micro_batch_size"],
        path,
    )
    return {**spec, "train": train}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--binned", type=Path, required=True, help="binned data folder (bin rule output)"
    )
    p.add_argument("--split", type=Path, required=True, help="split.tsv (split rule output)")
    p.add_argument(
        "--spec", required=True, help="JSON: {model: {...}, train: {...}, fold, final, prior}"
    )
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument(
        "--ckpt-dir", type=Path, required=True, help="checkpoint folder (kept on failure)"
    )
    p.add_argument(
        "--preflight", type=Path, help="preflight.json: use the micro-batch it chose, if any"
    )
    a = p.parse_args(argv)
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(
        level=logging.INFO if rank == "0" else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    try:
        spec = json.loads(a.spec)
    except json.JSONDecodeError as e:
        raise SystemExit(f"error: --spec is not valid JSON: {e}") from e
    try:
        if a.preflight is not None:
            spec = apply_preflight(spec, a.preflight)
        train(a.binned, a.split, spec, a.out, a.ckpt_dir)
    except InputError as e:
        log.error("%s", e)
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
