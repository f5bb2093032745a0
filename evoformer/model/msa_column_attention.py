"""MSA column-wise gated self-attention (AF2 supplement Alg. 8)."""

from __future__ import annotations

import torch
from torch import nn
from torch.profiler import record_function

from evoformer.model.primitives import Attention


class MSAColumnAttention(nn.Module):
    """Each token position attends over the ``S`` rows (cells) of the MSA."""

    def __init__(self, c_m: int, c_hidden: int, n_heads: int) -> None:
        super().__init__()
        self.mha = Attention(c_m, c_hidden, n_heads)

    def forward(self, m: torch.Tensor, msa_mask: torch.Tensor) -> torch.Tensor:
        """
        Args:
            m: ``[*, S, r, c_m]``.
            msa_mask: ``[*, S, r]`` 1 = real token.

        Returns:
            ``[*, S, r, c_m]`` update.
        """
        with record_function("msa_column_attention"):
            m_t = m.transpose(-2, -3).contiguous()  # [*, r, S, c_m], one copy for all Linears
            # keys of column j: msa_mask[:, j]; a padded position's column has none and outputs 0
            return self.mha(m_t, None, key_mask=msa_mask.transpose(-1, -2)).transpose(-2, -3)
