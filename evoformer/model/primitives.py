"""Building blocks shared by every Evoformer operation.

* :class:`Linear` with the AlphaFold 2 initialisations (supplement 1.11.4).
* :class:`LayerNorm` that keeps bf16/fp16 activations in their dtype under autocast (PyTorch's
  autocast would return fp32 and double the memory of the pair representation).
* :func:`attention`: multi-head attention through ``F.scaled_dot_product_attention`` with an
  additive bias, batch dims flattened so the fused kernels (flash / memory-efficient) can be
  chosen on GPU.
* :class:`Attention`: AF2's gated multi-head attention (Alg. 7 without the pair bias, which the
  callers pass in as a bias).
* :func:`mask_bias`: additive key mask.
* :func:`chunked`: apply a function slice by slice along one dimension; in training each slice
  is recomputed in backward (non-reentrant checkpoint), so chunking bounds memory in training
  and not only in inference.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

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


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Scaled dot-product attention, ``softmax(q k^T / sqrt(d) + bias) v``.

    Args:
        q: ``[*, H, Q, d]``.
        k, v: ``[*, H, K, d]``.
        bias: additive logits bias broadcastable to ``[*, H, Q, K]``, or ``None``.

    Returns:
        ``[*, H, Q, d]``.
    """
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

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Self-attention over dim -2.

        Args:
            x: ``[*, N, c_in]``.
            bias: broadcastable to ``[*, H, N, N]`` (pair/triangle bias plus mask bias) or None.

        Returns:
            ``[*, N, c_in]``.
        """
        h, d = self.n_heads, self.c_hidden

        def heads(t: torch.Tensor) -> torch.Tensor:  # [*, N, H*d] -> [*, H, N, d]
            return t.unflatten(-1, (h, d)).transpose(-2, -3)

        o = attention(
            heads(self.linear_q(x)), heads(self.linear_k(x)), heads(self.linear_v(x)), bias
        )
        o = o.transpose(-2, -3)  # [*, N, H, d]
        if self.linear_g is not None:
            o = o * torch.sigmoid(self.linear_g(x)).unflatten(-1, (h, d))
        return self.linear_o(o.flatten(-2))


def chunked(
    fn: Callable[..., torch.Tensor],
    args: Sequence[torch.Tensor],
    dims: Sequence[int | None],
    chunk_size: int | None,
    out_dim: int,
) -> torch.Tensor:
    """``fn(*args)`` computed in slices of ``chunk_size`` along one dimension.

    Args:
        fn: maps slices of ``args`` to one tensor; must be slice-wise independent along the
            chunked dimension (the result is then identical to ``fn(*args)``).
        args: tensors passed to ``fn``.
        dims: per arg, the dimension to slice, or ``None`` to pass the arg whole. An arg of size
            1 along its dim (broadcast) is passed whole. All sliced dims must have the same size.
        chunk_size: slice length; ``None`` calls ``fn(*args)`` directly.
        out_dim: dimension of the output that corresponds to the sliced dimension.

    With grad enabled (training) every slice runs under a non-reentrant activation checkpoint, so
    only one slice's intermediates exist at a time in backward as well as in forward. Without
    grad (inference) the slices are written into one preallocated output.
    """
    sizes = {
        a.shape[d] for a, d in zip(args, dims, strict=True) if d is not None and a.shape[d] != 1
    }
    if chunk_size is None or not sizes:
        return fn(*args)
    if len(sizes) != 1:
        raise ValueError(f"chunked: sliced dims disagree in size: {sorted(sizes)}")
    n = sizes.pop()
    if n <= chunk_size:
        return fn(*args)
    if torch.is_grad_enabled():
        # Each slice is recomputed in backward. Outputs are concatenated (cat's backward hands
        # out views of the incoming gradient; slice-assignment would copy it once per chunk).
        parts = [
            checkpoint(
                fn, *_slices(args, dims, start, min(chunk_size, n - start)), use_reentrant=False
            )
            for start in range(0, n, chunk_size)
        ]
        return torch.cat(parts, dim=out_dim)
    # Inference: write every slice into one preallocated output (peak = output + one slice).
    out: torch.Tensor | None = None
    for start in range(0, n, chunk_size):
        length = min(chunk_size, n - start)
        res = fn(*_slices(args, dims, start, length))
        if out is None:
            shape = list(res.shape)
            shape[out_dim] = n
            out = res.new_empty(shape)
        out.narrow(out_dim, start, length).copy_(res)
    assert out is not None
    return out


def _slices(
    args: Sequence[torch.Tensor], dims: Sequence[int | None], start: int, length: int
) -> list[torch.Tensor]:
    return [
        a if d is None or a.shape[d] == 1 else a.narrow(d, start, length)
        for a, d in zip(args, dims, strict=True)
    ]
