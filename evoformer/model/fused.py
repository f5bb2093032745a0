"""Fused paths for the memory-bound pair work, and the step's compilation (``train.compile``).

At the sizes this model trains, the pair representation ``z [*, r, r, c_z]`` is read and written
by cheap per-element work far more than it is multiplied (issue 19: the journal step runs at
under 1% of a GPU's peak; on a CPU PyTorch's LayerNorm over ``c_z = 16`` channels alone takes
~40% of the row attention's forward + backward). The fused paths here compute the same values
with fewer passes over ``z`` and fewer saved tensors:

* :func:`layer_norm_heads`: the row attention's pair bias ``Linear(LayerNorm(z))`` (``H`` heads,
  no bias) as one autograd Function. Forward: the row statistics and the ``H`` projections of
  the centred ``z`` (matrix-vector products), no normalised ``[*, c_z]`` tensor; backward: the
  input gradient as one ``[N, H+1] x [H+1, c_z]`` product plus one ``addcmul``, the parameter
  gradients from one ``[H, N] x [N, c_z]`` product. It keeps ``z`` (alive anyway) and ``[N]``
  / ``[H, N]`` statistics instead of ``LayerNorm(z)``, works through ``z`` in slices of 16M
  elements (its fp32 temporaries stay small next to a bf16 ``z``), and its output is
  channels-first (``[H, *]``), the layout attention reads.
* :func:`add_dropout`: ``x + dropout(update)`` as one ``addcmul`` with the shared dropout mask
  (the same random draws as the module).
* the outer product mean's normalisation, bias and residual add in one ``addcdiv`` on its
  matmul output (:class:`evoformer.model.outer_product_mean.OuterProductMean`, ``residual=``).

They are switched per module (``fused`` attributes, :func:`set_fused`); a freshly built model
runs the plain ops, which the pre-flight memory trace and the FLOP count see. ``train.compile``
(:data:`COMPILE_MODES`, :func:`compile_model`) chooses for a training:

``auto``    the default: per device type, the mode measured to win there (:data:`AUTO_COMPILE`,
            :func:`compile_mode`), as ``train.precision: auto`` picks the precision;
``eager``   the plain ops and the per-parameter AdamW, no compilation (also ``false``: the step
            before issue 19, with which RESULTS.md's numbers were made; the published configs
            in ``configs/`` say so, so they reproduce to the last digit);
``fused``   the fused paths and the fused AdamW (:func:`adamw_options`), no compilation (same
            numbers up to rounding, no compile time; 1.1-1.2x on the CPU demo step);
``blocks``  ``fused`` and ``torch.compile`` of every Evoformer block (``dynamic=False``;
            blocks of one structure share a compiled graph, activation checkpoints recompute
            the compiled block; 1.4-1.6x on a CPU after 1-2 minutes of compilation);
``model``   ``torch.compile`` of the whole model's forward, plain ops, fused AdamW (also ``true``;
            before issue 19 the trainer compiled a wrapper whose ``loss_terms`` called the
            uncompiled module, so it compiled nothing).

``benchmarks/bench_compile.py`` (CPU) and the GPU check's ``compile`` item measure the modes
side by side (BENCHMARKS.md).
"""

from __future__ import annotations

import torch
from torch import nn

#: What ``train.compile`` can run (see the module docstring).
COMPILE_MODES: tuple[str, ...] = ("eager", "fused", "blocks", "model")
#: The value that picks a mode per device type (the default).
AUTO = "auto"
#: The mode ``auto`` runs, per device type: where a mode was measured to win. CPU: ``fused``
#: (1.1-1.2x on the demo step with no compile time; ``blocks`` steps faster but compiles for
#: 1-2 minutes, longer than a demo training computes). CUDA: ``eager`` until the GPU check's
#: ``compile`` item (``python -m benchmarks.gpu_check --only compile``) has measured the modes
#: on a GPU. A device type not listed runs ``eager``.
AUTO_COMPILE: dict[str, str] = {"cpu": "fused", "cuda": "eager"}
#: What the booleans of earlier configs mean.
COMPILE_BOOLEANS: dict[bool, str] = {True: "model", False: "eager"}


def compile_mode(value: str | bool, device_type: str = "cpu") -> str:
    """A ``train.compile`` value as one of :data:`COMPILE_MODES`: booleans mapped, ``auto`` to
    :data:`AUTO_COMPILE`'s mode for ``device_type``; raises ``ValueError`` for anything else."""
    if isinstance(value, bool):
        return COMPILE_BOOLEANS[value]
    if value == AUTO:
        return AUTO_COMPILE.get(device_type, "eager")
    if value not in COMPILE_MODES:
        raise ValueError(f"expected auto, {', '.join(COMPILE_MODES)} (or true / false)")
    return value


def adamw_options(mode: str | bool, device_type: str = "cpu") -> dict[str, bool]:
    """``torch.optim.AdamW`` options of a ``train.compile`` value on ``device_type``: every mode
    but ``eager`` uses the fused (single-kernel) AdamW, which on a CPU takes ~0.3 ms per step of
    the demo model where the per-parameter loop takes ~2 ms (same update, up to rounding)."""
    return {} if compile_mode(mode, device_type) == "eager" else {"fused": True}


def set_fused(model: nn.Module, enabled: bool) -> nn.Module:
    """Switch the fused paths of every submodule that has them (a ``fused`` attribute)."""
    for module in model.modules():
        if hasattr(module, "fused"):
            module.fused = enabled
    return model


def compile_model(model: nn.Module, mode: str | bool) -> nn.Module:
    """Apply a ``train.compile`` mode to ``model`` in place (``nn.Module.compile``, so that
    ``model(...)`` runs compiled also when called from its own methods, e.g. ``loss_terms``);
    ``auto`` resolves for the device of the model's parameters; returns ``model``."""
    from evoformer.model.evoformer import EvoformerBlock

    param = next(model.parameters(), None)
    mode = compile_mode(mode, "cpu" if param is None else param.device.type)
    set_fused(model, mode in ("fused", "blocks"))
    if mode == "blocks":
        for module in model.modules():
            if isinstance(module, EvoformerBlock):
                module.compile(dynamic=False)
    if mode == "model":
        model.compile(dynamic=False)
    return model


# ---------------------------------------------------------------------------- pair bias
def layer_norm_heads(x: torch.Tensor, layer_norm: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """``Linear(LayerNorm(x))`` without a bias, channels first.

    Args:
        x: ``[*, c]``.
        layer_norm: a :class:`evoformer.model.primitives.LayerNorm` over ``c`` (its ``weight``,
            ``bias``, ``eps``).
        weight: ``[H, c]``, the Linear's weight.

    Returns:
        ``[H, *]`` in the dtype of ``x`` (statistics and products in fp32).
    """
    lead = x.shape[:-1]
    y = _LayerNormHeads.apply(
        x.reshape(-1, x.shape[-1]), layer_norm.weight, layer_norm.bias, weight, layer_norm.eps
    )
    return y.view(weight.shape[0], *lead)


class _LayerNormHeads(torch.autograd.Function):
    """``y [H, N] = W (gamma * xhat + beta)`` for ``x [N, c]``, ``xhat`` its row-normalised self.

    With ``u = (W * gamma) xhat`` (``[H, N]``, kept) and ``g = dL/dy``: ``dx = rstd * (g^T
    (W*gamma)) + x * alpha + beta'`` with ``alpha = -rstd^2 (g.u) / c`` and ``beta' = -rstd
    (g . mean_c(W*gamma)) - mu * alpha`` (LayerNorm's backward, written for a rank-``H``
    upstream gradient); ``M = sum_n g xhat = (g*rstd) x - (g*rstd) mu`` gives ``dW = gamma * M +
    sum_n(g) beta``, ``dgamma = sum_h W * M``, ``dbeta = sum_h W sum_n(g)``.
    """

    @staticmethod
    def forward(ctx, x, gamma, beta, weight, eps):  # noqa: ANN001, ANN205
        n, c = x.shape
        with torch.autocast(x.device.type, enabled=False):
            dt = _compute_dtype(x)
            inv_c = x.new_full((c,), 1.0 / c, dtype=dt)
            wg = weight.to(dt) * gamma.to(dt)  # [H, c]
            mu, rstd = x.new_empty(n, dtype=dt), x.new_empty(n, dtype=dt)
            u = x.new_empty(weight.shape[0], n, dtype=dt)  # (W*gamma) xhat
            for s, e in _row_chunks(n, c):
                xf = x[s:e].to(dt)
                mu[s:e] = torch.mv(xf, inv_c)
                xc = xf - mu[s:e, None]  # [rows, c], temporary
                rstd[s:e] = torch.rsqrt(torch.mv(xc * xc, inv_c) + eps)
                u[:, s:e] = torch.mm(wg, xc.t()).mul_(rstd[s:e])
            y = u + torch.mv(weight.to(dt), beta.to(dt))[:, None]
        ctx.save_for_backward(x, gamma, beta, weight, mu, rstd, u)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_y):  # noqa: ANN001, ANN205
        x, gamma, beta, weight, mu, rstd, u = ctx.saved_tensors
        need_x, need_g, need_b, need_w = ctx.needs_input_grad[:4]
        need_params = need_g or need_b or need_w
        n, c = x.shape
        dx = dgamma = dbeta = dw = None
        with torch.autocast(x.device.type, enabled=False):
            dt = _compute_dtype(x)
            w32, g32 = weight.to(dt), gamma.to(dt)
            wg = w32 * g32  # [H, c]
            a = torch.cat([wg, wg.new_ones(1, c)], 0)  # [H+1, c]
            m = wg.new_zeros(wg.shape)  # sum_n g xhat, [H, c]
            gsum = wg.new_zeros(wg.shape[0])  # sum_n g, [H]
            chunks = _row_chunks(n, c)
            if need_x and len(chunks) > 1:
                dx = torch.empty_like(x)
            for s, e in chunks:
                xf, g = x[s:e].to(dt), grad_y[:, s:e].to(dt)  # [rows, c], [H, rows]
                r_, mu_ = rstd[s:e], mu[s:e]
                gr = g * r_
                if need_x:
                    alpha = (g * u[:, s:e]).sum(0).mul_(r_ * r_ / -c)  # [rows]
                    shift = torch.mv(g.t(), wg.mean(-1)).mul_(r_).neg_().sub_(mu_ * alpha)
                    k = torch.cat([gr, shift[None]], 0)  # [H+1, rows]
                    part = torch.mm(k.t(), a).addcmul_(xf, alpha[:, None])  # [rows, c]
                    if dx is None:  # one slice: no copy
                        dx = part.to(x.dtype)
                    else:
                        dx[s:e] = part
                if need_params:
                    m += torch.mm(gr, xf).sub_(torch.mv(gr, mu_)[:, None])
                    gsum += g.sum(1)
            if need_w:
                dw = (g32 * m + gsum[:, None] * beta.to(dt)).to(weight.dtype)
            if need_g:
                dgamma = (w32 * m).sum(0).to(gamma.dtype)
            if need_b:
                dbeta = torch.mv(w32.t(), gsum).to(beta.dtype)
        return dx, dgamma, dbeta, dw, None


#: Elements of ``x`` per slice of :class:`_LayerNormHeads` (its fp32 temporaries are a few
#: slices, not a few ``z``: a bf16 ``z`` of gigabytes is never copied to fp32 whole).
_CHUNK_ELEMENTS = 1 << 24


def _row_chunks(n: int, c: int) -> list[tuple[int, int]]:
    rows = max(1, _CHUNK_ELEMENTS // c)
    return [(s, min(n, s + rows)) for s in range(0, n, rows)]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 for half-precision inputs, else the input's dtype (fp64 stays fp64)."""
    return torch.promote_types(x.dtype, torch.float32)


# ---------------------------------------------------------------------------- residuals
def add_dropout(x: torch.Tensor, update: torch.Tensor, dropout: nn.Module) -> torch.Tensor:
    """``x + dropout(update)`` in one pass: ``addcmul(x, update, keep)`` with the dropout module's
    shared mask (:meth:`evoformer.model.dropout._SharedDropout.keep_mask`, the same random draws
    as calling the module). ``[*, R, C, c]`` each; a module without a mask (identity) or operands
    of different dtypes give the plain sum."""
    keep_mask = getattr(dropout, "keep_mask", None)
    keep = keep_mask(update) if keep_mask is not None else None
    if keep is None:
        return x + (update if keep_mask is not None else dropout(update))
    if x.dtype != update.dtype:
        return x + update * keep
    return torch.addcmul(x, update, keep)
