"""Training settings: the ``train:`` section of config.yaml and the spec of one training run.

``TrainConfig`` is built from the plain dict once (:func:`evoformer.typed.from_plain` checks every
key's type and names it on error); :class:`RunSpec` bundles what one training job needs (model,
training settings, which cells, the prior network) and is what the ``train`` rule passes as JSON.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from evoformer.errors import InputError
from evoformer.metrics import LOWER_IS_BETTER
from evoformer.model import ModelConfig
from evoformer.model.fused import compile_mode
from evoformer.model.prior import check_prior_mode
from evoformer.typed import from_plain

#: Validation metrics computed during training (``val_`` + name); ``val_loss`` and
#: ``val_bin_acc`` are in bin space and depend on ``n_bins`` and the loss.
VALIDATION_METRICS = (
    "val_loss",
    "val_bin_acc",
    *(f"val_{m}" for m in ("expr_mse", "expr_pearson", "expr_mse_nonzero", "expr_pearson_nonzero")),
)
#: Validation metrics that are not comparable between models with different n_bins or loss.
BIN_SPACE_METRICS = ("val_loss", "val_bin_acc")
#: The tasks (:mod:`evoformer.tasks`) and the validation metrics each computes.
TASK_METRICS = {
    "masked_expression": VALIDATION_METRICS,
    "perturbation": ("val_loss", "val_mse", "val_pearson_delta"),
}
#: Where a perturbation model starts: fresh weights, or a masked-expression model's.
INITS = ("scratch", "pretrained")


def lower_is_better(metric: str) -> bool:
    """Direction of a validation metric (``val_`` prefix optional)."""
    name = metric.removeprefix("val_")
    if name in LOWER_IS_BETTER:
        return LOWER_IS_BETTER[name]
    return name in ("loss", "mse")


@dataclass
class ProfilerConfig:
    """PyTorch profiler window (TensorBoard trace) over optimizer steps ``[start, start + active)``."""

    enabled: bool = False
    start_step: int = 2
    active_steps: int = 3


@dataclass
class TrainConfig:
    """Optimiser, schedule, batching, masking, early stopping and bookkeeping of one training run.

    ``micro_batch_size`` is cells (MSAs of ``n_cells_per_msa`` cells when S > 1) per process and
    forward pass; ``global_batch_size`` is what one optimizer step sees across all processes, so
    gradient accumulation = global / (micro x world size) and the global batch does not depend
    on how many GPUs the job got.

    Early stopping: the model is validated every ``val_every`` optimizer steps (None: at the end
    of every epoch); the weights with the best ``monitor`` are kept (``best.pt`` in the checkpoint
    folder) and become ``model.pt``; training stops after ``patience`` validations without an
    improvement larger than ``min_delta`` (None: runs all epochs, still keeping the best).

    Divergence: an optimizer step whose loss or gradient norm is not finite (on any process) is
    skipped - no parameter or optimizer-state update; it still counts as a step of the schedule
    and the data - and the run stops after more than ``max_nonfinite_steps`` such steps in a
    row (0: at the first), naming the step and the last good checkpoint
    (:mod:`evoformer.train`).
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
    # share of each cell's masked positions drawn from its non-zero genes (None: uniform over
    # its real tokens). With 80% zeros, uniform masking spends most of the loss on zeros.
    mask_nonzero_fraction: float | None = None
    label_head: bool = False  # also train a cell-label head on CLS (needs a label column)
    seed: int = 0
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU | bf16 | fp32
    # the step's fused paths / compilation (evoformer.model.fused): auto (per device type, the
    # mode measured to win: AUTO_COMPILE) | eager | fused | blocks | model; false = eager,
    # true = model
    compile: bool | str = "auto"
    cpu_processes: int = 2  # processes torchrun starts when no CUDA device is visible
    loader_workers: int = 0  # DataLoader worker processes per training process (0: in-process)
    val_every: int | None = None  # optimizer steps between validations (None: every epoch)
    monitor: str = "val_expr_mse"  # validation metric early stopping and best weights follow
    patience: int | None = 5  # validations without improvement before stopping (None: never)
    min_delta: float = 0.0  # improvement of `monitor` that resets the patience
    log_every: int = 10  # optimizer steps between log lines
    ckpt_every: int = 50  # optimizer steps between checkpoints (also on SIGUSR1/SIGTERM)
    dist_timeout_s: int = 300  # collective timeout: a stuck rank fails the job instead of hanging
    # consecutive optimizer steps with a non-finite loss or gradient norm that are skipped;
    # one more stops the run (0: stop at the first)
    max_nonfinite_steps: int = 5
    # CUDA: record the allocator history of the first 3 optimizer steps (rank 0) and write it
    # to <out>/memory_snapshot.pickle (drag it onto https://pytorch.org/memory_viz)
    memory_snapshot: bool = False
    profiler: ProfilerConfig = field(default_factory=ProfilerConfig)
    # peak TFLOP/s of one device for the run's precision, the denominator of the reported FLOPs
    # utilisation (null: NVIDIA's datasheet figure for A100 / H100 / H200, by device name;
    # none for a CPU or another GPU): see evoformer.flops
    peak_tflops: float | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, key: str = "train") -> TrainConfig:
        """Build from a plain dict; an unknown key or a bad value raises ``InputError`` naming it."""
        cfg = from_plain(cls, d, key)
        cfg.validate(key)
        return cfg

    def validate(self, key: str = "train") -> None:
        """Raise ``InputError`` for values that cannot work."""

        def bad(name: str, what: str) -> InputError:
            return InputError(f"config key '{key}.{name}' {what}, got {getattr(self, name)!r}")

        positive = [
            "micro_batch_size",
            "global_batch_size",
            "epochs",
            "log_every",
            "ckpt_every",
            "dist_timeout_s",
            "cpu_processes",
        ]
        for name in positive:
            if getattr(self, name) < 1:
                raise bad(name, "must be >= 1")
        for name in ("max_steps", "val_every", "patience"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise bad(name, "must be >= 1 or null")
        for name in ("warmup_steps", "loader_workers", "seed", "max_nonfinite_steps"):
            if getattr(self, name) < 0:
                raise bad(name, "must be >= 0")
        if self.global_batch_size % self.micro_batch_size:
            raise InputError(
                f"config key '{key}.global_batch_size' ({self.global_batch_size}) must be a multiple "
                f"of '{key}.micro_batch_size' ({self.micro_batch_size})"
            )
        if not 0.0 < self.mask_ratio < 1.0:
            raise bad("mask_ratio", "must be in (0, 1)")
        f = self.mask_nonzero_fraction
        if f is not None and not 0.0 <= f <= 1.0:
            raise bad("mask_nonzero_fraction", "must be in [0, 1] or null")
        try:
            compile_mode(self.compile)
        except ValueError as exc:
            raise bad("compile", str(exc)) from None
        if self.precision not in ("auto", "bf16", "fp32"):
            raise bad("precision", "must be auto, bf16 or fp32")
        if self.lr <= 0:
            raise bad("lr", "must be > 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise bad("min_lr_ratio", "must be in [0, 1]")
        for name in ("weight_decay", "grad_clip", "min_delta"):
            if getattr(self, name) < 0:
                raise bad(name, "must be >= 0")
        known = sorted({m for metrics in TASK_METRICS.values() for m in metrics})
        if self.monitor not in known:
            raise bad("monitor", f"must be one of {', '.join(known)}")
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise bad("peak_tflops", "must be > 0 or null")

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
        """Plain dict; a reporting-only key left unset (:data:`UNSET_OMITTED`) is left out, so
        adding it changed no run's spec, config hash or checkpoint (nothing retrains)."""
        d = dataclasses.asdict(self)
        for key in UNSET_OMITTED:
            if d[key] is None:
                del d[key]
        return d


#: ``TrainConfig`` keys that change no trained weight, left out of its plain dict when null.
UNSET_OMITTED = ("peak_tflops",)


@dataclass
class PriorConfig:
    """The prior gene-gene network a training reads (TSV: source, target[, weight, sign]).

    ``path``: the file (``experiment.prior.path``, or the file the ``prior`` rule builds from
    ``experiment.prior.source``; :func:`evoformer.priors.prior_run_config`).
    ``min_gene_share``: the share of the network's genes that must be among the HVGs; fewer stops
    the run (a network of other gene names, e.g. Ensembl ids against symbols, would otherwise
    silently become an all-zero matrix).
    ``mode``: how it enters the model (:data:`evoformer.model.prior.PRIOR_MODES`): ``init``
    (projected into the initial ``z``), ``bias`` (a bias of every row attention) or ``both``.
    """

    path: str
    min_gene_share: float = 0.1
    mode: str = "init"

    def __post_init__(self) -> None:
        if not self.path:
            raise InputError("config key 'experiment.prior.path' must be a file path")
        check_prior_mode(self.mode)
        if not 0.0 <= self.min_gene_share <= 1.0:
            raise InputError(
                f"config key 'experiment.prior.min_gene_share' must be in [0, 1], got "
                f"{self.min_gene_share!r}"
            )


@dataclass
class PerturbationSettings:
    """What the perturbation task adds to a training (:mod:`evoformer.tasks.perturbation`).

    ``target``: ``mean`` (the condition's mean over its training cells; default) or ``cell``
    (the item's own perturbed cell). ``n_eval_controls``: training controls a condition's
    prediction averages over (validation and test).
    """

    target: str = "mean"
    n_eval_controls: int = 32

    @classmethod
    def from_dict(
        cls, d: dict[str, Any] | None, where: str = "perturbation.model"
    ) -> PerturbationSettings:
        s = from_plain(cls, d, where)
        if s.target not in ("mean", "cell"):
            raise InputError(
                f"config key '{where}.target': got {s.target!r}, expected mean or cell"
            )
        if s.n_eval_controls < 1:
            raise InputError(
                f"config key '{where}.n_eval_controls': got {s.n_eval_controls!r}, expected >= 1"
            )
        return s

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class RunSpec:
    """Everything one training job needs besides its data files.

    Attributes:
        model, train: the grid point's settings.
        fold: -1 = holdout (train on ``split == train``, validate on ``val``); k >= 0 = CV fold k.
        final: the retrain of the selected grid point on train+val (no validation).
        prior: optional prior network.
        val_mask_ratio: share of each validation cell's real tokens masked for validation (the
            evaluation's ``mask_ratio``: the same positions for every grid point).
        final_epochs: for ``final``, the epochs to train (mean best epoch of the CV folds, as
            chosen by early stopping); None = ``train.epochs``.
        task: ``masked_expression`` or ``perturbation`` (:data:`TASK_METRICS`).
        perturbation: the perturbation task's settings (that task only).
        init: a ``model.pt`` whose weights the model starts from (fine-tuning), or None.
    """

    model: ModelConfig
    train: TrainConfig
    fold: int = -1
    final: bool = False
    prior: PriorConfig | None = None
    val_mask_ratio: float = 0.15
    final_epochs: float | None = None
    task: str = "masked_expression"
    perturbation: PerturbationSettings | None = None
    init: str | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "spec") -> RunSpec:
        """Parse the plain spec (the rule's JSON) once; errors name the key."""
        d = dict(d)
        model = ModelConfig.from_dict(d.pop("model", None))
        train = TrainConfig.from_dict(d.pop("train", None), "experiment.train")
        prior = d.pop("prior", None)
        perturbation = d.pop("perturbation", None)
        rest = from_plain(_RunFields, d, where)
        spec = cls(
            model=model,
            train=train,
            prior=None if prior is None else from_plain(PriorConfig, prior, "experiment.prior"),
            perturbation=None
            if perturbation is None
            else PerturbationSettings.from_dict(perturbation, where),
            **dataclasses.asdict(rest),
        )
        if spec.task not in TASK_METRICS:
            raise InputError(
                f"{where}.task: got {spec.task!r}, expected one of {', '.join(TASK_METRICS)}"
            )
        if spec.train.monitor not in TASK_METRICS[spec.task]:
            raise InputError(
                f"config key 'train.monitor': {spec.train.monitor!r} is not a validation metric "
                f"of the {spec.task} task ({', '.join(TASK_METRICS[spec.task])})"
            )
        if not 0.0 < spec.val_mask_ratio < 1.0:
            raise InputError("config key 'evaluation.mask_ratio' must be in (0, 1)")
        if spec.prior is not None and not model.uses_pair:
            key = "experiment.prior" if where == "spec" else f"{where}.prior"
            raise InputError(
                f"config key '{key}': a prior network enters the pair representation, "
                "but model preset none has none"
            )
        return spec

    def to_dict(self) -> dict[str, Any]:
        """Plain dict; the task fields are left out at their masked-expression defaults, so a
        masked-expression run's spec (and config hash) is what it was before tasks existed."""
        d = {
            **dataclasses.asdict(self),
            "model": self.model.to_dict(),
            "train": self.train.to_dict(),
        }
        for key, default in (("task", "masked_expression"), ("perturbation", None), ("init", None)):
            if d[key] == default:
                del d[key]
        return d


@dataclass
class _RunFields:
    """The scalar fields of :class:`RunSpec` (checked by ``from_plain``)."""

    fold: int = -1
    final: bool = False
    val_mask_ratio: float = 0.15
    final_epochs: float | None = None
    task: str = "masked_expression"
    init: str | None = None
