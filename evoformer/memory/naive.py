"""The naive outer product mean, for "naive vs ours" memory comparisons only.

This is the algorithm of the journal (and of AF2's pseudo-code, supplement Alg. 10): the outer
product of every pair of tokens is formed explicitly, ``o [B, r, r, c, c]``, flattened and then
projected to ``c_z``. The ``[B, r, r, c, c]`` tensor is the Linear's input, so autograd keeps it
for the weight gradient; at the journal's size (B=32, r=500, c=128, fp32) it is 524 GB.

:class:`NaiveOuterProductMean` has the same parameters and call signature as
:class:`evoformer.model.outer_product_mean.OuterProductMean`, so :func:`use_naive_opm` can swap
it into a built model (weights shared) to trace the naive configuration.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from evoformer.model.outer_product_mean import OuterProductMean


class NaiveOuterProductMean(nn.Module):
    """MSA ``[*, S, r, c_m]`` -> pair update ``[*, r, r, c_z]`` through ``[*, r, r, c, c]``."""

    def __init__(self, c_m: int, c_z: int, c_hidden: int, eps: float = 1e-3) -> None:
        super().__init__()
        ref = OuterProductMean(c_m, c_z, c_hidden, eps)
        self.c_hidden = c_hidden
        self.c_z = c_z
        self.eps = eps
        self.linear_a = ref.linear_a
        self.linear_b = ref.linear_b
        self.linear_out = ref.linear_out

    def forward(
        self, m: torch.Tensor, msa_mask: torch.Tensor, chunk_size: int | None = None
    ) -> torch.Tensor:
        """
        Args:
            m: ``[*, S, r, c_m]``.
            msa_mask: ``[*, S, r]`` 1 = real token.
            chunk_size: ignored (the naive algorithm has no chunking).

        Returns:
            ``[*, r, r, c_z]`` update.
        """
        mask = msa_mask.to(m.dtype).unsqueeze(-1)  # [*, S, r, 1]
        a = self.linear_a(m) * mask  # [*, S, r, c]
        b = self.linear_b(m) * mask
        outer = torch.einsum("...sic,...sjd->...ijcd", a, b)  # [*, r, r, c, c]
        outer = outer.flatten(-2)  # [*, r, r, c*c]
        mask2 = msa_mask.to(a.dtype)
        norm = torch.einsum("...si,...sj->...ij", mask2, mask2).unsqueeze(-1)  # [*, r, r, 1]
        # the same normalisation as ours: (W . sum_s a (x) b) / (n_ij + eps) + bias
        out = F.linear(outer, self.linear_out.weight)  # [*, r, r, c_z]
        return out / (norm + self.eps) + self.linear_out.bias.to(out.dtype)


def use_naive_opm(model: nn.Module) -> int:
    """Replace every ``OuterProductMean`` in ``model`` by a naive one sharing its weights.

    Returns:
        the number of modules replaced.
    """
    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, OuterProductMean):
                naive = NaiveOuterProductMean.__new__(NaiveOuterProductMean)
                nn.Module.__init__(naive)
                naive.c_hidden, naive.c_z, naive.eps = child.c_hidden, child.c_z, child.eps
                naive.linear_a, naive.linear_b, naive.linear_out = (
                    child.linear_a,
                    child.linear_b,
                    child.linear_out,
                )
                setattr(parent, name, naive)
                n += 1
    return n
