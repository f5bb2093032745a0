"""Item ``sdpa``: which attention kernels run, and which accept the model's inputs."""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.gpu_check.common import Context, first_line, free_memory, sync
from benchmarks.gpu_check.sizes import StepConfig
from benchmarks.gpu_check.step import build, train_step

_SDPA_OP = re.compile(r"scaled_dot_product|attention|flash|fmha|cudnn|cutlass|mem_eff", re.I)


def _attention_events(fn: Callable[[], Any], device: torch.device) -> dict[str, int]:
    """Profiler event names (ops and kernels) that look like attention, with their counts."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(ProfilerActivity.CUDA)
    try:
        with profile(activities=acts) as prof:
            fn()
            sync(device)
    except Exception:  # noqa: BLE001 - no CUPTI: the CPU-side aten op names still tell
        if len(acts) == 1:
            raise
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
            sync(device)
    names: dict[str, int] = {}
    for ev in prof.key_averages():
        if _SDPA_OP.search(ev.key):
            names[ev.key[:160]] = names.get(ev.key[:160], 0) + int(ev.count)
    return dict(sorted(names.items(), key=lambda kv: -kv[1])[:25])


def _backends_seen(names: dict[str, int]) -> list[str]:
    """SDPA backends that ran, from the ATen op names (kernel names are ambiguous: cuDNN's
    attention kernels are called ``...flash...`` too)."""
    ops = " ".join(n for n in names if n.startswith("aten::")).lower()
    seen = []
    for label, pattern in (
        ("flash", r"aten::_scaled_dot_product_flash_attention|aten::_flash_attention_forward"),
        (
            "efficient",
            r"aten::_scaled_dot_product_efficient_attention|aten::_efficient_attention_forward",
        ),
        ("cudnn", r"aten::_scaled_dot_product_cudnn_attention|aten::_cudnn_attention"),
        ("math", r"aten::_scaled_dot_product_attention_math"),
        ("overrideable", r"aten::_scaled_dot_product_fused_attention_overrideable"),
    ):
        if re.search(pattern, ops):
            seen.append(label)
    return seen


def _reasons(caught: list[warnings.WarningMessage], exc: BaseException, limit: int = 400) -> str:
    """Why SDPA refused a backend: its warnings (without the source location) and the error."""
    why: list[str] = []
    for w in caught:
        text = re.sub(r"\s*\(Triggered internally at [^)]*\)\.?", "", str(w.message)).strip()
        text = " ".join(text.split())
        if text and text not in why:
            why.append(text)
    err = first_line(str(exc))
    if err and err not in why:
        why.append(err)
    return " / ".join(why)[:limit]


def _step_events(ctx: Context, cfg: StepConfig) -> dict[str, Any]:
    """Attention ops / kernels the profiler sees in one training step of ``cfg`` (after a
    warm-up step)."""
    dev = ctx.device
    model, optimizer, batch = build(cfg, dev)

    def step() -> float:
        return train_step(model, optimizer, batch, cfg.precision, dev)

    step()
    names = _attention_events(step, dev)
    return {"config": cfg.describe(), "backends": _backends_seen(names), "events": names}


def item_sdpa(ctx: Context, partial: Callable[[dict], None]) -> dict[str, Any]:
    """SDPA backends: what the training steps run, the default choice for the row-attention
    shapes, then each backend forced alone (last: a backend that crashes poisons the context)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cfg = ctx.sizes.journal
    dev = ctx.device
    n = cfg.micro_batch * int(cfg.model.get("n_cells_per_msa", 1))
    h, d, r = int(cfg.model["n_heads_msa"]), int(cfg.model["c_hidden_msa"]), cfg.n_hvg + 1
    res: dict[str, Any] = {
        "shapes": f"q/k/v [{n}, {h}, {r}, {d}], float bias [{n}, {h}, {r}, {r}] (requires grad)",
        "training_step": {},
        "default": {},
        "probes": {},
        "errors": [],
    }
    dtypes = (torch.bfloat16, torch.float32)

    def run(dtype: torch.dtype) -> None:
        g = torch.Generator(device=dev).manual_seed(0)
        q, k, v = (
            torch.randn(n, h, r, d, device=dev, dtype=dtype, generator=g).requires_grad_()
            for _ in range(3)
        )
        bias = torch.randn(n, h, r, r, device=dev, dtype=dtype, generator=g).requires_grad_()
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        out.float().sum().backward()
        sync(dev)

    for step_cfg in (ctx.sizes.journal, ctx.sizes.pair_stack):
        try:
            res["training_step"][step_cfg.name] = _step_events(ctx, step_cfg)
        except Exception as exc:  # noqa: BLE001
            res["errors"].append(
                f"training step {step_cfg.name}: {type(exc).__name__}: {first_line(str(exc))}"
            )
        free_memory()
        partial(res)
    for dtype in dtypes:
        dname = str(dtype).replace("torch.", "")
        try:
            names = _attention_events(lambda dt=dtype: run(dt), dev)
            res["default"][dname] = {"backends": _backends_seen(names), "events": names}
        except Exception as exc:  # noqa: BLE001
            res["errors"].append(f"default {dname}: {type(exc).__name__}: {first_line(str(exc))}")
        free_memory()
    partial(res)
    preferred = ["MATH", "EFFICIENT_ATTENTION", "FLASH_ATTENTION", "CUDNN_ATTENTION"]
    members = [b for b in SDPBackend.__members__ if b not in ("ERROR", "OVERRIDEABLE")]
    backends = [b for b in preferred if b in members] + [b for b in members if b not in preferred]
    for dtype in dtypes:
        dname = str(dtype).replace("torch.", "")
        probe: dict[str, str] = {}
        res["probes"][dname] = probe
        for name in backends:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    with sdpa_kernel([getattr(SDPBackend, name)]):
                        run(dtype)
                    probe[name] = "ok"
                except Exception as exc:  # noqa: BLE001 - a rejected backend is a result
                    probe[name] = "rejected: " + _reasons(caught, exc)
            free_memory()
            partial(res)
    if not res["errors"]:
        del res["errors"]
    return res
