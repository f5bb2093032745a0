"""What one training step on one device looks like: the input of every memory estimate.

A :class:`StepSpec` fixes everything that decides memory: the model (``ModelConfig``), the
micro-batch ``B`` (groups of ``S = n_cells_per_msa`` cells) per device, the gene tokens per cell
``L`` (``r = L + 1`` with CLS), the vocabulary ``G``, the bins ``K``, the label classes, the
precision, the outer-product-mean implementation (``ours`` or the ``naive`` ``[B, r, r, c, c]``
one), the device whose allocator / kernels are emulated, and the process count (DDP buckets).
:func:`build_model` and :func:`fake_batch` give the step's model and a batch of its shapes (for
``FakeTensorMode``: the traced memory estimate and :mod:`evoformer.flops`). :data:`JOURNAL` is
the journal's configuration, spelled once; :data:`HVG2000` the same model at 2,000 HVGs.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from evoformer.errors import InputError
from evoformer.losses import LOSSES
from evoformer.memory.naive import use_naive_opm
from evoformer.model import BioFormer, ModelConfig
from evoformer.model.prior import PRIOR_MODES

#: The research journal's scale (its seeds/000 run) as this project trains it: BioFormer, 500 HVGs
#: (every gene a token: r = 501), c_m 128, 4 MSA heads of 32, c_z 128, c_opm 32, 8 blocks, pre-LN,
#: one activation checkpoint per block, micro-batch 32 per GPU, bf16 autocast, 51 bins. Spelled
#: here only: ``configs/journal_a100.yaml`` holds the same (``tests/test_config.py`` checks it),
#: the GPU check (``benchmarks/gpu_check``) runs it and the memory CLI's ``--journal`` starts from
#: it (with the journal's own fp32 without checkpointing). Copy before changing.
JOURNAL: dict[str, dict[str, Any]] = {
    "model": {
        "preset": "bioformer",
        "c_m": 128,
        "n_heads_msa": 4,
        "c_hidden_msa": 32,
        "c_z": 128,
        "c_opm": 32,
        "n_blocks": 8,
        "ln_order": "pre",
        "blocks_per_ckpt": 1,
    },
    "train": {"micro_batch_size": 32, "precision": "bf16"},
    "data": {"n_hvg": 500, "n_bins": 51},
}
#: 2,000 HVGs (r = 2001) on one 80 GiB GPU: the journal's model with chunked pair ops, one
#: checkpoint per block whose inputs wait in pinned host memory, and every op its own checkpoint
#: (``offload_checkpoints``, ``checkpoint_ops``); micro-batch 16 for BioFormer, 4 for the full
#: pair stack (``EVOFORMER_MICRO_BATCH``). Spelled here only: ``configs/hvg2000_a100.yaml``
#: holds the BioFormer step (``tests/test_config.py`` checks it), the GPU check measures it
#: (``benchmarks/gpu_check``, at a micro-batch whose pinned memory the GPU machine has).
HVG2000: dict[str, dict[str, Any]] = {
    "model": {
        **JOURNAL["model"],
        "chunk_size": 64,
        "offload_checkpoints": True,
        "checkpoint_ops": True,
    },
    "train": {"micro_batch_size": 16, "precision": "bf16"},
    "data": {"n_hvg": 2000, "n_bins": 51},
}
#: The micro-batch of the full pair stack (``preset: evoformer``) at HVG2000's sizes.
HVG2000_EVOFORMER_MICRO_BATCH = 4
PRECISIONS = ("fp32", "bf16")
OPM_KINDS = ("ours", "naive")
DEVICE_KINDS = ("cuda", "cpu")
#: The training tasks a step can be traced for (the first is the default).
TASKS = ("masked_expression", "perturbation")
#: The ``experiment.train`` keys that change a step's memory (the rest - lr, epochs, seeds ...
#: - do not): what the workflow's pre-flight depends on.
MEMORY_TRAIN_KEYS = ("micro_batch_size", "global_batch_size", "precision", "label_head")


@dataclass
class StepSpec:
    """One training step (forward, backward, clip, AdamW step) on one device.

    Attributes:
        model: the model configuration.
        batch_size: ``B``, MSAs (groups of ``S`` cells) per device and forward pass.
        seq_len: ``L``, gene tokens per cell (``r = L + 1``).
        n_genes: ``G``, gene vocabulary (embedding rows).
        n_bins: ``K``, expression bins (the MASK token is ``K``).
        n_labels: classes of the cell-label head (0: no head).
        precision: ``fp32`` or ``bf16`` (autocast).
        opm: ``ours`` (the model's outer product mean) or ``naive`` (``[B, r, r, c, c]``).
        device: ``cuda`` (emulate the CUDA allocator, SDPA kernels, autocast and foreach
            AdamW) or ``cpu`` (what a CPU run does).
        world_size: processes; > 1 adds DDP's gradient buckets (one fp32 copy of the gradients).
        grad_accumulation: micro-batches per optimizer step; > 1: the step traced is the last
            micro-batch of a cycle, whose backward adds to gradients that already exist.
        lr, weight_decay, grad_clip: optimizer settings (they do not change memory; kept so the
            traced step is the trainer's step).
        prior: whether a ``[G, G]`` prior network buffer is attached.
        prior_mode: how it enters the model (``init``, ``bias``, ``both``; see
            :mod:`evoformer.model.prior`); ignored without a prior.
        task: the training task whose step this is (:mod:`evoformer.tasks`):
            ``masked_expression`` or ``perturbation`` (perturbation embeddings in ``m`` and
            ``z``, the expression head, the expression loss).
    """

    model: ModelConfig
    batch_size: int
    seq_len: int
    n_genes: int
    n_bins: int
    n_labels: int = 0
    precision: str = "fp32"
    opm: str = "ours"
    device: str = "cuda"
    world_size: int = 1
    grad_accumulation: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    prior: bool = False
    prior_mode: str = "init"
    task: str = "masked_expression"

    def __post_init__(self) -> None:
        for key in (
            "batch_size",
            "seq_len",
            "n_genes",
            "n_bins",
            "world_size",
            "grad_accumulation",
        ):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(
                    f"memory spec key '{key}': got {value!r}, expected a positive integer"
                )
        if (
            isinstance(self.n_labels, bool)
            or not isinstance(self.n_labels, int)
            or self.n_labels < 0
        ):
            raise InputError(
                f"memory spec key 'n_labels': got {self.n_labels!r}, expected an integer >= 0"
            )
        for key, allowed in (
            ("precision", PRECISIONS),
            ("opm", OPM_KINDS),
            ("device", DEVICE_KINDS),
            ("prior_mode", PRIOR_MODES),
            ("task", TASKS),
        ):
            if getattr(self, key) not in allowed:
                raise InputError(
                    f"memory spec key '{key}': got {getattr(self, key)!r}, expected one of {list(allowed)}"
                )

    # ------------------------------------------------------------------ shapes
    @property
    def r(self) -> int:
        """Tokens per cell including CLS."""
        return self.seq_len + 1

    @property
    def S(self) -> int:  # noqa: N802 - the paper's name
        """Cells per MSA."""
        return self.model.n_cells_per_msa

    @property
    def bytes_act(self) -> int:
        """Bytes per element of the activations inside the stack (2 under bf16 autocast)."""
        return 2 if self.precision == "bf16" else 4

    def replace(self, **changes: Any) -> StepSpec:
        """Copy with fields changed; ``model`` may be given as a dict of ModelConfig changes."""
        model = changes.pop("model", None)
        if isinstance(model, dict):
            model = ModelConfig.from_dict({**self.model.to_dict(), **model})
        if model is not None:
            changes["model"] = model
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-serialisable)."""
        d = dataclasses.asdict(self)
        d["model"] = self.model.to_dict()
        d["r"] = self.r
        if d["task"] == TASKS[0]:  # as before tasks existed
            del d["task"]
        return d

    def label(self) -> str:
        """Short human-readable description."""
        m = self.model
        ck = f"ckpt{m.blocks_per_ckpt}" if m.blocks_per_ckpt else "no-ckpt"
        ch = f"chunk{m.chunk_size}" if m.chunk_size else "no-chunk"
        return (
            f"{m.preset} B={self.batch_size} S={self.S} r={self.r} c_m={m.c_m} c_z={m.c_z} "
            f"c_opm={m.c_opm} blocks={m.n_blocks} {self.precision} opm={self.opm} {ck} {ch}"
        )


def fake_batch(spec: StepSpec) -> dict[str, torch.Tensor]:
    """A batch of the trainer's shapes (call under FakeTensorMode): all tokens real, 15% masked
    (masked expression) or two genes perturbed (perturbation)."""
    b, s, length = spec.batch_size, spec.S, spec.seq_len
    if spec.task == "perturbation":
        perturbed = torch.zeros(b, s, length, dtype=torch.long)
        perturbed[..., :2] = 1
        return {
            "gene_ids": torch.randint(0, spec.n_genes, (b, s, length)),
            "values": torch.randint(0, spec.n_bins, (b, s, length)),
            "pad_mask": torch.ones(b, s, length, dtype=torch.bool),
            "perturbed": perturbed,
            "target": torch.rand(b, s, length),
        }
    gene_ids = torch.randint(0, spec.n_genes, (b, s, length))
    target = torch.randint(0, spec.n_bins, (b, s, length))
    pad_mask = torch.ones(b, s, length, dtype=torch.bool)
    loss_mask = torch.rand(b, s, length) < 0.15
    values = target.masked_fill(loss_mask, spec.n_bins)
    batch = {
        "gene_ids": gene_ids,
        "values": values,
        "pad_mask": pad_mask,
        "target": target,
        "loss_mask": loss_mask,
    }
    if spec.n_labels > 0:
        batch["labels"] = torch.randint(0, spec.n_labels, (b, s))
    return batch


def build_model(spec: StepSpec) -> nn.Module:
    """BioFormer for ``spec`` (naive OPM swapped in when ``spec.opm == 'naive'``)."""
    prior = torch.zeros(spec.n_genes, spec.n_genes) if spec.prior else None
    task = {}
    if spec.task == "perturbation":
        from evoformer.perturb.conditions import TYPES

        task = {
            "n_perturbation_types": len(TYPES),
            "output": "expression",
            "expression_baseline": torch.zeros(spec.n_genes),
        }
    model = BioFormer(
        spec.model,
        n_genes=spec.n_genes,
        n_bins=spec.n_bins,
        n_labels=spec.n_labels,
        prior=prior,
        prior_mode=spec.prior_mode,
        **task,
    )
    if spec.opm == "naive":
        use_naive_opm(model)
    return model


def step_loss(spec: StepSpec, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The trainer's loss of one micro-batch of ``spec.task`` (what the step differentiates)."""
    loss, _ = LOSSES[spec.task](model, batch)
    return loss


def _accumulation(train_cfg: dict[str, Any], micro: int, world: int) -> int:
    """The trainer's ``global / (micro x world)`` (1 when not given or not divisible)."""
    glob = train_cfg.get("global_batch_size")
    if not isinstance(glob, int) or isinstance(glob, bool) or glob % (micro * world):
        return 1
    return max(1, glob // (micro * world))


def resolve_precision(precision: str, device: str) -> str:
    """The trainer's rule: ``auto`` is bf16 autocast on CUDA, fp32 on CPU."""
    if precision == "auto":
        return "bf16" if device == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise InputError(
            f"config key 'train.precision': got {precision!r}, expected auto, bf16 or fp32"
        )
    return precision


def spec_from_config(
    model_cfg: dict[str, Any] | ModelConfig,
    train_cfg: dict[str, Any],
    data_shape: dict[str, Any],
    n_gpus: int = 1,
    device: str = "cuda",
    opm: str = "ours",
) -> StepSpec:
    """Build the per-device step from the experiment's ``model``/``train`` dicts and data shape.

    Args:
        model_cfg: ``experiment.model`` (ModelConfig keys) or a ModelConfig.
        train_cfg: ``experiment.train``; uses ``micro_batch_size``, ``precision``, ``lr``,
            ``weight_decay``, ``grad_clip`` and ``label_head`` (other keys are ignored here).
        data_shape: ``seq_len`` (``L``) and ``n_genes`` (``G``), ``n_bins`` (``K``),
            optional ``n_labels``, ``prior`` (bool), ``prior_mode`` and ``task`` (the training
            task, :data:`TASKS`); see :func:`data_shape`.
        n_gpus: processes the job runs (DDP world size).
        device: ``cuda`` or ``cpu``.
        opm: ``ours`` or ``naive``.
    """
    model = model_cfg if isinstance(model_cfg, ModelConfig) else ModelConfig.from_dict(model_cfg)
    for key in ("seq_len", "n_genes", "n_bins"):
        if key not in data_shape:
            raise InputError(
                f"memory data shape: key '{key}' is missing (have {sorted(data_shape)})"
            )
    micro = train_cfg.get("micro_batch_size", 8)
    if isinstance(micro, bool) or not isinstance(micro, int) or micro < 1:
        raise InputError(
            f"config key 'train.micro_batch_size': got {micro!r}, expected a positive integer"
        )
    label_head = bool(train_cfg.get("label_head", False))
    n_labels = int(data_shape.get("n_labels", 0)) if label_head else 0
    return StepSpec(
        model=model,
        batch_size=int(micro),
        seq_len=int(data_shape["seq_len"]),
        n_genes=int(data_shape["n_genes"]),
        n_bins=int(data_shape["n_bins"]),
        n_labels=n_labels,
        precision=resolve_precision(str(train_cfg.get("precision", "auto")), device),
        opm=opm,
        device=device,
        world_size=int(n_gpus),
        grad_accumulation=_accumulation(train_cfg, int(micro), int(n_gpus)),
        lr=float(train_cfg.get("lr", 1e-3)),
        weight_decay=float(train_cfg.get("weight_decay", 0.01)),
        grad_clip=float(train_cfg.get("grad_clip", 1.0)),
        prior=bool(data_shape.get("prior", False)),
        prior_mode=str(data_shape.get("prior_mode", "init")),
        task=str(data_shape.get("task", TASKS[0])),
    )


def data_shape(
    n_hvg: int,
    n_bins: int,
    include_zero_genes: bool = True,
    max_len: int | None = None,
    n_labels: int = 0,
    prior: bool = False,
    prior_mode: str = "init",
) -> dict[str, Any]:
    """Data shape from the experiment: ``L = n_hvg`` with zero genes, else the binned ``max_len``.

    Args:
        n_hvg: highly variable genes (the gene vocabulary ``G``). A Perturb-seq dataset's
            vocabulary also holds the perturbed genes outside the top ``n_hvg``
            (:mod:`evoformer.data.hvg`): pass the binned ``meta.json``'s ``n_genes``.
        n_bins: expression bins ``K``.
        include_zero_genes: ``binning.include_zero_genes``.
        max_len: longest cell in the binned data (``meta.json``); needed when zero genes are
            dropped (``None`` falls back to ``n_hvg``, the upper bound).
        n_labels: cell-label classes (used when ``train.label_head`` is on).
        prior: a prior gene-gene network is attached.
        prior_mode: how it enters the model (``experiment.prior.mode``; a key only with a
            prior).
    """
    seq_len = n_hvg if include_zero_genes or max_len is None else int(max_len)
    return {
        "seq_len": int(seq_len),
        "n_genes": int(n_hvg),
        "n_bins": int(n_bins),
        "n_labels": int(n_labels),
        "prior": bool(prior),
        **({"prior_mode": str(prior_mode)} if prior else {}),
    }


def data_shape_from_meta(
    meta: dict[str, Any], n_labels: int = 0, prior: bool = False, prior_mode: str = "init"
) -> dict[str, Any]:
    """Data shape from the binned data's ``meta.json`` (``max_len``, ``n_genes``, ``n_bins``)."""
    for key in ("max_len", "n_genes", "n_bins"):
        if key not in meta:
            raise InputError(f"binned meta.json: key '{key}' is missing")
    return {
        "seq_len": int(meta["max_len"]),
        "n_genes": int(meta["n_genes"]),
        "n_bins": int(meta["n_bins"]),
        "n_labels": int(n_labels),
        "prior": bool(prior),
        **({"prior_mode": str(prior_mode)} if prior else {}),
    }


def resolve_data_shape(
    n_hvg: int,
    n_bins: int,
    include_zero_genes: bool = True,
    binned_meta: str | os.PathLike | None = None,
    n_labels: int = 0,
    prior: bool = False,
    prior_mode: str = "init",
) -> dict[str, Any]:
    """Data shape of an experiment: from the binned ``meta.json`` when given (exact ``max_len``
    and gene count), else from the config (``L = G = n_hvg``: exact with zero genes, an upper
    bound of L without; a lower bound for a Perturb-seq dataset, whose HVG set also holds its
    perturbed genes)."""
    if binned_meta is not None and Path(binned_meta).is_file():
        try:
            meta = json.loads(Path(binned_meta).read_text())
        except json.JSONDecodeError as exc:
            raise InputError(f"{binned_meta}: not valid JSON ({exc})") from exc
        return data_shape_from_meta(meta, n_labels=n_labels, prior=prior, prior_mode=prior_mode)
    return data_shape(
        n_hvg,
        n_bins,
        include_zero_genes,
        None,
        n_labels=n_labels,
        prior=prior,
        prior_mode=prior_mode,
    )


def label_classes(cells_tsv: str | os.PathLike) -> int:
    """Cell-label classes of the binned data (distinct non-empty values of ``cells.tsv``'s
    ``label`` column; 0 without one), as the trainer's label head counts them."""
    import pandas as pd

    try:
        cells = pd.read_csv(cells_tsv, sep="\t")
    except (OSError, pd.errors.ParserError) as exc:
        raise InputError(f"{cells_tsv}: cannot read the cells table ({exc})") from exc
    if "label" not in cells:
        return 0
    return int(cells["label"].dropna().astype(str).nunique())
