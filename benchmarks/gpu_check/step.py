"""One training step of a configuration, as the trainer runs it, and its FLOP accounting."""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING, Any

import torch

from benchmarks.gpu_check.sizes import StepConfig

if TYPE_CHECKING:
    from benchmarks.gpu_check.common import Context
    from evoformer.flops.count import StepCost


def build(
    cfg: StepConfig, device: torch.device, compile: str | bool = "eager"
) -> tuple[torch.nn.Module, torch.optim.Optimizer, dict[str, torch.Tensor]]:
    """BioFormer, AdamW (the trainer's settings) and one masked batch ``[B, S, L]`` on ``device``;
    ``compile``: a ``train.compile`` mode applied as the trainer applies it (fused paths,
    ``torch.compile``, the AdamW options; :mod:`evoformer.model.fused`), default ``eager``."""
    from evoformer.model import BioFormer, ModelConfig, apply_value_mask
    from evoformer.model.fused import adamw_options, compile_model

    mcfg = ModelConfig.from_dict(cfg.model)
    torch.manual_seed(0)
    model = BioFormer(mcfg, n_genes=cfg.n_hvg, n_bins=cfg.n_bins, n_labels=0).to(device)
    compile_model(model, compile)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=1e-3, weight_decay=0.01, **adamw_options(compile)
    )
    b, s, length = cfg.micro_batch, mcfg.n_cells_per_msa, cfg.n_hvg
    gen = torch.Generator().manual_seed(1)
    values = torch.randint(0, cfg.n_bins, (b, s, length), generator=gen)
    pad_mask = torch.ones(b, s, length, dtype=torch.bool)
    masked, loss_mask = apply_value_mask(values, pad_mask, 0.15, cfg.n_bins, gen)
    batch = {
        "gene_ids": torch.arange(length).expand(b, s, length).contiguous(),
        "values": masked,
        "pad_mask": pad_mask,
        "target": values,
        "loss_mask": loss_mask,
    }
    batch = {k: v.to(device) for k, v in batch.items()}
    return model, optimizer, batch


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor],
    precision: str,
    device: torch.device,
) -> float:
    """The trainer's step: forward through ``model.loss`` (bf16 autocast or fp32), backward,
    ``clip_grad_norm_(1.0)``, AdamW step, ``zero_grad(set_to_none=True)``."""
    model.train()
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if precision == "bf16"
        else contextlib.nullcontext()
    )
    with autocast:
        loss, _ = model.loss(batch)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


# ----------------------------------------------------------------------------- accounting
def step_cost(ctx: Context, cfg: StepConfig, precision: str) -> StepCost:
    """FLOPs and memory traffic of one micro-batch of ``cfg`` in ``precision``, counted once per
    run (``evoformer.flops.count.count_step`` on fake tensors, the GPU's kernels emulated; the
    CPU's in the dry run) and kept in ``ctx.costs``."""
    from evoformer.flops.count import count_step
    from evoformer.memory.spec import data_shape, spec_from_config

    key = (cfg.name, precision)
    if key not in ctx.costs:
        train = {"micro_batch_size": cfg.micro_batch, "precision": precision}
        spec = spec_from_config(
            cfg.model, train, data_shape(cfg.n_hvg, cfg.n_bins), device=ctx.trace_device
        )
        ctx.costs[key] = count_step(spec)
    return ctx.costs[key]


def efficiency(
    ctx: Context, cfg: StepConfig, precision: str, samples_per_s: float, step_s: float
) -> dict[str, Any]:
    """What a timed step of ``cfg`` achieved: FLOPs per sample, model and executed TFLOP/s and
    their share of the device's dense peak for ``precision`` (:mod:`evoformer.flops.peaks`; none
    on CPU), the estimated memory traffic per step and the bandwidth it implies (traffic of
    forward + backward + recompute over the whole step's time, optimizer included) against the
    device's HBM bandwidth."""
    from evoformer.flops.peaks import device_peak, lookup_device, throughput_fields

    t0 = time.perf_counter()
    cost = step_cost(ctx, cfg, precision)
    peak, source = device_peak(ctx.device_name, precision)
    out = throughput_fields(cost, samples_per_s, 1, peak, source)
    traffic = cost.traffic_bytes or 0
    entry = lookup_device(ctx.device_name)
    achieved = traffic / step_s / 1e12 if step_s > 0 else None
    out.update(
        forward_flops_per_sample=cost.per_sample(cost.forward_flops),
        recompute_counted=cost.recompute_counted,
        traffic_bytes_per_step=traffic,
        pair_traffic_share=(cost.pair_traffic_bytes or 0) / traffic if traffic else None,
        arithmetic_intensity=cost.arithmetic_intensity,
        achieved_tb_per_s=achieved,
        hbm_tb_per_s=entry.hbm_tb_per_s if entry else None,
        hbm_utilization=achieved / entry.hbm_tb_per_s if entry and achieved else None,
        count_s=time.perf_counter() - t0,
    )
    return out
