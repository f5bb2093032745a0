"""Make a traced CPU step allocate what the same step allocates on an A100/H100.

The traced estimate runs the training step under ``FakeTensorMode`` on fake *CPU* tensors
(fake CUDA tensors abort a CPU-only PyTorch). Three things differ between a CPU and a CUDA run
of the same code, and :func:`cuda_emulation` closes each gap:

1. **Allocator granularity.** The CUDA caching allocator rounds every block up to 512 bytes
   (``torch.cuda.max_memory_allocated`` counts the rounded blocks); MemTracker only rounds
   tensors whose device is CUDA. The context rounds every tracked storage.
2. **Attention kernels.** ``F.scaled_dot_product_attention`` picks a kernel per device: on an
   A100 with a float bias it runs the memory-efficient kernel (saves ``q, k, v, bias, out`` and a
   ``[N, H, ceil(Q/32)*32]`` fp32 log-sum-exp; the bias is re-laid out when its rows are not
   8-aligned; a bias whose last dim is strided sends CUDA to the math kernel; the bias gradient
   is allocated 16-aligned), without a bias and in half precision
   the flash kernel; the CPU picks its own flash kernel or the math fallback (which keeps the
   ``[N, H, Q, K]`` probabilities). The context routes SDPA to the CUDA choice, calling the
   very ATen ops CUDA calls; their meta kernels give the CUDA shapes.
3. **Autocast policy.** ``torch.autocast("cpu", bfloat16)`` casts the same matmul-like ops to
   bf16 as CUDA autocast, but CUDA additionally *upcasts*: ``softmax``, ``log_softmax``, ``sum``,
   ``prod``, ``cumsum``, ``cumprod`` of a bf16 tensor return fp32 (the ``fp32_set_opt_dtype``
   policy) and ``layer_norm``, ``group_norm``, ``exp``, ``log``, ``pow``, ``rsqrt``, ... run in
   fp32 (the ``fp32`` policy); CPU autocast leaves them in bf16. The context applies the CUDA
   policy to those functions. (BioFormer's own LayerNorm disables autocast for bf16 inputs on
   purpose, so it is unaffected; the others matter only outside the fused attention kernels.)
   CUDA also casts ``addmv``, ``addr``, ``mv``, ``chain_matmul`` and ``linalg.multi_dot`` to
   bf16 where CPU autocast does not; the model does not use them and they are left alone.
4. **Host memory.** With ``offload_checkpoints`` a CUDA run copies the checkpoint inputs to
   pinned host memory; on fake CPU tensors the host would be the device. The context sends the
   copies to the ``meta`` device instead (:func:`evoformer.model.checkpointing.emulated_host`),
   which MemTracker counts apart: the traced estimate reports it as host memory, each copy
   rounded up to a power of two as PyTorch's pinned (caching host) allocator rounds it.

Not emulated (documented terms of the estimate instead): the CUDA context and cuBLAS/NCCL
workspaces (outside ``max_memory_allocated`` or a few MiB), kernel-internal workspaces of the
attention backward, and allocator fragmentation (reserved > allocated).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.graph import _engine_run_backward
from torch.distributed._tools import mem_tracker as _mt
from torch.overrides import TorchFunctionMode

from evoformer.model.checkpointing import emulated_host, pinned_bytes

#: CUDA caching allocator block granularity (c10/cuda/CUDACachingAllocator.cpp kMinBlockSize).
CUDA_BLOCK_BYTES = 512

_HALF = (torch.float16, torch.bfloat16)
#: Where the emulation puts what a CUDA run keeps in host memory (MemTracker tracks it apart).
HOST_DEVICE = "meta"

# CUDA autocast "fp32_set_opt_dtype": called with dtype=float32 when the input is half.
_SET_OPT_DTYPE = {
    torch.softmax,
    torch.Tensor.softmax,
    F.softmax,
    torch.log_softmax,
    torch.Tensor.log_softmax,
    F.log_softmax,
    torch.sum,
    torch.Tensor.sum,
    torch.prod,
    torch.Tensor.prod,
    torch.cumsum,
    torch.Tensor.cumsum,
    torch.cumprod,
    torch.Tensor.cumprod,
}
# CUDA autocast "fp32": floating inputs are cast to float32.
_FP32 = {
    F.layer_norm,
    torch.layer_norm,
    F.group_norm,
    torch.group_norm,
    torch.exp,
    torch.Tensor.exp,
    torch.expm1,
    torch.Tensor.expm1,
    torch.log,
    torch.Tensor.log,
    torch.log1p,
    torch.Tensor.log1p,
    torch.log2,
    torch.Tensor.log2,
    torch.log10,
    torch.Tensor.log10,
    torch.reciprocal,
    torch.Tensor.reciprocal,
    torch.rsqrt,
    torch.Tensor.rsqrt,
    torch.pow,
    torch.Tensor.pow,
    torch.Tensor.__pow__,
    F.softplus,
    torch.acos,
    torch.asin,
    torch.cosh,
    torch.sinh,
    torch.tan,
    torch.erfinv,
    torch.logsumexp,
    torch.Tensor.logsumexp,
    torch.cdist,
    F.mse_loss,
    F.l1_loss,
    F.smooth_l1_loss,
    F.huber_loss,
    F.nll_loss,
    F.kl_div,
    F.binary_cross_entropy_with_logits,
    F.cosine_similarity,
}


def _to(t: Any, dtype: torch.dtype) -> Any:
    if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != dtype:
        return t.to(dtype)
    return t


def _aligned_8(t: torch.Tensor) -> bool:
    """``aligned_tensor<8>`` of aten/src/ATen/native/transformers/attention.cpp."""
    return all(t.stride(i) % 8 == 0 for i in range(t.dim() - 1)) and t.stride(-1) == 1


def cuda_sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` through the kernel an sm80+ GPU would choose.

    Inputs ``[N, H, Q, d]``, ``[N, H, K, d]``; ``attn_mask`` broadcastable to ``[N, H, Q, K]``.
    Flash (half precision, no mask, ``d % 8 == 0``, ``d <= 256``), else memory-efficient
    (fp32/half, ``d`` aligned to 16 bytes), else the math fallback.
    """
    if torch.is_autocast_enabled("cpu"):  # SDPA is on CUDA autocast's lower-precision list
        dt = torch.get_autocast_dtype("cpu")
        query, key, value, attn_mask = (_to(t, dt) for t in (query, key, value, attn_mask))
    dt = query.dtype
    d = query.shape[-1]
    four_d = query.dim() == 4 and key.dim() == 4 and value.dim() == 4
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros_like(attn_mask, dtype=dt).masked_fill(~attn_mask, -math.inf)
    if four_d and not enable_gqa and dt in _HALF and attn_mask is None and d % 8 == 0 and d <= 256:
        out = torch.ops.aten._scaled_dot_product_flash_attention(
            query, key, value, dropout_p, is_causal, False, scale=scale
        )
        return out[0]
    align = 8 if dt in _HALF else 4
    unit_stride = attn_mask is None or attn_mask.stride(-1) == 1  # sdp_utils: else math on CUDA
    if (
        four_d
        and not enable_gqa
        and dt in (torch.float32, *_HALF)
        and d % align == 0
        and unit_stride
    ):
        bias = attn_mask
        if bias is not None:
            if not _aligned_8(bias):  # preprocess_mask: pad the rows to 8 elements
                k_len = bias.shape[-1]
                bias = F.pad(bias, (0, 8 - k_len % 8)).narrow(-1, 0, k_len)
            bias = bias.expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])
        need_lse = query.requires_grad or key.requires_grad or value.requires_grad
        out = torch.ops.aten._scaled_dot_product_efficient_attention(
            query, key, value, bias, need_lse, dropout_p, is_causal, scale=scale
        )
        return out[0]
    return torch.ops.aten._scaled_dot_product_attention_math(
        query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa
    )[0]


class _CudaFunctions(TorchFunctionMode):
    """SDPA kernel choice and CUDA autocast's fp32 policies, applied at the torch-function level."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return cuda_sdpa(*args, **kwargs)
        if func is torch.Tensor.backward or func is torch.autograd.backward:
            # A mode is off the stack while its handler runs; backward must see it (activation
            # checkpointing recomputes the forward inside backward).
            return self._backward(*args, **kwargs)
        if func is torch.autograd.grad:
            # the same for a backward inside a backward (an offloaded checkpoint's recomputation
            # differentiates a group whose ops are checkpoints of their own)
            return self._grad(*args, **kwargs)
        if torch.is_autocast_enabled("cpu"):
            if func in _SET_OPT_DTYPE and args:
                first = args[0]
                if (
                    isinstance(first, torch.Tensor)
                    and first.dtype in _HALF
                    and kwargs.get("dtype") is None
                ):
                    kwargs = {**kwargs, "dtype": torch.float32}
                    # positional dtype (softmax(x, dim, dtype)) does not occur with a half input
            elif func in _FP32:
                args = tuple(_to(a, torch.float32) for a in args)
                kwargs = {k: _to(v, torch.float32) for k, v in kwargs.items()}
                with torch.autocast("cpu", enabled=False):
                    return func(*args, **kwargs)
        return func(*args, **kwargs)

    def _backward(self, tensors: Any, grad_tensors: Any = None, **kwargs: Any) -> None:
        """``loss.backward()`` of a scalar loss, run with this mode active."""
        extra = [v for v in kwargs.values() if v not in (None, False)]
        if extra or grad_tensors is not None or not isinstance(tensors, torch.Tensor):
            raise NotImplementedError("cuda_emulation: only loss.backward() of a scalar loss")
        with self:
            _engine_run_backward(
                (tensors,),
                (torch.ones_like(tensors),),
                False,
                False,
                (),
                allow_unreachable=True,
                accumulate_grad=True,
            )

    def _grad(
        self,
        outputs: Any,
        inputs: Any,
        grad_outputs: Any = None,
        retain_graph: bool | None = None,
        create_graph: bool = False,
        only_inputs: bool = True,
        allow_unused: bool | None = None,
        is_grads_batched: bool = False,
        materialize_grads: bool = False,
    ) -> tuple[torch.Tensor | None, ...]:
        """``torch.autograd.grad`` of tensors (sequences), run with this mode active."""
        if is_grads_batched or materialize_grads or isinstance(inputs, dict):
            raise NotImplementedError("cuda_emulation: torch.autograd.grad of plain tensors only")
        outs = (outputs,) if isinstance(outputs, torch.Tensor) else tuple(outputs)
        ins = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
        grads = (
            [None] * len(outs)
            if grad_outputs is None
            else [grad_outputs]
            if isinstance(grad_outputs, torch.Tensor)
            else list(grad_outputs)
        )
        grads = [torch.ones_like(o) if g is None else g for o, g in zip(outs, grads, strict=True)]
        with self:
            return _engine_run_backward(
                outs,
                tuple(grads),
                create_graph if retain_graph is None else retain_graph,
                create_graph,
                ins,
                bool(allow_unused),
                accumulate_grad=False,
            )


def _rounded_mem(self: Any) -> int:
    mem = self.size * self.element_size
    if torch.device(self.device).type == HOST_DEVICE:  # pinned host memory
        return pinned_bytes(mem)
    return math.ceil(mem / CUDA_BLOCK_BYTES) * CUDA_BLOCK_BYTES


@contextlib.contextmanager
def cuda_emulation() -> Iterator[None]:
    """Within: 512-byte blocks for every MemTracker storage, CUDA SDPA kernels and autocast
    policy, offloaded checkpoint inputs on the ``meta`` device (host memory).

    Use inside ``FakeTensorMode`` with fake CPU tensors (and ``torch.autocast("cpu")`` for bf16).
    """
    info = _mt._WeakRefInfo
    orig = info._calculate_mem_consumed
    info._calculate_mem_consumed = _rounded_mem  # type: ignore[method-assign]
    try:
        with _CudaFunctions(), emulated_host(HOST_DEVICE):
            yield
    finally:
        info._calculate_mem_consumed = orig  # type: ignore[method-assign]
