"""Train one BioFormer experiment on binned single-cell data, on 1..N processes (DDP).

Read top to bottom: data (cells -> micro-batches) -> distributed helpers -> the checkpoint
folder -> :class:`Trainer` (set-up, data, model and optimizer, resume, the loop, validation and
early stopping, checkpoints, outputs) -> :func:`main`.

Launched by ``python -m evoformer.launch`` (a thin wrapper around ``torchrun``) from the
``train`` rule; also runs as a single process without torchrun::

    python -m evoformer.train --binned results/pbmc68k/hvg64/bins11 --split results/pbmc68k/split.tsv \
        --spec '{"model": {...}, "train": {...}, "fold": -1, "final": false}' \
        --out results/pbmc68k/<exp>/train --ckpt-dir checkpoints/<exp>

Outputs (``--out``): ``model.pt`` (the weights with the best validation ``train.monitor``, or the
last ones without validation, + resolved config), ``metrics.tsv`` (one row per logged step and per
validation), ``learning_curve.png``, ``performance_summary.json`` and ``run_info.json`` (world size,
devices, Slurm job id, the selected step). The peak memory in the summary is
``torch.cuda.max_memory_allocated`` on GPU and, on CPU, the profiler's allocator peak of one
training step (``peak_memory_source``: ``profiler``; the process RSS is kept beside it). Next
to the speed in samples/s the summary gives the model FLOPs per sample (counted once at start on
fake tensors, :mod:`evoformer.flops`), the achieved TFLOP/s and the share of the devices' peak
(``train.peak_tflops``, else the datasheet figure of an A100 / H100 / H200; none on CPU). With
``--preflight`` (the pre-flight's ``preflight.json``) a micro-batch the pre-flight lowered
(``memory.auto_micro_batch``) replaces the configured one. With ``train.memory_snapshot`` on
GPU, ``memory_snapshot.pickle`` holds the allocator history of the first steps.

Checkpoints live in ``--ckpt-dir`` (a folder the rule does not declare as output, so Snakemake's
cleanup of a failed job keeps them): ``last.pt`` (resume; a rerun continues the interrupted run
bit for bit), ``best.pt`` (the best weights so far) and ``lock`` (held by rank 0 for the whole
run: a second training on the same folder stops at once, naming the holder). A checkpoint
written for other settings is moved aside (``last.<hash>.pt``) and training starts afresh; a
corrupt one stops the run with its path.

Divergence: an optimizer step whose loss or gradient norm is not finite on any process (a flag
in the step's one all-reduce, with the loss and the signal flags, taken before the update: every
rank decides alike and none hangs) is skipped: no parameter and no AdamW-state update, the
gradients are dropped. It still counts as a step: ``step``, the learning-rate schedule, the data
order and ``total_samples`` advance as for any step (its batch is consumed, not retried), so a
run with skipped steps ends where one without does and resumes bit for bit. Each skipped step is
logged with its number, is a ``kind == "nonfinite"`` row of ``metrics.tsv`` and counts in
``n_nonfinite_steps`` (``performance_summary.json``); a periodic checkpoint falling on a skipped
step waits for the next finite one. After more than ``train.max_nonfinite_steps`` skipped steps
in a row the run stops, writing nothing, with one line
(:class:`evoformer.errors.TrainingDiverged`) naming the step and the last checkpoint, which stays
as it was: its weights are those of a finite update.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import fcntl
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
import tempfile
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from evoformer.data.arrays import BinnedData
from evoformer.errors import InputError, TrainingDiverged
from evoformer.flops.count import StepCost, count_step
from evoformer.flops.peaks import device_peak, throughput_fields
from evoformer.io import atomic_path, save_torch_atomic, write_text_atomic
from evoformer.memory.measured import record_cpu_peak
from evoformer.memory.spec import StepSpec
from evoformer.metrics import bin_values, metrics_from_sums, moment_sums
from evoformer.model import (
    BioFormer,
    apply_value_mask,
    count_parameters,
    fixed_mask,
    load_prior_network,
    mask_generator,
)
from evoformer.model.fused import adamw_options, compile_model
from evoformer.train_config import RunSpec, TrainConfig, lower_is_better

log = logging.getLogger("evoformer.train")
CHECKPOINT_FORMAT = 2
#: ``mask_generator`` tag of the validation masks (training uses epochs >= 0, evaluation -2).
VAL_MASK_TAG = -1
#: Seed of the validation masks: fixed, so every grid point is validated on the same positions.
VAL_MASK_SEED = 0


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

    def batch(self, items: list[int] | np.ndarray, truth: bool = False) -> dict[str, torch.Tensor]:
        """Batch for group indices ``items``: gene_ids/values/pad_mask [B, S, L], labels [B, S];
        with ``truth`` also ``expression [B, S, L]`` (log1p values) and ``edges [B, S, K-1]``."""
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
        out = {
            "gene_ids": gene_index.clamp(min=0),
            "values": torch.as_tensor(values).view(b, s, -1),
            "pad_mask": gene_index >= 0,
            "labels": torch.as_tensor(self.labels[rows]),
        }
        if truth:
            expr = np.asarray(self.data.expression[flat], dtype=np.float32)[order]
            edges = np.asarray(self.data.edges[flat], dtype=np.float32)[order]
            out["expression"] = torch.as_tensor(expr).view(b, s, -1)
            out["edges"] = torch.as_tensor(edges).view(b, s, -1)
        return out


class TrainBatches(torch.utils.data.Dataset):
    """The masked micro-batches of one epoch, as a map-style dataset for a ``DataLoader``.

    ``plan[i] = (items, step, micro)``: group indices of micro-batch ``i`` and where it sits in
    training; its mask comes from ``mask_generator(seed, epoch, step, micro, rank)``, so workers,
    prefetching and resuming mid-epoch do not change it.
    """

    def __init__(
        self,
        cells: CellBatches,
        plan: list[tuple[np.ndarray, int, int]],
        cfg: TrainConfig,
        n_bins: int,
        epoch: int,
        rank: int,
        with_labels: bool,
    ) -> None:
        self.cells, self.plan, self.cfg = cells, plan, cfg
        self.n_bins, self.epoch, self.rank, self.with_labels = n_bins, epoch, rank, with_labels

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        items, step, micro = self.plan[i]
        batch = self.cells.batch(items)
        gen = mask_generator(self.cfg.seed, self.epoch, step, micro, self.rank)
        values, loss_mask = apply_value_mask(
            batch["values"],
            batch["pad_mask"],
            self.cfg.mask_ratio,
            self.n_bins,
            gen,
            self.cfg.mask_nonzero_fraction,
        )
        batch = {**batch, "values": values, "target": batch["values"], "loss_mask": loss_mask}
        if not self.with_labels:
            batch.pop("labels")
        return batch


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


# ----------------------------------------------------------------------------- checkpoint folder
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


def check_writable(folder: Path, what: str) -> None:
    """Create ``folder`` and write a probe file in it; InputError naming it if that fails."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-probe-"):
            pass
    except OSError as e:
        raise InputError(
            f"{what} {folder} is not writable ({e.strerror or type(e).__name__})"
        ) from e


class CheckpointFolder:
    """``last.pt``, ``best.pt`` and the ``lock`` of one training run (see the module docstring)."""

    def __init__(self, path: Path, rank: int) -> None:
        self.path = Path(path)
        self.rank = rank
        self.last = self.path / "last.pt"
        self.best = self.path / "best.pt"
        self._lock_file: Any = None

    def lock(self) -> None:
        """Rank 0 takes an exclusive lock for the run's lifetime (released when it exits)."""
        if self.rank != 0:
            return
        f = open(self.path / "lock", "a+")  # noqa: SIM115 - held open until the process exits
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise InputError(
                f"checkpoint folder {self.path} is in use by another training ({holder}); "
                "stop that one (or wait for it) before starting this one"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"PID {os.getpid()} on host {socket.gethostname()}\n")
        f.flush()
        self._lock_file = f

    def unlock(self) -> None:
        """Release the lock before the process ends (a run that stopped on divergence)."""
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def load(self, expected_hash: str) -> dict[str, Any] | None:
        """``last.pt`` if it was written for this configuration. One written for another is moved
        aside to ``last.<its hash>.pt`` (kept) and None returned; a corrupt one stops the run.
        Every rank reads, all ranks meet at a barrier, and only then does rank 0 move files (so
        no rank reads a file another has already moved)."""
        ckpt = None
        exists = self.last.exists()
        if exists:
            try:
                ckpt = torch.load(self.last, map_location="cpu", weights_only=False)
            except Exception as e:  # noqa: BLE001 - any unpickling failure means a corrupt file
                raise InputError(
                    f"checkpoint {self.last} is corrupt ({type(e).__name__}); delete it to restart"
                ) from e
        if dist.is_initialized():
            dist.barrier()
        if exists:
            got = ckpt.get("config_hash") if isinstance(ckpt, dict) else None
            if got != expected_hash:
                ckpt = None
                if self.rank == 0:
                    aside = self.path / f"last.{got or 'unknown'}.pt"
                    os.replace(self.last, aside)
                    self.best.unlink(missing_ok=True)
                    log.warning(
                        "checkpoint %s was written for other settings (hash %s, this run %s): "
                        "moved to %s, starting afresh",
                        self.last,
                        got,
                        expected_hash,
                        aside,
                    )
        if dist.is_initialized():
            dist.barrier()
        return ckpt

    def save(self, state: dict[str, Any], device: torch.device) -> None:
        """Gather every rank's RNG state and write ``last.pt`` atomically from rank 0."""
        states = [None] * dist.get_world_size() if dist.is_initialized() else None
        if states is not None:
            dist.all_gather_object(states, rng_state(device))
        else:
            states = [rng_state(device)]
        if self.rank == 0:
            save_torch_atomic({**state, "rng": states}, self.last)
        if dist.is_initialized():
            dist.barrier()

    def save_best(self, weights: dict[str, torch.Tensor]) -> None:
        if self.rank == 0:
            save_torch_atomic(weights, self.best)

    def load_best(self) -> dict[str, torch.Tensor]:
        try:
            return torch.load(self.best, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise InputError(f"checkpoint {self.best} is corrupt ({type(e).__name__})") from e

    def finish(self) -> None:
        """The run's outputs are written: a later rerun (e.g. new code) starts afresh."""
        if self.rank == 0:
            self.last.unlink(missing_ok=True)
            self.best.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- helpers
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

    def take(self) -> tuple[float, float]:
        flags = float(self.save), float(self.stop)
        self.save = self.stop = False
        return flags


class LossForward(torch.nn.Module):
    """``forward(batch) = model.loss(batch)``: lets DDP see (and all-reduce) the whole loss graph."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        return self.model.loss_terms(batch)


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


def system_info(device: torch.device, world: int) -> dict[str, Any]:
    return {
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


def plot_learning_curve(metrics: pd.DataFrame, monitor: str, path: Path) -> None:
    """Training and validation loss (left) and the monitored validation metric (right)."""
    from matplotlib.figure import Figure  # no pyplot: no backend state, 0.7 s less to import

    fig = Figure(figsize=(10, 4))
    ax, ax_m = fig.subplots(1, 2)
    tr = metrics[metrics["kind"] == "train"] if "kind" in metrics else metrics.iloc[:0]
    va = metrics[metrics["kind"] == "val"] if "kind" in metrics else metrics.iloc[:0]
    if len(tr):
        ax.plot(tr["step"], tr["loss"], label="train loss")
    if len(va):
        ax.plot(va["step"], va["val_loss"], "o-", label="validation loss")
        ax_m.plot(va["step"], va[monitor], "o-", color="C2")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("masked-value loss (bin space)")
    ax.legend()
    ax_m.set_xlabel("optimizer step")
    ax_m.set_ylabel(monitor + " (expression space)" if "expr" in monitor else monitor)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)


# ----------------------------------------------------------------------------- the trainer
class Trainer:
    """One training run: ``Trainer(...).run()``. The constructor does the set-up (settings,
    processes, data, model and optimizer, resume); :meth:`run` is the loop and the outputs."""

    def __init__(
        self, binned: Path, split_path: Path, spec: RunSpec, out: Path, ckpt_dir: Path
    ) -> None:
        self.spec, self.cfg, self.out = spec, spec.train, Path(out)
        self.rank, self.world, self.device = setup_distributed(self.cfg.dist_timeout_s)
        self.accum = self.cfg.grad_accumulation(self.world)
        if self.device.type == "cpu":
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.precision = (
            self.cfg.precision
            if self.cfg.precision != "auto"
            else ("bf16" if self.device.type == "cuda" else "fp32")
        )
        self.autocast = (
            torch.autocast(self.device.type, dtype=torch.bfloat16)
            if self.precision == "bf16"
            else nullcontext()
        )
        if self.rank == 0:
            check_writable(self.out, "output folder")
            check_writable(Path(ckpt_dir), "checkpoint folder")
        self.ckpt = CheckpointFolder(Path(ckpt_dir), self.rank)
        self.ckpt.lock()
        if self.rank == 0:
            where = f"{self.world} x {self.device.type}" + (
                " (no CUDA device: CPU fallback with gloo)" if self.device.type == "cpu" else ""
            )
            log.info(
                "training on %s, precision %s, grad accumulation %d",
                where,
                self.precision,
                self.accum,
            )
        self._load_data(binned, split_path)
        self._build_model()
        self._resume()
        self.step_cost = self._count_flops() if self.rank == 0 else None

    # ------------------------------------------------------------------ set-up
    def _load_data(self, binned: Path, split_path: Path) -> None:
        """Memory-mapped arrays; the rows of this run's training and validation cells."""
        cfg, spec = self.cfg, self.spec
        self.data = BinnedData.open(binned)
        self.n_bins = int(self.data.meta["n_bins"])
        labels, self.label_names = label_codes(self.data.cells)
        rows = select_rows(
            pd.read_csv(split_path, sep="\t"), self.data.cells, spec.fold, spec.final
        )
        s = spec.model.n_cells_per_msa
        self.train_cells = CellBatches(self.data, rows["train"], labels, s)
        self.val_cells = CellBatches(self.data, rows["val"], labels, s)
        if len(self.train_cells) < cfg.micro_batch_size * self.world:
            raise InputError(
                f"{split_path}: {len(self.train_cells)} training items is fewer than one global "
                f"micro-batch ({cfg.micro_batch_size} x {self.world} processes)"
            )
        self.sampler = torch.utils.data.DistributedSampler(
            range(len(self.train_cells)),
            num_replicas=self.world,
            rank=self.rank,
            shuffle=True,
            seed=cfg.seed,
            drop_last=True,
        )
        self.steps_per_epoch = len(self.sampler) // (cfg.micro_batch_size * self.accum)
        if self.steps_per_epoch < 1:
            raise InputError(
                f"train.global_batch_size {cfg.global_batch_size} exceeds the "
                f"{len(self.train_cells)} training items"
            )
        if spec.final and spec.final_epochs is not None:
            total = max(1, round(spec.final_epochs * self.steps_per_epoch))
        else:
            total = cfg.epochs * self.steps_per_epoch
        self.total_steps = min(total, cfg.max_steps) if cfg.max_steps is not None else total
        self.val_every = cfg.val_every or self.steps_per_epoch

    def _build_model(self) -> None:
        """BioFormer (DDP-wrapped with > 1 process), AdamW and the warmup-cosine schedule."""
        cfg, spec = self.cfg, self.spec
        torch.manual_seed(cfg.seed)
        self.n_labels = len(self.label_names) if cfg.label_head else 0
        if cfg.label_head and not self.n_labels:
            raise InputError(
                f"train.label_head is true but {self.data.folder}/cells.tsv has no label column"
            )
        prior = None
        if spec.prior is not None:
            genes = self.data.genes["gene_id"].astype(str).tolist()
            prior = load_prior_network(spec.prior.path, genes, spec.prior.min_gene_share)
        self.raw_model = BioFormer(
            spec.model,
            n_genes=len(self.data.genes),
            n_bins=self.n_bins,
            n_labels=self.n_labels,
            prior=prior,
            prior_mode=spec.prior.mode if spec.prior is not None else "init",
        )
        self.raw_model.to(self.device)
        # DDP only synchronises gradients of computations run through its forward, so the loss
        # is computed inside forward by a thin wrapper: model(batch) -> (loss, metrics).
        # train.compile: fused paths / torch.compile, applied in place (evoformer.model.fused)
        inner = compile_model(self.raw_model, cfg.compile)
        self.model: torch.nn.Module = LossForward(inner)
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DDP(self.model, device_ids=ids)
        self.optimizer = torch.optim.AdamW(
            self.raw_model.parameters(),
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            **adamw_options(cfg.compile),
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(cfg, self.total_steps)
        )

    def _count_flops(self) -> StepCost | None:
        """The model FLOPs of one micro-batch, counted once on fake tensors (:mod:`evoformer.flops`)
        for this run's shapes, precision and device; None (with a warning) if counting fails:
        the accounting never stops a training."""
        spec = StepSpec(
            model=self.spec.model,
            batch_size=self.cfg.micro_batch_size,
            seq_len=int(self.data.values.shape[1]),
            n_genes=len(self.data.genes),
            n_bins=self.n_bins,
            n_labels=self.n_labels,
            precision=self.precision,
            device=self.device.type,
            prior=self.spec.prior is not None,
        )
        try:
            cost = count_step(spec, traffic=False)
        except Exception as exc:  # noqa: BLE001 - reported, not fatal
            log.warning("model FLOPs not counted (%s: %s)", type(exc).__name__, exc)
            return None
        log.info(
            "model FLOPs per sample: %.4g GFLOP forward + backward%s (counted in %.1f s)",
            cost.model_flops_per_sample / 1e9,
            f", {cost.hardware_flops_per_sample / 1e9:.4g} GFLOP with the checkpoint recompute"
            if cost.recompute_counted
            else "",
            cost.seconds,
        )
        return cost

    def _resume(self) -> None:
        """Continue from ``last.pt`` when it matches these settings; else start at step 0."""
        self.chash = config_hash(self.spec.to_dict(), self.data.meta, self.world)
        self.step, self.history = 0, []
        self.timers = {"batch": 0.0, "forward": 0.0, "backward": 0.0, "optimizer": 0.0}
        self.samples_done, self.train_time = 0, 0.0
        self.measured_steps = 0  # steps run under the memory profiler (not timed)
        self.best = {"metric": math.nan, "step": 0, "since": 0}
        self.finished = False  # all steps done or stopped early
        self.resumed_finished = False  # resumed from the final checkpoint: only outputs left
        self.n_nonfinite_steps = 0  # optimizer steps skipped for a non-finite loss / grad norm
        self.nonfinite_streak = 0  # ... of them in a row up to the current step
        self.ckpt_step: int | None = None  # step of last.pt (None: none written or resumed)
        self.ckpt_pending = False  # a periodic checkpoint fell on a skipped step
        ckpt = self.ckpt.load(self.chash)
        if ckpt is not None:
            self.raw_model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            keys = ("step", "history", "timers", "samples_done", "train_time", "best")
            for key in (*keys, "measured_steps"):
                setattr(self, key, ckpt[key])
            self.finished = self.resumed_finished = ckpt["finished"]
            # absent from checkpoints written before divergence was handled: none seen then
            self.n_nonfinite_steps = ckpt.get("n_nonfinite_steps", 0)
            self.nonfinite_streak = ckpt.get("nonfinite_streak", 0)
            self.ckpt_step = self.step
            set_rng_state(ckpt["rng"][self.rank], self.device)
            if self.rank == 0:
                log.info(
                    "resumed from %s at step %d/%d", self.ckpt.last, self.step, self.total_steps
                )
        else:
            torch.manual_seed(self.cfg.seed * 1000 + self.rank)  # per-rank dropout stream

    def _checkpoint(self, why: str) -> None:
        state = {
            "format": CHECKPOINT_FORMAT,
            "config_hash": self.chash,
            "model": self.raw_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "history": self.history,
            "timers": self.timers,
            "samples_done": self.samples_done,
            "train_time": self.train_time,
            "best": self.best,
            "measured_steps": self.measured_steps,
            "finished": self.finished,
            "n_nonfinite_steps": self.n_nonfinite_steps,
            "nonfinite_streak": self.nonfinite_streak,
        }
        self.ckpt.save(state, self.device)
        self.ckpt_step, self.ckpt_pending = self.step, False
        if self.rank == 0:
            log.info("checkpoint written at step %d (%s)", self.step, why)

    # ------------------------------------------------------------------ the loop
    def _epoch_loader(self, epoch: int, first_step: int) -> torch.utils.data.DataLoader:
        """Micro-batches of ``epoch`` from optimizer step ``first_step`` (within the epoch) on."""
        cfg = self.cfg
        self.sampler.set_epoch(epoch)
        order = np.asarray(list(self.sampler))
        plan = []
        for s in range(first_step, self.steps_per_epoch):
            for micro in range(self.accum):
                i0 = (s * self.accum + micro) * cfg.micro_batch_size
                step = epoch * self.steps_per_epoch + s
                plan.append((order[i0 : i0 + cfg.micro_batch_size], step, micro))
        ds = TrainBatches(
            self.train_cells, plan, cfg, self.n_bins, epoch, self.rank, self.n_labels > 0
        )
        workers = cfg.loader_workers
        return torch.utils.data.DataLoader(
            ds,
            batch_size=None,
            shuffle=False,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=4 if workers else None,
            # its own generator: a loader draws its base seed when iterated, which from the
            # global generator would shift the dropout stream of a resumed run
            generator=torch.Generator().manual_seed(cfg.seed),
        )

    def run(self) -> None:
        """Train until the last step or early stopping, then write the outputs (rank 0)."""
        cfg = self.cfg
        flags = SignalFlags()
        profiler = self._start_profiler()
        snapshot_until = self._start_memory_snapshot()
        self.model.train()
        self.cpu_peak: int | None = None
        window = {"loss": 0.0, "n": 0, "t": 0.0, "samples": 0, "timed": 0}
        stopped = False
        diverged: str | None = None  # the stop line when the run diverged
        while self.step < self.total_steps and not (self.finished or stopped or diverged):
            epoch, in_epoch = divmod(self.step, self.steps_per_epoch)
            batches = iter(self._epoch_loader(epoch, in_epoch))
            for _ in range(in_epoch, self.steps_per_epoch):
                step, grad_norm, step_time = self._train_step(batches, profiler is None, flags)
                self.step += 1
                if snapshot_until is not None and self.step >= snapshot_until:
                    self._dump_memory_snapshot()
                    snapshot_until = None
                if step.finite:
                    self.nonfinite_streak = 0
                    window["loss"] += step.loss
                    window["n"] += 1
                else:
                    diverged = self._skipped_step(epoch, step.loss, grad_norm)
                    if diverged:
                        break
                if step_time > 0:  # 0: the profiled step, not timed
                    window["t"] += step_time
                    window["samples"] += cfg.global_batch_size
                    window["timed"] += 1
                if profiler is not None:
                    profiler.step()
                if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                    self._log_train(epoch, window, grad_norm)
                    window = {"loss": 0.0, "n": 0, "t": 0.0, "samples": 0, "timed": 0}
                if len(self.val_cells) and (
                    self.step % self.val_every == 0 or self.step == self.total_steps
                ):
                    self._validate_and_track(epoch)
                if self.step == self.total_steps:
                    self.finished = True
                if self.finished:
                    break
                due = self.step % cfg.ckpt_every == 0 or self.ckpt_pending
                if step.save or (due and step.finite):
                    why = "signal" if step.save else f"every {cfg.ckpt_every} steps"
                    self._checkpoint(why)
                elif due:  # not right after a skipped step: the next finite step writes it
                    self.ckpt_pending = True
                if step.stop:
                    if self.rank == 0:
                        log.warning("stopping on SIGTERM after checkpointing step %d", self.step)
                    stopped = True
                    break
        if profiler is not None:
            profiler.stop()
        if diverged:
            del self.model  # see close_distributed
            close_distributed()
            self.ckpt.unlock()
            raise TrainingDiverged(diverged)
        if stopped:
            del self.model  # see close_distributed
            close_distributed()
            sys.exit(143)
        if not self.resumed_finished:
            # the final state first: writing the outputs can fail (full disk, permissions)
            self.finished = True
            self._checkpoint("final")
        self._write_outputs()
        del self.model  # DDP's reducer holds the process group: see close_distributed
        close_distributed()

    def _train_step(
        self, batches: Any, may_measure: bool, signals: SignalFlags
    ) -> tuple[StepFlags, torch.Tensor, float]:
        """One optimizer step (``accum`` micro-batches): (the step's collective, grad norm,
        seconds). Not finite on any rank: the update is skipped (see the module docstring)."""
        cfg, device, timers = self.cfg, self.device, self.timers
        # on CPU, one step (the second: AdamW's moments exist) under the profiler's allocator
        # timeline gives the step's peak tensor memory (RSS counts far more)
        measure = (
            device.type == "cpu"
            and may_measure
            and self.cpu_peak is None
            and (self.step >= 1 or self.total_steps == 1)
        )
        meter = record_cpu_peak(self.raw_model, self.optimizer) if measure else None
        if meter is not None:
            meter.__enter__()
        t_step = time.perf_counter()
        fwd_bwd = {"forward": 0.0, "backward": 0.0}
        loss_sum = torch.zeros((), device=device)
        for micro in range(self.accum):
            batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
            last = micro == self.accum - 1
            sync_ctx = self.model.no_sync() if self.world > 1 and not last else nullcontext()
            with sync_ctx:
                t0 = time.perf_counter()
                with self.autocast:
                    loss, _ = self.model(batch)
                sync(device)
                t1 = time.perf_counter()
                (loss / self.accum).backward()
                sync(device)
                t2 = time.perf_counter()
            for key, dt in (("forward", t1 - t0), ("backward", t2 - t1)):
                timers[key] += dt
                fwd_bwd[key] += dt
            loss_sum += loss.detach() / self.accum
        t3 = time.perf_counter()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), cfg.grad_clip)
        step = reduce_step(loss_sum, grad_norm, signals.take())
        if step.finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if meter is not None:
            meter.__exit__(None, None, None)
            self.cpu_peak = meter.result.peak_bytes
        with warnings.catch_warnings():
            # a skipped first step: the schedule advances although the optimizer did not step
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
            self.scheduler.step()
        sync(device)
        t4 = time.perf_counter()
        self.samples_done += cfg.global_batch_size
        if meter is not None:  # the profiled step is instrumentation, not training speed
            for key in ("forward", "backward"):
                timers[key] -= fwd_bwd[key]
            self.measured_steps += 1
            return step, grad_norm, 0.0
        timers["optimizer"] += t4 - t3
        timers["batch"] += t4 - t_step
        self.train_time += t4 - t_step
        return step, grad_norm, t4 - t_step

    def _skipped_step(self, epoch: int, loss: float, grad_norm: torch.Tensor) -> str | None:
        """Count and log the skipped step ``self.step`` (``loss``: mean over the ranks); the
        one-line stop message once more than ``train.max_nonfinite_steps`` are in a row."""
        limit = self.cfg.max_nonfinite_steps
        self.n_nonfinite_steps += 1
        self.nonfinite_streak += 1
        norm = float(grad_norm)
        row = {"kind": "nonfinite", "step": self.step, "epoch": epoch, "loss": loss}
        self.history.append({**row, "grad_norm": norm})
        if self.rank == 0:
            log.warning(
                "step %d: non-finite loss (%g) or gradient norm (%g): optimizer step skipped "
                "(%d in a row, %d in all; train.max_nonfinite_steps %d)",
                self.step,
                loss,
                norm,
                self.nonfinite_streak,
                self.n_nonfinite_steps,
                limit,
            )
        if self.nonfinite_streak <= limit:
            return None
        where = (
            f"the last good checkpoint is {self.ckpt.last} (step {self.ckpt_step}), left as it was"
            if self.ckpt_step is not None
            else "no checkpoint was written before it (a rerun starts at step 0)"
        )
        return (
            f"training diverged at step {self.step}: the loss or gradient norm was not finite "
            f"for {self.nonfinite_streak} optimizer steps in a row (more than "
            f"train.max_nonfinite_steps = {limit}; {self.n_nonfinite_steps} skipped in all); "
            f"{where}; lower train.lr, raise train.warmup_steps or use train.precision fp32"
        )

    def _log_train(self, epoch: int, window: dict[str, float], grad_norm: torch.Tensor) -> None:
        mem, _ = peak_memory(self.device)
        speed = window["samples"] / max(window["t"], 1e-9)
        row = {
            "kind": "train",
            "step": self.step,
            "epoch": epoch,
            "loss": window["loss"] / window["n"] if window["n"] else math.nan,
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": float(grad_norm),
            "samples_per_s": speed,
            "step_time_ms": 1000 * window["t"] / max(window["timed"], 1),
            "peak_memory_mb": mem / 2**20,
        }
        self.history.append(row)
        if self.rank == 0:
            log.info(
                "Step %d/%d | Loss: %.4f | Speed: %.1f samples/sec | Memory: %.1f MB | Time: %.1fms",
                self.step,
                self.total_steps,
                row["loss"],
                speed,
                row["peak_memory_mb"],
                row["step_time_ms"],
            )

    # ------------------------------------------------------------------ validation, early stop
    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Masked-value metrics on this rank's shard of the validation cells, all-reduced.

        The mask of validation group ``i`` is ``fixed_mask(..., VAL_MASK_SEED, VAL_MASK_TAG, i)``
        with ``spec.val_mask_ratio``: the same positions at every validation, for every grid
        point, batch size and number of processes. Returns ``val_loss``, ``val_bin_acc`` (bin
        space) and ``val_expr_*`` (expression space, see :mod:`evoformer.metrics`).
        """
        model, cells = self.raw_model, self.val_cells
        model.eval()
        # loss*n, correct, n, then moment sums (pred, true) over all and non-zero positions
        sums = torch.zeros(15, dtype=torch.float64)
        idx = np.arange(self.rank, len(cells), self.world)
        for i in range(0, len(idx), self.cfg.micro_batch_size):
            items = idx[i : i + self.cfg.micro_batch_size]
            batch = cells.batch(items, truth=True)
            values, loss_mask = fixed_mask(
                batch["values"],
                batch["pad_mask"],
                self.spec.val_mask_ratio,
                self.n_bins,
                VAL_MASK_SEED,
                VAL_MASK_TAG,
                items,
            )
            with self.autocast:
                out = model(
                    batch["gene_ids"].to(self.device),
                    values.to(self.device),
                    batch["pad_mask"].to(self.device),
                )
            pred = out["pred"].float().cpu()
            per, hit = model.value_terms(pred, batch["values"])
            expr, _ = model.decode_expression(pred, bin_values(batch["edges"]))
            lm = loss_mask
            true = batch["expression"][lm].double()
            nz = true > 0
            sums += torch.cat(
                [
                    torch.stack(
                        [per[lm].double().sum(), hit[lm].double().sum(), lm.sum().double()]
                    ),
                    moment_sums(expr[lm], true),
                    moment_sums(expr[lm][nz], true[nz]),
                ]
            )
        sums = all_reduce_(sums.to(self.device)).cpu()
        model.train()
        n = max(sums[2].item(), 1.0)
        out = {"val_loss": sums[0].item() / n, "val_bin_acc": sums[1].item() / n}
        expr = metrics_from_sums({"all": sums[3:9].numpy(), "nonzero": sums[9:15].numpy()})
        out.update({f"val_{k}": v for k, v in expr.items()})
        return out

    def _validate_and_track(self, epoch: int) -> None:
        """Validate; keep the best weights; decide early stopping (the same on every rank)."""
        cfg = self.cfg
        v = self.validate()
        self.history.append({"kind": "val", "step": self.step, "epoch": epoch, **v})
        value = v[cfg.monitor]
        sign = 1.0 if lower_is_better(cfg.monitor) else -1.0
        best = self.best["metric"]
        improved = math.isfinite(value) and (
            not math.isfinite(best) or sign * (best - value) > cfg.min_delta
        )
        if improved:
            self.best = {"metric": value, "step": self.step, "since": 0}
            self.ckpt.save_best(
                {k: t.detach().cpu().clone() for k, t in self.raw_model.state_dict().items()}
            )
        else:
            self.best["since"] += 1
        if self.rank == 0:
            log.info(
                "Validation at step %d (epoch %d) | loss %.4f | bin accuracy %.4f | "
                "expr MSE %.4f (non-zero %.4f) | %s %.4f%s",
                self.step,
                epoch,
                v["val_loss"],
                v["val_bin_acc"],
                v["val_expr_mse"],
                v["val_expr_mse_nonzero"],
                cfg.monitor,
                value,
                " (best)" if improved else f" (best {best:.4f} at step {self.best['step']})",
            )
        if cfg.patience is not None and self.best["since"] >= cfg.patience:
            self.finished = True
            if self.rank == 0:
                log.info(
                    "early stopping at step %d: %s has not improved for %d validations; "
                    "best %.4f at step %d",
                    self.step,
                    cfg.monitor,
                    cfg.patience,
                    self.best["metric"],
                    self.best["step"],
                )

    # ------------------------------------------------------------------ profiling helpers
    def _start_profiler(self) -> Any:
        p = self.cfg.profiler
        if not (p.enabled and self.rank == 0):
            return None
        profiler = torch.profiler.profile(
            schedule=torch.profiler.schedule(
                wait=max(0, p.start_step - 1), warmup=1, active=p.active_steps, repeat=1
            ),
            on_trace_ready=torch.profiler.tensorboard_trace_handler(str(self.out / "profile")),
            profile_memory=True,
            record_shapes=True,
        )
        profiler.start()
        return profiler

    def _start_memory_snapshot(self) -> int | None:
        """CUDA allocator history of the first 3 steps (``train.memory_snapshot``, rank 0)."""
        if not (self.cfg.memory_snapshot and self.rank == 0):
            return None
        if self.device.type != "cuda":
            log.info("train.memory_snapshot records CUDA allocations: nothing to record on CPU")
            return None
        torch.cuda.memory._record_memory_history(max_entries=1_000_000)
        return min(self.step + 3, self.total_steps)

    def _dump_memory_snapshot(self) -> None:
        with atomic_path(self.out / "memory_snapshot.pickle") as tmp:
            torch.cuda.memory._dump_snapshot(str(tmp))
        torch.cuda.memory._record_memory_history(enabled=None)
        log.info("allocator history written to %s", self.out / "memory_snapshot.pickle")

    # ------------------------------------------------------------------ outputs
    def _write_outputs(self) -> None:
        """model.pt (best weights when validated), metrics.tsv, the curve, the summaries."""
        peak, source = peak_memory(self.device)
        rss = peak if source == "rss" else None
        if self.cpu_peak is not None:
            peak, source = self.cpu_peak, "profiler"
        peaks = all_reduce_(
            torch.tensor([float(peak), float(rss or 0)], device=self.device), dist.ReduceOp.MAX
        )
        if self.rank == 0:
            self._write_rank0_outputs(int(peaks[0].item()), source, rss, int(peaks[1].item()))
        if dist.is_initialized():
            dist.barrier()
        self.ckpt.finish()

    def _write_rank0_outputs(self, peak: int, source: str, rss: int | None, peak_rss: int) -> None:
        cfg, out, spec = self.cfg, self.out, self.spec
        weights = self.raw_model.state_dict()
        selected_step, selected = self.step, "last"
        if self.ckpt.best.exists() and math.isfinite(self.best["metric"]):
            weights, selected_step, selected = self.ckpt.load_best(), self.best["step"], "best"
        log.info(
            "model.pt: weights of step %d (%s%s)",
            selected_step,
            selected,
            f", {cfg.monitor} {self.best['metric']:.4f}" if selected == "best" else "",
        )
        metrics = pd.DataFrame(self.history)
        with atomic_path(out / "metrics.tsv") as tmp:
            metrics.to_csv(tmp, sep="\t", index=False, float_format="%.6g")
        plot_learning_curve(metrics, cfg.monitor, out / "learning_curve.png")
        n = max(self.step - self.measured_steps, 1)
        n_params = count_parameters(self.raw_model)["total"]
        selection = {
            "selected_weights": selected,
            "selected_step": selected_step,
            "selected_epochs": selected_step / self.steps_per_epoch,
            "monitor": cfg.monitor,
            "best_metric": self.best["metric"] if math.isfinite(self.best["metric"]) else None,
            "stopped_early": self.step < self.total_steps,
        }
        speed = cfg.global_batch_size * n / max(self.train_time, 1e-9)
        device_name = system_info(self.device, self.world)["device"]
        peak_tflops, peak_source = device_peak(device_name, self.precision, cfg.peak_tflops)
        summary = {
            "total_samples": self.samples_done,
            "total_steps": self.step,
            "steps_per_epoch": self.steps_per_epoch,
            "average_speed_samples_per_s": speed,
            **throughput_fields(self.step_cost, speed, self.world, peak_tflops, peak_source),
            "average_batch_time_ms": 1000 * self.timers["batch"] / n,
            "average_forward_time_ms": 1000 * self.timers["forward"] / n,
            "average_backward_time_ms": 1000 * self.timers["backward"] / n,
            "average_optimizer_time_ms": 1000 * self.timers["optimizer"] / n,
            "peak_memory_bytes": peak,
            "peak_memory_mb": peak / 2**20,
            "peak_memory_source": source,
            "peak_rss_bytes": peak_rss if rss is not None else None,
            "precision": self.precision,
            "grad_accumulation": self.accum,
            "n_nonfinite_steps": self.n_nonfinite_steps,
            "final_loss": next(
                (r["loss"] for r in reversed(self.history) if r["kind"] == "train"), None
            ),
            "n_parameters": n_params,
            "flops": None if self.step_cost is None else self.step_cost.to_dict(),
            **selection,
            "config": {
                "model": spec.model.to_dict(),
                "train": cfg.to_dict(),
                "fold": spec.fold,
                "final": spec.final,
            },
            "system": system_info(self.device, self.world),
        }
        write_text_atomic(out / "performance_summary.json", json.dumps(summary, indent=2) + "\n")
        run_info = {
            "SLURM_JOB_ID": os.environ.get("SLURM_JOB_ID"),
            "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
            **system_info(self.device, self.world),
            "steps": self.step,
            **selection,
            "config_hash": self.chash,
            "n_train_items": len(self.train_cells),
            "n_val_items": len(self.val_cells),
        }
        write_text_atomic(out / "run_info.json", json.dumps(run_info, indent=2) + "\n")
        model_file = {
            "model": weights,
            "model_config": spec.model.to_dict(),
            "n_genes": len(self.data.genes),
            "n_bins": self.n_bins,
            "n_labels": self.n_labels,
            "label_names": self.label_names,
            "train_config": cfg.to_dict(),
            "selected_step": selected_step,
            "n_parameters": n_params,
        }
        save_torch_atomic(model_file, out / "model.pt")


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


def train(
    binned: Path, split_path: Path, spec: dict[str, Any] | RunSpec, out: Path, ckpt_dir: Path
) -> None:
    """Run (or resume) one training run; see the module docstring for inputs and outputs."""
    if not isinstance(spec, RunSpec):
        spec = RunSpec.from_dict(spec)
    Trainer(Path(binned), Path(split_path), spec, Path(out), Path(ckpt_dir)).run()


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
    if "TORCHELASTIC_RUN_ID" in os.environ:  # started by torchrun: never outlive it
        die_with_parent()
    try:
        spec = json.loads(a.spec)
    except json.JSONDecodeError as e:
        raise SystemExit(f"error: --spec is not valid JSON: {e}") from e
    try:
        if a.preflight is not None:
            spec = apply_preflight(spec, a.preflight)
        train(a.binned, a.split, RunSpec.from_dict(spec), a.out, a.ckpt_dir)
    except InputError as e:
        if isinstance(e, TrainingDiverged) and rank != "0":
            raise SystemExit(1) from None  # every rank stops at the same step; rank 0 says why
        log.error("%s", e)
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
