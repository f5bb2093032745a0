"""Building blocks shared by every Evoformer operation.

* :class:`Linear` with the AlphaFold 2 initialisations (supplement 1.11.4).
* :class:`LayerNorm` that keeps bf16/fp16 activations in their dtype under autocast (PyTorch's
  autocast would return fp32 and double the memory of the pair representation).
* :func:`attention`: multi-head attention with an additive bias and a key mask, through
  ``F.scaled_dot_product_attention`` (batch dims flattened so the fused kernels, flash /
  memory-efficient, can be chosen on GPU) or, on CPU, an explicit softmax; sequences without a
  real key output 0.
* :class:`Attention`: AF2's gated multi-head attention (Alg. 7 without the pair bias, which the
  callers pass in as a bias).
* :func:`mask_bias`: additive key mask.
* :func:`chunked`: apply a function slice by slice along one dimension; in training each slice
  is recomputed in backward (a custom autograd Function; a :class:`LinearTail` is not
  recomputed), so chunking bounds memory in training and not only in inference.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# Value added to masked attention logits (AF2 uses 1e9); finite so fully masked rows give a
# uniform softmax instead of NaN.
_MASK_INF = 1e9


def _trunc_normal_(weight: torch.Tensor, scale: float) -> None:
    """Truncated normal (+-2 std) with variance ``scale / fan_in`` (LeCun / He init)."""
    fan_in = weight.shape[-1]
    # std of a standard normal truncated at +-2 is 0.8796...; correct so the variance is exact.
    std = math.sqrt(scale / max(1, fan_in)) / 0.87962566103423978
    # Inverse-CDF sampling (no data-dependent checks, so it also runs under FakeTensorMode).
    lo = 0.5 * (1 + math.erf(-2 / math.sqrt(2)))  # CDF(-2)
    with torch.no_grad():
        weight.uniform_(2 * lo - 1, 1 - 2 * lo).erfinv_().mul_(std * math.sqrt(2))
        weight.clamp_(-2 * std, 2 * std)


class Linear(nn.Linear):
    """``nn.Linear`` with AF2 initialisations.

    init:
        ``default``: LeCun (truncated normal, fan-in), bias 0.
        ``relu``: He (truncated normal, 2 / fan-in), bias 0.
        ``glorot``: Xavier uniform, bias 0.
        ``gating``: weight 0, bias 1 (gates start open at sigmoid(1)).
        ``final``: weight 0, bias 0 (residual updates start at zero).
    """

    def __init__(self, c_in: int, c_out: int, bias: bool = True, init: str = "default") -> None:
        super().__init__(c_in, c_out, bias=bias)
        with torch.no_grad():
            if init == "default":
                _trunc_normal_(self.weight, 1.0)
            elif init == "relu":
                _trunc_normal_(self.weight, 2.0)
            elif init == "glorot":
                nn.init.xavier_uniform_(self.weight)
            elif init in ("gating", "final"):
                self.weight.zero_()
            else:
                raise ValueError(f"unknown Linear init {init!r}")
            if self.bias is not None:
                self.bias.fill_(1.0 if init == "gating" else 0.0)


class LayerNorm(nn.Module):
    """LayerNorm over the last dim ``[*, c]`` that preserves a half-precision input's dtype."""

    def __init__(self, c: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.c = c
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[*, c] -> [*, c]`` in the dtype of ``x``."""
        if x.dtype in (torch.bfloat16, torch.float16):
            # PyTorch's kernels accumulate in fp32; only input/output stay in half precision.
            with torch.autocast(device_type=x.device.type, enabled=False):
                return F.layer_norm(
                    x, (self.c,), self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps
                )
        return F.layer_norm(x, (self.c,), self.weight, self.bias, self.eps)


def mask_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention bias from a key mask: ``[*, K]`` (1 = real) -> ``[*, K]`` (0 / -inf)."""
    inf = 1e4 if dtype == torch.float16 else _MASK_INF
    return ((mask.to(dtype) - 1) * inf).to(dtype)


def _use_math_kernel(q: torch.Tensor) -> bool:
    """Whether :func:`attention` computes the softmax explicitly instead of through SDPA.

    On CPU with a bias that requires grad, SDPA falls back to its math kernel, whose "safe"
    softmax makes three extra passes over the ``[*, H, Q, K]`` logits (fully masked rows cannot
    occur here, see :func:`attention`); the explicit softmax skips them. Elsewhere, and whenever
    a torch-function mode is active (the CUDA emulation of :mod:`evoformer.memory` intercepts
    SDPA to pick the GPU kernel), SDPA is used.
    """
    return q.device.type == "cpu" and not torch._C._is_torch_function_mode_enabled()


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention, ``softmax(q k^T / sqrt(d) + bias + mask) v``.

    Args:
        q: ``[*, H, Q, d]``.
        k, v: ``[*, H, K, d]``.
        bias: additive logits bias broadcastable to ``[*, H, Q, K]``, or ``None``.
        key_mask: ``[*, K]`` (bool or 0/1; broadcastable over ``*``), the keys every query of a
            sequence may attend to; masked keys get ``-1e9`` (fp16: ``-1e4``) added. ``None``:
            every key is real.

    A sequence with no real key at all (a padded row of the pair representation, a padded
    position's column of the MSA) outputs exactly 0 and passes no gradient to ``q, k, v`` or
    ``bias``. Its first key is unmasked and its values are zeroed, so the kernel never sees a
    row whose every key is masked: such rows make PyTorch's fp32 CPU SDPA backward wrong (the
    logits all round to -1e9 and the recomputed probabilities lose every digit).

    Returns:
        ``[*, H, Q, d]``.
    """
    key_bias = None
    if key_mask is not None:
        real = key_mask if key_mask.dtype == torch.bool else key_mask != 0
        empty = ~real.any(-1, keepdim=True)  # [*, 1]: sequences without a real key
        first = torch.arange(real.shape[-1], device=real.device) == 0
        real = real | (empty & first)
        v = v * (~empty).to(v.dtype)[..., None, None]  # [*, 1, 1, 1]
        key_bias = mask_bias(real, q.dtype)[..., None, None, :]  # [*, 1, 1, K]
    if _use_math_kernel(q):
        logits = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-1, -2))  # [*, H, Q, K]
        if bias is not None:
            logits = logits.add_(bias.to(logits.dtype))
        if key_bias is not None:
            logits = logits.add_(key_bias)
        return torch.matmul(torch.softmax(logits, -1), v)
    if bias is not None and bias.stride(-1) != 1:
        # A permuted pair bias ([*, r, r, H] -> [*, H, r, r]): CUDA's fused SDPA kernels refuse a
        # mask whose last dim is strided and fall back to the math kernel, which keeps the
        # [*, H, Q, K] probabilities. One contiguous copy keeps the memory-efficient kernel.
        bias = bias.contiguous()
    if key_bias is not None:
        bias = key_bias if bias is None else bias.to(q.dtype) + key_bias
    batch = q.shape[:-3]
    h, n_q, d = q.shape[-3:]
    n_k = k.shape[-2]
    # The fused SDPA kernels need 4-D inputs; flatten the batch dims (views when contiguous).
    q4 = q.reshape(-1, h, n_q, d)
    k4 = k.reshape(-1, h, n_k, d)
    v4 = v.reshape(-1, h, n_k, v.shape[-1])
    b4 = None
    if bias is not None:
        b4 = bias.to(q.dtype).expand(*batch, h, n_q, n_k).reshape(-1, h, n_q, n_k)
    out = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=b4)
    return out.reshape(*batch, h, n_q, v.shape[-1])


class Attention(nn.Module):
    """AF2 gated multi-head attention (supplement Alg. 7 / 8 core).

    ``q, k, v = Linear(x)`` (no bias), ``o = sigmoid(Linear(x)) * softmax(q k^T/sqrt(d) + bias) v``,
    ``out = Linear(o)`` (final init, so the residual update starts at 0).
    """

    def __init__(self, c_in: int, c_hidden: int, n_heads: int, gating: bool = True) -> None:
        super().__init__()
        self.c_hidden = c_hidden
        self.n_heads = n_heads
        hc = c_hidden * n_heads
        self.linear_q = Linear(c_in, hc, bias=False, init="glorot")
        self.linear_k = Linear(c_in, hc, bias=False, init="glorot")
        self.linear_v = Linear(c_in, hc, bias=False, init="glorot")
        self.linear_g = Linear(c_in, hc, init="gating") if gating else None
        self.linear_o = Linear(hc, c_in, init="final")

    def forward(
        self, x: torch.Tensor, bias: torch.Tensor | None, key_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Self-attention over dim -2.

        Args:
            x: ``[*, N, c_in]``.
            bias: broadcastable to ``[*, H, N, N]`` (pair/triangle bias) or None.
            key_mask: ``[*, N]`` real keys (see :func:`attention`) or None.

        Returns:
            ``[*, N, c_in]``.
        """
        return self.linear_o(self.gated(x, bias, key_mask))

    def gated(
        self, x: torch.Tensor, bias: torch.Tensor | None, key_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Everything but the output projection: ``[*, N, c_in] -> [*, N, H*d]``."""
        h, d = self.n_heads, self.c_hidden

        def heads(t: torch.Tensor) -> torch.Tensor:  # [*, N, H*d] -> [*, H, N, d]
            return t.unflatten(-1, (h, d)).transpose(-2, -3)

        o = attention(
            heads(self.linear_q(x)),
            heads(self.linear_k(x)),
            heads(self.linear_v(x)),
            bias,
            key_mask,
        )
        o = o.transpose(-2, -3)  # [*, N, H, d]
        if self.linear_g is not None:
            o = o * torch.sigmoid(self.linear_g(x)).unflatten(-1, (h, d))
        return o.flatten(-2)

    def inner_parameters(self) -> list[nn.Parameter]:
        """The parameters :meth:`gated` uses (all but the output projection's)."""
        lins = [self.linear_q, self.linear_k, self.linear_v, self.linear_g]
        return [p for lin in lins if lin is not None for p in lin.parameters()]


class LinearTail:
    """A chunk function's last op, a :class:`Linear`, run once in training (see :func:`chunked`).

    Its backward needs only its input (the head's output) and its weight, so the head is
    recomputed in backward but the Linear is not.
    """

    def __init__(self, linear: nn.Linear) -> None:
        self.linear = linear
        self.params = [linear.weight] + ([linear.bias] if linear.bias is not None else [])

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        """``[*, c_in] -> [*, c_out]``."""
        return self.linear(h)

    def vjp(self, h: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Gradients of ``h [*, c_in]`` and of the parameters given ``dy [*, c_out]``."""
        w = self.linear.weight
        dh = torch.matmul(dy, w.to(dy.dtype)).to(h.dtype)
        dy2 = dy.reshape(-1, dy.shape[-1])
        grads = [torch.matmul(dy2.t(), h.reshape(-1, h.shape[-1]).to(dy.dtype)).to(w.dtype)]
        if self.linear.bias is not None:
            grads.append(dy2.sum(0).to(self.linear.bias.dtype))
        return dh, grads


def chunked(
    fn: Callable[..., Any],
    args: Sequence[torch.Tensor],
    dims: Sequence[int | None],
    chunk_size: int | None,
    out_dim: int,
    params: Sequence[torch.Tensor] = (),
    tail: Any = None,
    recompute: bool = True,
) -> torch.Tensor:
    """``tail(fn(*args))`` computed in slices of ``chunk_size`` along one dimension.

    Args:
        fn: maps slices of ``args`` to one tensor (or, with a ``tail``, whatever the tail takes);
            must be slice-wise independent along the chunked dimension (the result is then
            identical to the unchunked one) and deterministic (no dropout).
        args: tensors passed to ``fn``.
        dims: per arg, the dimension to slice, or ``None`` to pass the arg whole. An arg of size
            1 along its dim (broadcast) is passed whole. All sliced dims must have the same size.
        chunk_size: slice length; ``None`` calls ``tail(fn(*args))`` directly.
        out_dim: dimension of the output that corresponds to the sliced dimension.
        params: every parameter ``fn`` uses other than through ``args`` (recomputation returns
            their gradients; one that is missing raises in backward).
        tail: ``None`` or the chunk's last op, with ``__call__(h)``, ``vjp(h, dy) -> (dh,
            param grads)`` and ``params`` (e.g. :class:`LinearTail`): not recomputed.
        recompute: False when ``fn``'s autograd keeps nothing but views of ``args`` and small
            tensors (then the slices run under plain autograd, without recomputation).

    With grad enabled (training) and ``recompute``, each slice's ``fn`` runs without autograd
    in forward and again, slice by slice, in backward (a custom autograd Function: only one
    slice's intermediates exist at a time, in backward as in forward; the tail and the slices'
    outputs are not recomputed and the output is written in place, not concatenated). Without
    grad (inference) the slices are written into one preallocated output.
    """
    sizes = {
        a.shape[d] for a, d in zip(args, dims, strict=True) if d is not None and a.shape[d] != 1
    }
    if chunk_size is None or not sizes or (len(sizes) == 1 and max(sizes) <= chunk_size):
        h = fn(*args)
        return tail(h) if tail is not None else h
    if len(sizes) != 1:
        raise ValueError(f"chunked: sliced dims disagree in size: {sorted(sizes)}")
    n = sizes.pop()
    if torch.is_grad_enabled() and recompute:
        plan = _Plan(fn, list(dims), chunk_size, n, out_dim, len(args), len(params), tail)
        tail_params = list(tail.params) if tail is not None else []
        return _ChunkedRecompute.apply(plan, *args, *params, *tail_params)
    if torch.is_grad_enabled():
        # plain autograd per slice; cat's backward hands out views of the incoming gradient
        parts = []
        for start in range(0, n, chunk_size):
            h = fn(*_slices(args, dims, start, min(chunk_size, n - start)))
            parts.append(tail(h) if tail is not None else h)
        return torch.cat(parts, dim=out_dim)
    return _chunk_loop(fn, tail, args, dims, chunk_size, n, out_dim)


def _chunk_loop(
    fn: Callable[..., Any],
    tail: Any,
    args: Sequence[torch.Tensor],
    dims: Sequence[int | None],
    chunk_size: int,
    n: int,
    out_dim: int,
) -> torch.Tensor:
    """Every slice written into one preallocated output (peak = output + one slice)."""
    out: torch.Tensor | None = None
    for start in range(0, n, chunk_size):
        length = min(chunk_size, n - start)
        res = fn(*_slices(args, dims, start, length))
        if tail is not None:
            res = tail(res)
        if out is None:
            shape = list(res.shape)
            shape[out_dim] = n
            out = res.new_empty(shape)
        out.narrow(out_dim, start, length).copy_(res)
        del res
    assert out is not None
    return out


class _Plan:
    """What :class:`_ChunkedRecompute` needs besides tensors."""

    def __init__(self, fn, dims, chunk_size, n, out_dim, n_args, n_params, tail) -> None:  # noqa: ANN001
        self.fn, self.dims, self.chunk_size, self.n = fn, dims, chunk_size, n
        self.out_dim, self.n_args, self.n_params, self.tail = out_dim, n_args, n_params, tail


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


class _ChunkedRecompute(torch.autograd.Function):
    """Slices computed without autograd in forward and recomputed one by one in backward.

    Inputs: the plan, then ``args``, ``params`` and the tail's parameters. Keeps only the
    inputs (alive anyway: the op's input and the weights).
    """

    @staticmethod
    def forward(ctx, plan: _Plan, *inputs: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        args = inputs[: plan.n_args]
        ctx.plan = plan
        ctx.device_type = args[0].device.type
        ctx.autocast = _autocast_state(ctx.device_type)
        ctx.save_for_backward(*args)
        # the parameters themselves (leaves that fn and the tail use), not saved copies: under an
        # enclosing activation checkpoint saved tensors come back as other tensor objects
        ctx.weights = inputs[plan.n_args :]
        detached = [a.detach() for a in args]  # no autograd here (nor module hooks' grad hooks)
        return _chunk_loop(
            plan.fn, plan.tail, detached, plan.dims, plan.chunk_size, plan.n, plan.out_dim
        )

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # noqa: ANN001, ANN205
        plan: _Plan = ctx.plan
        args = ctx.saved_tensors
        params = ctx.weights[: plan.n_params]
        inputs = (*args, *ctx.weights)
        needs = ctx.needs_input_grad[1:]
        grads: list[torch.Tensor | None] = [None] * len(inputs)
        enabled, dtype = ctx.autocast
        n, c = plan.n, plan.chunk_size
        with torch.enable_grad(), torch.autocast(ctx.device_type, dtype=dtype, enabled=enabled):
            for start in range(0, n, c):
                length = min(c, n - start)
                sl = [
                    a.detach().narrow(d, start, length) if d is not None and a.shape[d] != 1 else a
                    for a, d in zip(args, plan.dims, strict=True)
                ]
                sl = [
                    s.detach().requires_grad_(needs[i]) if needs[i] else s.detach()
                    for i, s in enumerate(sl)
                ]
                h = plan.fn(*sl)
                dy = grad_out.narrow(plan.out_dim, start, length)
                if plan.tail is not None:
                    hs = tuple(t.detach() for t in h) if isinstance(h, tuple) else h.detach()
                    dh, tail_grads = plan.tail.vjp(hs, dy)
                    for j, g in enumerate(tail_grads):
                        _accumulate(grads, plan.n_args + plan.n_params + j, g, needs)
                else:
                    dh = dy
                targets = [i for i in range(plan.n_args) if needs[i]]
                targets += [plan.n_args + j for j in range(plan.n_params) if needs[plan.n_args + j]]
                tensors = [sl[i] if i < plan.n_args else params[i - plan.n_args] for i in targets]
                outs = h if isinstance(h, tuple) else (h,)
                douts = dh if isinstance(dh, tuple) else (dh,)
                if start == 0:
                    _check_leaves(outs, tensors)
                got = torch.autograd.grad(outs, tensors, douts, allow_unused=True)
                for i, g in zip(targets, got, strict=True):
                    d = plan.dims[i] if i < plan.n_args else None
                    if d is not None and args[i].shape[d] != 1:
                        # the slices cover the dim once each: write, do not accumulate
                        if grads[i] is None:
                            grads[i] = torch.empty_like(args[i])
                        part = grads[i].narrow(d, start, length)
                        part.zero_() if g is None else part.copy_(g)
                    elif g is not None:
                        _accumulate(grads, i, g, needs)
                del h, dh, outs, douts, got
        return (None, *grads)


def _accumulate(grads: list, i: int, g: torch.Tensor, needs: Sequence[bool]) -> None:
    if not needs[i]:
        return
    grads[i] = g if grads[i] is None else grads[i].add_(g)


def _check_leaves(outs: Sequence[torch.Tensor], allowed: Sequence[torch.Tensor]) -> None:
    """Raise if the recomputed graph uses a leaf requiring grad that is not in ``allowed``
    (a parameter the caller did not pass in ``params`` would silently get no gradient)."""
    ids = {id(t) for t in allowed}
    seen, stack = set(), [o.grad_fn for o in outs if o.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        var = getattr(node, "variable", None)
        if var is not None and var.requires_grad and id(var) not in ids:
            raise RuntimeError(
                f"chunked: fn uses a tensor {tuple(var.shape)} requiring grad that is not in "
                "args or params"
            )
        stack.extend(nxt for nxt, _ in node.next_functions)


def _slices(
    args: Sequence[torch.Tensor], dims: Sequence[int | None], start: int, length: int
) -> list[torch.Tensor]:
    return [
        a if d is None or a.shape[d] == 1 else a.narrow(d, start, length)
        for a, d in zip(args, dims, strict=True)
    ]
