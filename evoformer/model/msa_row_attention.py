"""MSA row-wise gated self-attention with pair bias (AF2 supplement Alg. 7).

Without a pair representation (``c_z=None``, preset ``none``) it is plain gated self-attention
over each row's tokens, with the key mask only.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.profiler import record_function

from evoformer.model.fused import layer_norm_heads
from evoformer.model.primitives import Attention, LayerNorm, Linear


class MSARowAttentionWithPairBias(nn.Module):
    """Each MSA row (cell) attends over its ``r`` tokens, biased by the pair representation.

    ``bias[h, i, j] = Linear(LayerNorm(z_ij))_h`` is shared by all ``S`` rows; masked keys get
    ``-inf``. Attention runs through SDPA; logits exist only inside the kernel on GPU.
    ``c_z=None``: no pair bias (``z`` must then be None). ``fused``: the pair bias through
    :func:`evoformer.model.fused.layer_norm_heads` (same values, one pass over ``z`` fewer).
    """

    fused: bool = False

    def __init__(self, c_m: int, c_z: int | None, c_hidden: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        if c_z is not None:
            self.layer_norm_z: LayerNorm | None = LayerNorm(c_z)
            self.linear_z: Linear | None = Linear(c_z, n_heads, bias=False)
        else:
            self.layer_norm_z = self.linear_z = None
        self.mha = Attention(c_m, c_hidden, n_heads)

    def forward(
        self,
        m: torch.Tensor,
        z: torch.Tensor | None,
        msa_mask: torch.Tensor,
        attn_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            m: ``[*, S, r, c_m]`` MSA (already layer-normed in pre-LN order).
            z: ``[*, r, r, c_z]`` pair representation, or None without one.
            msa_mask: ``[*, S, r]`` 1 = real token.
            attn_bias: ``[*, 1, H, r, r]`` added to the pair bias (a prior network's bias), or
                None.

        Returns:
            ``[*, S, r, c_m]`` update.
        """
        with record_function("msa_row_attention"):
            if self.linear_z is None or self.layer_norm_z is None:
                return self.mha(m, attn_bias, key_mask=msa_mask)
            if self.fused:
                pair_bias = layer_norm_heads(z, self.layer_norm_z, self.linear_z.weight)
                # [H, *, r, r] -> [*, 1, H, r, r]
                pair_bias = pair_bias.movedim(0, -3).unsqueeze(-4)
            else:
                pair_bias = self.linear_z(self.layer_norm_z(z))  # [*, r, r, H]
                pair_bias = pair_bias.movedim(-1, -3).unsqueeze(-4)  # [*, 1, H, r, r]
            if attn_bias is not None:
                pair_bias = pair_bias + attn_bias.to(pair_bias.dtype)
            return self.mha(m, pair_bias, key_mask=msa_mask)  # keys of row s: msa_mask[s]
