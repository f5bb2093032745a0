"""Activation checkpointing of the Evoformer stack, with the checkpoint inputs in host memory.

:func:`offloaded_checkpoint` is a checkpoint (the wrapped function runs without autograd in
forward and again, with autograd, in backward) whose inputs are kept in host memory between the
forward and the backward: on a CUDA device each input marked for offloading is copied to pinned
host memory (asynchronously, on the current stream) and the device copy is freed as soon as
nothing else holds it; the backward copies it back, restores the RNG state (dropout masks are
reproduced) and the autocast state of the forward, recomputes and returns the gradients of the
inputs and of the parameters the function uses. At ``r = 2001`` the pair representation
``z [B, r, r, c_z]`` a checkpoint keeps is 16.4 GB per block at ``B = 16`` in bf16: offloading
moves ``n_blocks`` of them off the GPU, one comes back at a time.

On a CPU tensor nothing is copied (the host is the device): the inputs are kept as they are and
only the recomputation remains. The memory pre-flight (:mod:`evoformer.memory`) traces the step
with fake CPU tensors standing for the GPU's; :func:`emulated_host` then sends the offloaded
copies to the ``meta`` device, which the trace counts as host memory.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.autograd.graph import get_gradient_edge

_HOST_OVERRIDE: list[torch.device] = []


@contextlib.contextmanager
def emulated_host(device: str = "meta") -> Iterator[None]:
    """Within: offloaded copies go to ``device`` whatever the input's device (memory tracing)."""
    _HOST_OVERRIDE.append(torch.device(device))
    try:
        yield
    finally:
        _HOST_OVERRIDE.pop()


def pinned_bytes(n: int) -> int:
    """Host memory PyTorch's pinned allocator takes for ``n`` bytes: the next power of two
    (``CachingHostAllocator`` rounds every block so, by default; it caches the blocks, so the
    copies of one step reuse those of the step before)."""
    return 1 << (int(n) - 1).bit_length() if n > 0 else 0


def host_device(t: torch.Tensor) -> torch.device | None:
    """Where an offloaded copy of ``t`` goes: host memory for a CUDA tensor (or the emulated
    host), None when ``t`` already lives in host memory."""
    if _HOST_OVERRIDE:
        return _HOST_OVERRIDE[-1]
    if t.device.type == "cuda":
        return torch.device("cpu")
    return None


def _to_host(t: torch.Tensor) -> torch.Tensor | None:
    """A host copy of ``t`` (pinned for a CUDA tensor, copied asynchronously), or None when
    ``t`` is already in host memory."""
    host = host_device(t)
    if host is None:
        return None
    if host.type == "cpu" and t.device.type == "cuda":
        out = torch.empty(t.shape, dtype=t.dtype, device=host, pin_memory=True)
        return out.copy_(t, non_blocking=True)
    return t.detach().to(host, copy=True)


class _Plan:
    """What :class:`_OffloadedCheckpoint` needs besides tensors."""

    def __init__(
        self, fn: Callable[..., Any], n_args: int, offload: Sequence[bool], n_params: int
    ) -> None:
        self.fn, self.n_args, self.offload, self.n_params = fn, n_args, list(offload), n_params
        self.passthrough: list[int | None] = []  # per output of fn: the arg it is, or None


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


class _OffloadedCheckpoint(torch.autograd.Function):
    """Inputs: the plan, ``args`` (tensors or None), then the parameters ``fn`` uses.

    Outputs: the outputs of ``fn`` that are not one of its args (those are passed through by
    :func:`offloaded_checkpoint`).
    """

    @staticmethod
    def forward(ctx, plan: _Plan, *inputs: Any) -> Any:  # noqa: ANN001
        args = inputs[: plan.n_args]
        ctx.plan = plan
        first = next(a for a in args if isinstance(a, torch.Tensor))
        ctx.device = first.device
        ctx.autocast = (
            torch.is_autocast_enabled(first.device.type),
            torch.get_autocast_dtype(first.device.type),
        )
        ctx.rng = _rng_state(first.device)
        ctx.weights = inputs[plan.n_args :]  # the parameters themselves, not saved copies
        kept: list[Any] = []
        ctx.hosted = {}
        for i, a in enumerate(args):
            h = _to_host(a) if plan.offload[i] and isinstance(a, torch.Tensor) else None
            if h is not None:
                ctx.hosted[i] = (h, a.device)
                kept.append(None)
            else:
                kept.append(a)
        ctx.kept = kept
        detached = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
        outs = plan.fn(*detached)
        outs = outs if isinstance(outs, tuple) else (outs,)
        plan.passthrough = []
        new = []
        for o in outs:
            j = next((k for k, d in enumerate(detached) if d is not None and o is d), None)
            plan.passthrough.append(-1 if o is None else j)
            if j is None and o is not None:
                new.append(o)
        return tuple(new)

    @staticmethod
    def backward(ctx, *grad_outs: Any) -> Any:  # noqa: ANN001
        plan: _Plan = ctx.plan
        needs = ctx.needs_input_grad[1:]
        args: list[Any] = []
        for i, a in enumerate(ctx.kept):
            if i in ctx.hosted:
                h, dev = ctx.hosted[i]
                a = h.to(dev, non_blocking=True)
            if isinstance(a, torch.Tensor):
                a = a.detach().requires_grad_(bool(needs[i]) and a.is_floating_point())
            args.append(a)
        ctx.hosted = {}
        ctx.kept = []
        params = list(ctx.weights)
        enabled, dtype = ctx.autocast
        dev = ctx.device
        cpu_rng, dev_rng = ctx.rng
        devices = [dev] if dev.type == "cuda" else []
        with (
            torch.random.fork_rng(devices=devices, device_type=dev.type if devices else "cuda"),
            torch.enable_grad(),
            torch.autocast(dev.type, dtype=dtype, enabled=enabled),
        ):
            torch.set_rng_state(cpu_rng)
            if dev_rng is not None:
                torch.cuda.set_rng_state(dev_rng, dev)
            outs = plan.fn(*args)
        outs = outs if isinstance(outs, tuple) else (outs,)
        new = [o for o, j in zip(outs, plan.passthrough, strict=True) if j is None]
        # the outputs' graph edges, not the outputs: the recomputed outputs are freed before
        # their backward runs (the group's new z would otherwise sit next to its gradient)
        pairs = [
            (get_gradient_edge(o), g)
            for o, g in zip(new, grad_outs, strict=True)
            if g is not None and o.requires_grad
        ]
        del outs, new
        targets = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]
        p_targets = [j for j, p in enumerate(params) if needs[plan.n_args + j]]
        tensors = [args[i] for i in targets] + [params[j] for j in p_targets]
        got: Sequence[torch.Tensor | None] = [None] * len(tensors)
        if pairs and tensors:
            got = torch.autograd.grad(
                [e for e, _ in pairs], tensors, [g for _, g in pairs], allow_unused=True
            )
        del pairs, args, tensors
        grads: list[torch.Tensor | None] = [None] * (plan.n_args + plan.n_params)
        for i, g in zip(targets + [plan.n_args + j for j in p_targets], got, strict=True):
            grads[i] = g
        return (None, *grads)


def offloaded_checkpoint(
    fn: Callable[..., Any],
    args: Sequence[torch.Tensor | None],
    offload: Sequence[bool],
    params: Sequence[torch.Tensor],
) -> tuple[torch.Tensor | None, ...]:
    """``fn(*args)`` checkpointed, the ``offload``-marked args kept in host memory until backward.

    Args:
        fn: maps ``args`` to a tuple of tensors (or None); deterministic up to the RNG state
            (dropout), which is restored for the recomputation. Outputs that are one of the
            args themselves are passed through.
        args: tensors (or None) ``fn`` takes; every tensor requiring grad that ``fn`` uses must
            be here or in ``params``.
        offload: per arg, whether to keep it in host memory (when on a CUDA device).
        params: every parameter ``fn`` uses (their gradients come from the recomputation).

    Returns:
        the outputs of ``fn``, as a tuple.
    """
    if len(offload) != len(args):
        raise ValueError(f"offloaded_checkpoint: {len(args)} args but {len(offload)} flags")
    plan = _Plan(fn, len(args), offload, len(params))
    new = iter(_OffloadedCheckpoint.apply(plan, *args, *params))
    out = []
    for j in plan.passthrough:
        out.append(None if j == -1 else args[j] if j is not None else next(new))
    return tuple(out)
