"""Masked-value pretraining: choose the positions whose bins the model must predict.

* :func:`apply_value_mask`: the training mask (a share of each cell's real tokens, optionally a
  fixed share of them drawn from its non-zero genes);
* :func:`mask_generator`: a generator seeded from a tuple (masks depend on the position, not on
  history, so a resumed run and an uninterrupted one mask alike);
* :func:`fixed_mask`: the validation / test mask, one generator per cell group, uniform over
  real tokens: the same positions whatever the batch size, the number of processes, the model or
  its training settings, so every grid point is scored on the same held-out values.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch


def mask_generator(seed: int, *parts: int) -> torch.Generator:
    """A CPU generator seeded from ``(seed, *parts)``."""
    digest = hashlib.sha256(repr((seed, *parts)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def apply_value_mask(
    values: torch.Tensor,
    pad_mask: torch.Tensor,
    mask_ratio: float,
    n_bins: int,
    generator: torch.Generator,
    nonzero_fraction: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace ``round(mask_ratio * n_real)`` real positions of every cell by the MASK token.

    Args:
        values: ``[B, S, L]`` long bins in ``[0, n_bins)`` (bin 0 = zero expression).
        pad_mask: ``[B, S, L]`` bool, True = real token.
        mask_ratio: fraction of each cell's real tokens to mask, in ``[0, 1]``.
        n_bins: number of bins; the MASK token is ``n_bins``.
        generator: torch.Generator; the choice is deterministic given its state.
        nonzero_fraction: None = uniform over the real tokens. Else the share of each cell's
            ``n_mask`` positions drawn from its non-zero tokens (as many as it has, the rest
            from its zero tokens, and the other way round when the zeros run out).

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
    scores = scores.to(values.device)
    if nonzero_fraction is None:
        rank = scores.masked_fill(~real, 2.0).argsort(-1).argsort(-1)
        loss_mask = (rank < n_mask) & real
    else:
        nz = real & (values > 0)
        zero = real & (values == 0)
        n_nz_avail = nz.sum(-1, keepdim=True)
        n_zero_avail = zero.sum(-1, keepdim=True)
        want_nz = torch.round(n_mask.double() * nonzero_fraction).long()
        n_nz = torch.minimum(want_nz, n_nz_avail)
        n_zero = torch.minimum(n_mask - n_nz, n_zero_avail)
        n_nz = torch.minimum(n_mask - n_zero, n_nz_avail)  # zeros ran out: more non-zeros
        rank_nz = scores.masked_fill(~nz, 2.0).argsort(-1).argsort(-1)
        rank_zero = scores.masked_fill(~zero, 2.0).argsort(-1).argsort(-1)
        loss_mask = ((rank_nz < n_nz) & nz) | ((rank_zero < n_zero) & zero)
    masked = values.masked_fill(loss_mask, n_bins)
    return masked, loss_mask


def fixed_mask(
    values: torch.Tensor,
    pad_mask: torch.Tensor,
    mask_ratio: float,
    n_bins: int,
    seed: int,
    tag: int,
    groups: np.ndarray,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out mask of cell groups ``groups [B]`` (their indices in the validation or test
    set): group ``i`` is masked by ``mask_generator(seed, tag, i)``, uniform over real tokens.

    values, pad_mask: ``[B, S, L]``. Returns ``(masked_values, loss_mask)`` as
    :func:`apply_value_mask`.
    """
    masked, loss_mask = [], []
    for j, group in enumerate(np.asarray(groups).tolist()):
        gen = mask_generator(seed, tag, int(group))
        mv, lm = apply_value_mask(values[j : j + 1], pad_mask[j : j + 1], mask_ratio, n_bins, gen)
        masked.append(mv)
        loss_mask.append(lm)
    if not masked:
        return values.clone(), torch.zeros_like(pad_mask, dtype=torch.bool)
    return torch.cat(masked), torch.cat(loss_mask)
