"""Offloaded and per-op activation checkpoints: same loss and gradients as plain checkpointing."""

from __future__ import annotations

import pytest
import torch

from evoformer.errors import InputError
from evoformer.model import BioFormer, ModelConfig
from evoformer.model.checkpointing import emulated_host, host_device, offloaded_checkpoint

TINY = dict(
    c_m=16,
    c_z=8,
    c_opm=4,
    n_heads_msa=2,
    c_hidden_msa=4,
    n_heads_pair=2,
    c_hidden_pair=4,
    c_hidden_tri_mul=8,
    n_blocks=3,
    chunk_size=4,
)


def _step(preset: str, prior_mode: str | None = None, **kw) -> tuple[torch.Tensor, dict]:
    """Loss and parameter gradients of one training step (dropout on, fp64, one padded cell)."""
    torch.manual_seed(0)
    cfg = ModelConfig(preset=preset, **{**TINY, **kw})
    prior = None
    if prior_mode is not None:
        prior = (torch.rand(20, 20, generator=torch.Generator().manual_seed(3)) > 0.7).float()
    model = BioFormer(
        cfg, n_genes=20, n_bins=5, prior=prior, prior_mode=prior_mode or "init"
    ).double()
    with torch.no_grad():  # away from the zero-initialised output layers: every path counts
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    g = torch.Generator().manual_seed(1)
    b, s, length = 2, 1, 9
    batch = {
        "gene_ids": torch.randint(0, 20, (b, s, length), generator=g),
        "values": torch.randint(0, 6, (b, s, length), generator=g),
        "pad_mask": torch.ones(b, s, length, dtype=torch.bool),
        "target": torch.randint(0, 5, (b, s, length), generator=g),
        "loss_mask": torch.rand(b, s, length, generator=g) < 0.5,
    }
    batch["pad_mask"][1, 0, 7:] = False
    model.train()
    torch.manual_seed(5)  # the dropout masks
    loss, _ = model.loss(batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize(
    ("preset", "ln_order", "prior_mode"),
    [("bioformer", "pre", "bias"), ("evoformer", "pre", None), ("evoformer", "post", None)],
)
def test_offloaded_and_per_op_checkpoints_give_identical_gradients(preset, ln_order, prior_mode):
    ref_loss, ref = _step(preset, prior_mode, ln_order=ln_order, blocks_per_ckpt=1)
    variants = [
        dict(blocks_per_ckpt=1, offload_checkpoints=True),
        dict(blocks_per_ckpt=1, offload_checkpoints=True, checkpoint_ops=True),
        dict(blocks_per_ckpt=2, checkpoint_ops=True),
        dict(checkpoint_ops=True),
    ]
    for kw in variants:
        # the "host" is a real copy here (on CPU a plain run keeps its inputs where they are)
        with emulated_host("cpu"):
            loss, grads = _step(preset, prior_mode, ln_order=ln_order, **kw)
        assert set(grads) == set(ref), kw
        assert torch.equal(loss, ref_loss), kw
        for name, g in ref.items():
            assert torch.equal(grads[name], g), (kw, name)
    if prior_mode is not None:  # the prior's bias enters every checkpoint as an input
        assert ref["prior_bias.weight"].abs().sum() > 0


def test_offloaded_checkpoint_copies_to_the_host_and_passes_inputs_through():
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, dtype=torch.float64, requires_grad=True)
    saved = []

    def fn(a, b):
        saved.append(a)
        return (a * w).sin() + b, b  # the second output is an input: passed through

    assert host_device(x) is None  # a CPU tensor is in host memory already
    with emulated_host("cpu"):
        assert host_device(x) == torch.device("cpu")
        out, same = offloaded_checkpoint(fn, (x, y), (True, False), [w])
    assert same is y
    out.pow(2).sum().backward()
    gx, gy, gw = x.grad.clone(), y.grad.clone(), w.grad.clone()
    x.grad = y.grad = w.grad = None
    ((x * w).sin() + y).pow(2).sum().backward()
    assert torch.allclose(gx, x.grad) and torch.allclose(gy, y.grad) and torch.allclose(gw, w.grad)
    # the recomputation ran on the host copy, not on x itself
    assert len(saved) == 2 and saved[1].data_ptr() != x.data_ptr()
    with pytest.raises(ValueError, match="flags"):
        offloaded_checkpoint(fn, (x, y), (True,), [w])


def test_memory_switches_are_checked():
    with pytest.raises(InputError, match="'offload_checkpoints'.*blocks_per_ckpt"):
        ModelConfig(offload_checkpoints=True)
    with pytest.raises(InputError, match="model.checkpoint_ops"):
        ModelConfig.from_dict({"checkpoint_ops": "yes"})
    with pytest.raises(InputError, match="'checkpoint_ops'"):
        ModelConfig(checkpoint_ops=1)
    cfg = ModelConfig(blocks_per_ckpt=1, offload_checkpoints=True, checkpoint_ops=True)
    assert cfg.to_dict()["offload_checkpoints"] and cfg.to_dict()["checkpoint_ops"]
    assert not ModelConfig().offload_checkpoints and not ModelConfig().checkpoint_ops
