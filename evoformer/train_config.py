"""Training settings: one dataclass, built from the plain ``train:`` dict of config.yaml."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from evoformer.errors import InputError


@dataclass
class ProfilerConfig:
    """PyTorch profiler window (TensorBoard trace) over optimizer steps ``[start, start + active)``."""

    enabled: bool = False
    start_step: int = 2
    active_steps: int = 3


@dataclass
class TrainConfig:
    """Optimiser, schedule, batching and bookkeeping for one training run.

    ``micro_batch_size`` is cells (MSAs of ``n_cells_per_msa`` cells when S > 1) per process and
    forward pass; ``global_batch_size`` is what one optimizer step sees across all processes, so
    gradient accumulation = global / (micro x world size) and the global batch does not depend
    on how many GPUs the job got.
    """

    micro_batch_size: int = 8
    global_batch_size: int = 16
    epochs: int = 2
    max_steps: int | None = None  # stop after this many optimizer steps (None: run all epochs)
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 10
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    mask_ratio: float = 0.15  # fraction of each cell's real gene tokens whose value is masked
    label_head: bool = False  # also train a cell-label head on CLS (needs a label column)
    seed: int = 0
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU | bf16 | fp32
    compile: bool = False  # torch.compile the model
    cpu_processes: int = 2  # processes torchrun starts when no CUDA device is visible
    log_every: int = 10  # optimizer steps between log lines
    ckpt_every: int = 50  # optimizer steps between checkpoints (also on SIGUSR1/SIGTERM)
    dist_timeout_s: int = 300  # collective timeout: a stuck rank fails the job instead of hanging
    # CUDA: record the allocator history of the first 3 optimizer steps (rank 0) and write it
    # to <out>/memory_snapshot.pickle (drag it onto https://pytorch.org/memory_viz)
    memory_snapshot: bool = False
    profiler: ProfilerConfig = field(default_factory=ProfilerConfig)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, key: str = "train") -> TrainConfig:
        """Build from a plain dict; an unknown key or a bad value raises ``InputError`` naming it."""
        d = dict(d or {})
        names = {f.name for f in dataclasses.fields(cls)}
        for k in d:
            if k not in names:
                raise InputError(
                    f"config key '{key}.{k}' is unknown (known: {', '.join(sorted(names))})"
                )
        prof = d.pop("profiler", None) or {}
        pnames = {f.name for f in dataclasses.fields(ProfilerConfig)}
        for k in prof:
            if k not in pnames:
                raise InputError(f"config key '{key}.profiler.{k}' is unknown")
        cfg = cls(**d, profiler=ProfilerConfig(**prof))
        cfg.validate(key)
        return cfg

    def validate(self, key: str = "train") -> None:
        """Raise ``InputError`` for values that cannot work."""
        positive = ["micro_batch_size", "global_batch_size", "epochs", "log_every", "ckpt_every"]
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise InputError(
                    f"config key '{key}.{name}' must be >= 1, got {getattr(self, name)}"
                )
        if self.global_batch_size % self.micro_batch_size:
            raise InputError(
                f"config key '{key}.global_batch_size' ({self.global_batch_size}) must be a multiple "
                f"of '{key}.micro_batch_size' ({self.micro_batch_size})"
            )
        if not 0.0 < self.mask_ratio < 1.0:
            raise InputError(
                f"config key '{key}.mask_ratio' must be in (0, 1), got {self.mask_ratio}"
            )
        if self.precision not in ("auto", "bf16", "fp32"):
            raise InputError(
                f"config key '{key}.precision' must be auto, bf16 or fp32, got {self.precision!r}"
            )
        if self.lr <= 0:
            raise InputError(f"config key '{key}.lr' must be > 0, got {self.lr}")

    def grad_accumulation(self, world_size: int) -> int:
        """Micro-batches per process per optimizer step (global = micro x accum x world)."""
        per_step = self.micro_batch_size * world_size
        if self.global_batch_size % per_step:
            raise InputError(
                f"config key 'train.global_batch_size' ({self.global_batch_size}) is not divisible by "
                f"micro_batch_size x processes ({self.micro_batch_size} x {world_size})"
            )
        return self.global_batch_size // per_step

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
