"""Masked-value pretraining: choose the positions whose bins the model must predict."""

from __future__ import annotations

import torch


def apply_value_mask(
    values: torch.Tensor,
    pad_mask: torch.Tensor,
    mask_ratio: float,
    n_bins: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace ``round(mask_ratio * n_real)`` real positions of every cell by the MASK token.

    Args:
        values: ``[B, S, L]`` long bins in ``[0, n_bins)``.
        pad_mask: ``[B, S, L]`` bool, True = real token.
        mask_ratio: fraction of each cell's real tokens to mask, in ``[0, 1]``.
        n_bins: number of bins; the MASK token is ``n_bins``.
        generator: torch.Generator; the choice is deterministic given its state.

    Returns:
        ``(masked_values [B, S, L] long, loss_mask [B, S, L] bool)``: loss_mask marks the masked
        (to-be-predicted) positions, always a subset of the real ones.
    """
    if not 0.0 <= mask_ratio <= 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1], got {mask_ratio}")
    real = pad_mask.bool()
    n_real = real.sum(-1, keepdim=True)  # [B, S, 1]
    n_mask = torch.round(n_real.double() * mask_ratio).long()  # round half to even, as Python
    # Uniform scores on the generator's device; padding sorts last (score 2 > any uniform).
    scores = torch.rand(values.shape, generator=generator, device=generator.device)
    scores = scores.to(values.device).masked_fill(~real, 2.0)
    rank = scores.argsort(-1).argsort(-1)  # rank of every position among its cell's scores
    loss_mask = (rank < n_mask) & real
    masked = values.masked_fill(loss_mask, n_bins)
    return masked, loss_mask
