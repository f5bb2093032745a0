"""Triangle self-attention around the starting / ending node (AF2 supplement Alg. 13, 14).

Starting node: every row ``i`` of the pair representation attends over its keys ``k``, biased by
``b_jk = Linear(z_jk)``: ``z_ij <- sum_k softmax_k(q_ij . k_ik / sqrt(d) + b_jk) v_ik``.
Ending node: the same on the transposed pair representation.

With ``chunk_size`` rows ``i`` are processed in slices, which bounds the ``[*, I, H, r, r]``
logits/bias; in training a slice's projections and attention are recomputed in backward, its
output projection is not.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.profiler import record_function

from evoformer.model.primitives import Attention, Linear, LinearTail, chunked


class TriangleAttention(nn.Module):
    """Pair ``[*, r, r, c_z]`` -> update ``[*, r, r, c_z]``.

    Args:
        c_z: pair channels.
        c_hidden: channels per head.
        n_heads: heads.
        starting: True around the starting node (Alg. 13), False around the ending node (Alg. 14).
    """

    def __init__(self, c_z: int, c_hidden: int, n_heads: int, starting: bool) -> None:
        super().__init__()
        self.starting = starting
        self.linear_bias = Linear(c_z, n_heads, bias=False)
        self.mha = Attention(c_z, c_hidden, n_heads)

    def _rows(self, z_rows: torch.Tensor, mask_rows: torch.Tensor, tri_bias: torch.Tensor):
        """``z_rows [*, I, r, c_z]``, ``mask_rows [*, I, r]``, ``tri_bias [*, 1, H, r, r]`` ->
        gated attention output ``[*, I, r, H*d]`` (before the output projection)."""
        return self.mha.gated(z_rows, tri_bias, key_mask=mask_rows)  # a padded row i gives 0

    def forward(
        self, z: torch.Tensor, pair_mask: torch.Tensor, chunk_size: int | None = None
    ) -> torch.Tensor:
        """
        Args:
            z: ``[*, r, r, c_z]`` (layer-normed in pre-LN order).
            pair_mask: ``[*, r, r]`` 1 = both tokens real.
            chunk_size: rows per chunk, or ``None``.

        Returns:
            ``[*, r, r, c_z]`` update.
        """
        name = "triangle_attention_" + ("starting_node" if self.starting else "ending_node")
        with record_function(name):
            if not self.starting:
                # one contiguous copy, shared by every projection (a transposed view would be
                # copied, and kept for backward, by each Linear separately)
                z = z.transpose(-2, -3).contiguous()
                pair_mask = pair_mask.transpose(-1, -2)
            tri_bias = self.linear_bias(z).movedim(-1, -3).unsqueeze(-4)  # [*, 1, H, r, r]
            out = chunked(
                self._rows,
                [z, pair_mask, tri_bias],
                [-3, -2, None],
                chunk_size,
                -3,
                params=self.mha.inner_parameters(),
                tail=LinearTail(self.mha.linear_o),
            )
            if not self.starting:
                out = out.transpose(-2, -3)
            return out
