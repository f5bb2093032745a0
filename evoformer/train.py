"""Train one BioFormer on binned single-cell data for one task, on 1..N processes (DDP).

Read top to bottom: helpers -> :class:`Trainer` (set-up, the task, model and optimizer, resume,
the loop, validation and early stopping, checkpoints, outputs) -> :func:`main`. The trainer
knows nothing task-specific: the task (``spec.task``, :mod:`evoformer.tasks`: masked
expression or perturbation) gives its items, batches, model, loss and validation metrics. The
process group is :mod:`evoformer.distributed`, the checkpoint folder :mod:`evoformer.checkpoint`.
With ``spec.init`` (a ``model.pt``) the model starts from those weights
(:func:`evoformer.model.saved.init_from_pretrained`: fine-tuning).

Launched by ``python -m evoformer.launch`` (a thin wrapper around ``torchrun``) from the
``train`` rule (and ``perturb_train``); also runs as a single process without torchrun::

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
import json
import logging
import math
import os
import platform
import resource
import signal
import socket
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from evoformer.checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointFolder,
    check_writable,
    config_hash,
    set_rng_state,
)
from evoformer.distributed import (
    StepFlags,
    all_reduce_,
    close_distributed,
    die_with_parent,
    reduce_step,
    setup_distributed,
    sync,
)
from evoformer.errors import InputError, TrainingDiverged
from evoformer.flops.count import StepCost, count_step
from evoformer.flops.peaks import device_peak, throughput_fields
from evoformer.io import atomic_path, save_torch_atomic, write_text_atomic
from evoformer.memory.measured import record_cpu_peak
from evoformer.memory.spec import resolve_precision
from evoformer.model import count_parameters
from evoformer.model.fused import adamw_options, compile_mode, compile_model
from evoformer.model.saved import init_from_pretrained
from evoformer.tasks import TASKS, StepContext, TaskInputs, TaskLoss
from evoformer.train_config import RunSpec, TrainConfig, lower_is_better

log = logging.getLogger("evoformer.train")


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


def plot_learning_curve(metrics: pd.DataFrame, monitor: str, loss_label: str, path: Path) -> None:
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
    ax.set_ylabel(loss_label)
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

    def __init__(self, inputs: TaskInputs, spec: RunSpec, out: Path, ckpt_dir: Path) -> None:
        self.spec, self.cfg, self.out = spec, spec.train, Path(out)
        self.rank, self.world, self.device = setup_distributed(self.cfg.dist_timeout_s)
        self.accum = self.cfg.grad_accumulation(self.world)
        if self.device.type == "cpu":
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.precision = resolve_precision(self.cfg.precision, self.device.type)
        self.autocast = (
            torch.autocast(self.device.type, dtype=torch.bfloat16)
            if self.precision == "bf16"
            else nullcontext()
        )
        # auto: the mode measured to win on this device type (evoformer.model.fused.AUTO_COMPILE)
        self.compile_mode = compile_mode(self.cfg.compile, self.device.type)
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
                "training on %s, precision %s, step %s, grad accumulation %d",
                where,
                self.precision,
                self.compile_mode,
                self.accum,
            )
        self.context = StepContext(
            self.device, self.rank, self.world, self.autocast, self.cfg.micro_batch_size
        )
        self._load_data(inputs)
        self._build_model()
        self._resume()
        self.step_cost = self._count_flops() if self.rank == 0 else None

    # ------------------------------------------------------------------ set-up
    def _load_data(self, inputs: TaskInputs) -> None:
        """The task (its data: memory-mapped arrays, this run's training and validation
        items); the sampler and the number of steps."""
        cfg, spec = self.cfg, self.spec
        self.task = TASKS[spec.task](spec, inputs)
        n_items = self.task.n_train_items
        if n_items < cfg.micro_batch_size * self.world:
            raise InputError(
                f"{inputs.split}: {n_items} training items is fewer than one global "
                f"micro-batch ({cfg.micro_batch_size} x {self.world} processes)"
            )
        self.sampler = torch.utils.data.DistributedSampler(
            range(n_items),
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
                f"{n_items} training items"
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
        self.raw_model = self.task.build_model()
        self.init_report = None
        if spec.init is not None:
            self.init_report = init_from_pretrained(self.raw_model, spec.init, self.task.genes)
        self.raw_model.to(self.device)
        # DDP only synchronises gradients of computations run through its forward, so the loss
        # is computed inside forward by a thin wrapper: model(batch) -> (loss, metrics).
        # train.compile: fused paths / torch.compile, applied in place (evoformer.model.fused)
        inner = compile_model(self.raw_model, self.compile_mode)
        self.model: torch.nn.Module = TaskLoss(inner, self.task)
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DDP(self.model, device_ids=ids)
        self.optimizer = torch.optim.AdamW(
            self.raw_model.parameters(),
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            **adamw_options(self.compile_mode),
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(cfg, self.total_steps)
        )

    def _count_flops(self) -> StepCost | None:
        """The model FLOPs of one micro-batch, counted once on fake tensors (:mod:`evoformer.flops`)
        for this run's shapes, precision and device; None (with a warning) if counting fails:
        the accounting never stops a training."""
        spec = self.task.step_spec(self.cfg.micro_batch_size, self.precision, self.device.type)
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
        self.chash = config_hash(self.spec.to_dict(), self.task.data_meta, self.world)
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
        ds = self.task.epoch_batches(plan, epoch, self.rank)
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
                if self.task.n_val_items and (
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
        """The task's validation metrics (all-reduced), the model in eval mode meanwhile."""
        self.raw_model.eval()
        out = self.task.validate(self.raw_model, self.context)
        self.raw_model.train()
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
                "Validation at step %d (epoch %d) | %s | %s %.4f%s",
                self.step,
                epoch,
                self.task.validation_line(v),
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
        plot_learning_curve(metrics, cfg.monitor, self.task.loss_label, out / "learning_curve.png")
        n = max(self.step - self.measured_steps, 1)
        n_params = count_parameters(self.raw_model)["total"]
        selection = {
            "selected_weights": selected,
            "selected_step": selected_step,
            "selected_epochs": selected_step / self.steps_per_epoch,
            "monitor": cfg.monitor,
            "n_val_items": self.task.n_val_items,
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
            "compile": self.compile_mode,
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
        summary["task"] = spec.task
        if self.init_report is not None:
            summary["init"] = self.init_report
        write_text_atomic(out / "performance_summary.json", json.dumps(summary, indent=2) + "\n")
        run_info = {
            "SLURM_JOB_ID": os.environ.get("SLURM_JOB_ID"),
            "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
            **system_info(self.device, self.world),
            "steps": self.step,
            **selection,
            "config_hash": self.chash,
            "n_train_items": self.task.n_train_items,
            "n_val_items": self.task.n_val_items,
        }
        write_text_atomic(out / "run_info.json", json.dumps(run_info, indent=2) + "\n")
        model_file = {
            "model": weights,
            "model_config": spec.model.to_dict(),
            "task": spec.task,
            **self.task.model_file(),
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
    binned: Path,
    split_path: Path,
    spec: dict[str, Any] | RunSpec,
    out: Path,
    ckpt_dir: Path,
    hvg: Path | None = None,
) -> None:
    """Run (or resume) one training run; see the module docstring for inputs and outputs.
    ``hvg``: the HVG h5ad (the perturbation task reads the perturbation types)."""
    if not isinstance(spec, RunSpec):
        spec = RunSpec.from_dict(spec)
    inputs = TaskInputs(Path(binned), Path(split_path), None if hvg is None else Path(hvg))
    Trainer(inputs, spec, Path(out), Path(ckpt_dir)).run()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--binned", type=Path, required=True, help="binned data folder (bin rule output)"
    )
    p.add_argument(
        "--split", type=Path, required=True, help="split.tsv (split or perturb_split output)"
    )
    p.add_argument("--hvg", type=Path, help="hvg.h5ad (perturbation task: perturbation types)")
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
        train(a.binned, a.split, RunSpec.from_dict(spec), a.out, a.ckpt_dir, a.hvg)
    except InputError as e:
        if isinstance(e, TrainingDiverged) and rank != "0":
            raise SystemExit(1) from None  # every rank stops at the same step; rank 0 says why
        log.error("%s", e)
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
