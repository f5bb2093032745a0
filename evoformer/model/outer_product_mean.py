"""Outer product mean (AF2 supplement Alg. 10) without the ``[.., r, r, c, c]`` tensor.

The naive algorithm forms ``o_ij = mean_s a_si (x) b_sj`` of shape ``[*, r, r, c, c]`` and then
projects it to ``c_z``; at the journal's sizes that tensor alone is 500 GB. Here the final
projection ``W [c_z, c, c]`` is folded into ``b`` first::

    out_ij = W . sum_s a_si (x) b_sj / n_ij + bias
           = sum_{s,c} a_sic Q_scjz / n_ij + bias,      Q_scjz = sum_d W_zcd b_sjd

so the largest intermediate is ``Q [*, S*c, r*c_z]`` (``S*c_opm / r`` of the output) and the
contraction is a single matmul producing ``[*, r, r, c_z]`` directly. ``n_ij`` is the number of
rows where both tokens are real (AF2 masking, ``eps = 1e-3``). With ``chunk_size`` the output
rows ``i`` are computed in slices; nothing is recomputed in backward (a slice's product needs
only ``a`` and ``Q``, which are kept anyway).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.profiler import record_function

from evoformer.model.primitives import Linear, chunked


class OuterProductMean(nn.Module):
    """MSA ``[*, S, r, c_m]`` -> pair update ``[*, r, r, c_z]`` (or, given ``residual``, the
    updated pair representation: see :meth:`forward`)."""

    #: ``forward`` takes ``residual=`` (:class:`evoformer.model.evoformer.Residual`'s fused path)
    adds_residual = True

    def __init__(self, c_m: int, c_z: int, c_hidden: int, eps: float = 1e-3) -> None:
        super().__init__()
        self.c_hidden = c_hidden
        self.c_z = c_z
        self.eps = eps
        self.linear_a = Linear(c_m, c_hidden)
        self.linear_b = Linear(c_m, c_hidden)
        # weight [c_z, c*c] flattened from [c_z, c (of a), c (of b)], as AF2's flatten(a (x) b).
        self.linear_out = Linear(c_hidden * c_hidden, c_z, init="final")

    def forward(
        self,
        m: torch.Tensor,
        msa_mask: torch.Tensor,
        chunk_size: int | None = None,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            m: ``[*, S, r, c_m]`` (layer-normed in pre-LN order).
            msa_mask: ``[*, S, r]`` 1 = real token.
            chunk_size: output rows ``i`` per chunk, or ``None``.
            residual: ``[*, r, r, c_z]`` added to the update in the same pass as its
                normalisation (``addcdiv`` on the matmul output), or None.

        Returns:
            ``[*, r, r, c_z]`` update (plus ``residual``).
        """
        with record_function("outer_product_mean"):
            mask = msa_mask.to(m.dtype).unsqueeze(-1)  # [*, S, r, 1]
            a = self.linear_a(m) * mask  # [*, S, r, c]
            b = self.linear_b(m) * mask  # [*, S, r, c]
            s, r, c = a.shape[-3:]
            w = self.linear_out.weight.view(self.c_z, c, c)  # [z, c_a, c_b]
            # Q[*, s, c_a, j, z] = sum_d b[*, s, j, d] W[z, c_a, d]
            w_b = w.permute(2, 1, 0).reshape(c, c * self.c_z).to(b.dtype)  # [d, c_a*z]
            q = (b @ w_b).view(*b.shape[:-1], c, self.c_z)  # [*, S, r_j, c_a, z]
            q = q.transpose(-2, -3).reshape(*b.shape[:-3], s * c, r * self.c_z)  # [*, S*c, r*z]
            a_flat = a.transpose(-2, -3).reshape(*a.shape[:-3], r, s * c)  # [*, r_i, S*c]
            # n_ij: rows where both i and j are real.
            mask2 = msa_mask.to(a.dtype)
            norm = torch.einsum("...si,...sj->...ij", mask2, mask2).unsqueeze(-1)  # [*, r, r, 1]
            bias = self.linear_out.bias

            def rows(
                a_i: torch.Tensor, q_: torch.Tensor, norm_i: torch.Tensor, *res_i: torch.Tensor
            ) -> torch.Tensor:
                out = a_i @ q_  # [*, I, r*z]
                if res_i:  # res + out / n + bias: addcdiv keeps only n (out's grad is g / n)
                    out4 = out.view(*a_i.shape[:-1], r, self.c_z)
                    return torch.addcdiv(res_i[0], out4, norm_i + self.eps).add_(bias)
                out = _DivAddInplace.apply(out, norm_i + self.eps, bias.to(out.dtype))
                return out.view(*a_i.shape[:-1], r, self.c_z)  # [*, I, r, z]

            args, dims = [a_flat, q, norm], [-2, None, -3]
            if residual is not None:
                args, dims = [*args, residual], [*dims, -3]
            # a chunk's autograd keeps only views of a_flat and q and its small denominator:
            # nothing to recompute
            return chunked(rows, args, dims, chunk_size, out_dim=-3, recompute=False)


class _DivAddInplace(torch.autograd.Function):
    """``x / denom + bias`` written into ``x`` (the fresh matmul output).

    Autograd keeps only ``denom``: with out-of-place ops the un-normalised ``[*, I, r, c_z]``
    product would stay alive for backward next to the result, one extra output-sized tensor.

    Shapes: ``x [*, I, r*c_z]``, ``denom [*, I, r, 1]``, ``bias [c_z]``.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, denom: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(denom)
        ctx.bias_dtype = bias.dtype
        x4 = x.view(*denom.shape[:-1], bias.shape[0])
        x4.div_(denom).add_(bias)
        ctx.mark_dirty(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (denom,) = ctx.saved_tensors
        g4 = grad.reshape(*denom.shape[:-1], -1)
        grad_x = (g4 / denom).view(grad.shape) if ctx.needs_input_grad[0] else None
        grad_bias = g4.flatten(0, -2).sum(0).to(ctx.bias_dtype) if ctx.needs_input_grad[2] else None
        return grad_x, None, grad_bias
