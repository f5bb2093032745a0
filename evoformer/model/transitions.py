"""MSA and pair transitions (AF2 supplement Alg. 9 and 15): a two-layer ReLU MLP."""

from __future__ import annotations

import torch
from torch import nn
from torch.profiler import record_function

from evoformer.model.primitives import Linear, LinearTail, chunked


class Transition(nn.Module):
    """``Linear(c, n*c) -> ReLU -> Linear(n*c, c)`` applied to every element independently.

    Args:
        c: channels.
        n: expansion factor (AF2: 4).
        name: profiler range name (``msa_transition`` / ``pair_transition``).
    """

    def __init__(self, c: int, n: int, name: str) -> None:
        super().__init__()
        self.name = name
        self.linear_1 = Linear(c, n * c, init="relu")
        self.linear_2 = Linear(n * c, c, init="final")

    def _hidden(self, x: torch.Tensor) -> torch.Tensor:
        """``[*, c] -> [*, n*c]``: ``ReLU(Linear(x))``."""
        return torch.relu(self.linear_1(x))

    def forward(self, x: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
        """
        Args:
            x: ``[*, R, C, c]`` (MSA ``[*, S, r, c_m]`` or pair ``[*, r, r, c_z]``).
            chunk_size: rows (dim -3) per chunk; bounds the ``[*, R, C, n*c]`` hidden tensor.

        Returns:
            ``[*, R, C, c]`` update.
        """
        with record_function(self.name):
            # in training a chunk's hidden layer is recomputed in backward, linear_2 is not
            return chunked(
                self._hidden,
                [x],
                [-3],
                chunk_size,
                out_dim=-3,
                params=list(self.linear_1.parameters()),
                tail=LinearTail(self.linear_2),
            )
