"""Triangle multiplicative updates, outgoing and incoming edges (AF2 supplement Alg. 11, 12).

``a, b = sigmoid(Linear(z)) * Linear(z) * mask`` (``c_hidden`` channels each);
outgoing: ``x_ij = sum_k a_ik b_jk``, incoming: ``x_ij = sum_k a_ki b_kj``;
``out = sigmoid(Linear(z)) * Linear(LayerNorm(x))``.

The sum over ``k`` is a batched matmul per channel. With ``chunk_size`` the hidden channels are
processed in slices (projection weights sliced, so the ``a``/``b`` projections of only one
slice exist at a time; in training a slice's operands are recomputed in backward, its batched
matmul is not).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from evoformer.model.primitives import LayerNorm, Linear, chunked


class TriangleMultiplication(nn.Module):
    """Pair ``[*, r, r, c_z]`` -> update ``[*, r, r, c_z]``.

    Args:
        c_z: pair channels.
        c_hidden: hidden channels (AF2: 128).
        outgoing: True for "outgoing edges" (Alg. 11), False for "incoming edges" (Alg. 12).
    """

    def __init__(self, c_z: int, c_hidden: int, outgoing: bool) -> None:
        super().__init__()
        self.outgoing = outgoing
        self.linear_a_p = Linear(c_z, c_hidden)
        self.linear_a_g = Linear(c_z, c_hidden, init="gating")
        self.linear_b_p = Linear(c_z, c_hidden)
        self.linear_b_g = Linear(c_z, c_hidden, init="gating")
        self.layer_norm_out = LayerNorm(c_hidden)
        self.linear_z = Linear(c_hidden, c_z, init="final")
        self.linear_g = Linear(c_z, c_z, init="gating")

    def _operands(
        self, z: torch.Tensor, mask: torch.Tensor, *w: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Gated, masked operands ``a, b`` for a slice of hidden channels.

        Args:
            z: ``[*, r, r, c_z]``; mask: ``[*, r, r, 1]``;
            w: weights/biases of a_p, a_g, b_p, b_g restricted to the slice (``[c', c_z]``, ``[c']``).

        Returns:
            ``a, b`` ``[*, c', r, r]`` (channels first, for the batched matmul).
        """
        wap, bap, wag, bag, wbp, bbp, wbg, bbg = (t.to(z.dtype) for t in w)
        a = torch.sigmoid(F.linear(z, wag, bag)) * F.linear(z, wap, bap) * mask
        b = torch.sigmoid(F.linear(z, wbg, bbg)) * F.linear(z, wbp, bbp) * mask
        # one copy each into the layout of the batched matmul (it would copy them otherwise)
        return a.movedim(-1, -3).contiguous(), b.movedim(-1, -3).contiguous()

    def forward(
        self, z: torch.Tensor, pair_mask: torch.Tensor, chunk_size: int | None = None
    ) -> torch.Tensor:
        """
        Args:
            z: ``[*, r, r, c_z]`` (layer-normed in pre-LN order).
            pair_mask: ``[*, r, r]`` 1 = both tokens real.
            chunk_size: hidden channels per chunk, or ``None``.

        Returns:
            ``[*, r, r, c_z]`` update.
        """
        name = "triangle_multiplication_" + ("outgoing" if self.outgoing else "incoming")
        with record_function(name):
            mask = pair_mask.to(z.dtype).unsqueeze(-1)
            ws = []
            for lin in (self.linear_a_p, self.linear_a_g, self.linear_b_p, self.linear_b_g):
                ws += [lin.weight, lin.bias]
            x = chunked(
                self._operands,
                [z, mask, *ws],
                [None, None] + [0] * len(ws),
                chunk_size,
                out_dim=-1,
                tail=_TriangleProduct(self.outgoing),
            )
            x = self.linear_z(self.layer_norm_out(x))
            return x * torch.sigmoid(self.linear_g(z))


class _TriangleProduct:
    """The triangle product of the operands, the tail of :func:`chunked` (not recomputed).

    ``a, b [*, c', r, r]`` -> ``x [*, r, r, c']``: outgoing ``x_ij = sum_k a_ik b_jk``,
    incoming ``x_ij = sum_k a_ki b_kj``.
    """

    params: list[torch.Tensor] = []

    def __init__(self, outgoing: bool) -> None:
        self.outgoing = outgoing

    def __call__(self, ab: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        a, b = ab
        x = a @ b.transpose(-1, -2) if self.outgoing else a.transpose(-1, -2) @ b
        return x.movedim(-3, -1)

    def vjp(
        self, ab: tuple[torch.Tensor, torch.Tensor], dy: torch.Tensor
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], list[torch.Tensor]]:
        """Gradients of ``a, b`` given ``dy [*, r, r, c']``."""
        a, b = ab
        dx = dy.movedim(-1, -3).to(a.dtype).contiguous()  # [*, c', r, r]
        if self.outgoing:  # x = a b^T
            return (dx @ b, dx.transpose(-1, -2) @ a), []
        return (b @ dx.transpose(-1, -2), a @ dx), []  # x = a^T b
