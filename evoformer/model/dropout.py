"""AF2 shared dropout (supplement 1.11.6): one mask shared along the rows or the columns.

``DropoutRowwise`` shares the mask along dim -3 (for the MSA ``[*, S, r, c]``: the same mask for
every sequence/cell; for the pair ``[*, r, r, c]``: the same mask for every row ``i``).
``DropoutColumnwise`` shares it along dim -2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _SharedDropout(nn.Module):
    shared_dim: int

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[*, R, C, c] -> [*, R, C, c]``: identity in eval mode or when ``p == 0``."""
        keep = self.keep_mask(x)
        return x if keep is None else x * keep

    def keep_mask(self, x: torch.Tensor) -> torch.Tensor | None:
        """The scaled mask ``[*, R, C, c]`` with size 1 along the shared dim (0 or ``1/(1-p)``),
        or None when the module is the identity (eval mode, ``p == 0``)."""
        if not self.training or self.p == 0.0:
            return None
        shape = list(x.shape)
        shape[self.shared_dim] = 1
        return F.dropout(x.new_ones(shape), p=self.p, training=True)


class DropoutRowwise(_SharedDropout):
    """Dropout with the mask shared along dim -3 (AF2 ``DropoutRowwise``)."""

    shared_dim = -3


class DropoutColumnwise(_SharedDropout):
    """Dropout with the mask shared along dim -2 (AF2 ``DropoutColumnwise``)."""

    shared_dim = -2
