"""Evoformer block / stack: naive reference, LN order, chunking, checkpointing, dropout."""

from __future__ import annotations

import pytest
import torch

from evoformer.model import EvoformerBlock, EvoformerStack, ModelConfig
from evoformer.model.dropout import DropoutColumnwise, DropoutRowwise
from tests.reference_ops import (
    assert_same,
    random_masks,
    randomize_parameters_,
    ref_evoformer_block,
)

D = torch.float64
SMALL = dict(
    c_m=12,
    c_z=6,
    c_opm=3,
    n_heads_msa=2,
    c_hidden_msa=4,
    n_heads_pair=2,
    c_hidden_pair=3,
    c_hidden_tri_mul=5,
    transition_n=2,
)


def _cfg(**kw) -> ModelConfig:
    return ModelConfig.from_dict({**SMALL, **kw})


def _inputs(b=2, s=2, r=6, cfg=None, seed=0):
    cfg = cfg or _cfg()
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(b, s, r, cfg.c_m, generator=g, dtype=D)
    z = torch.randn(b, r, r, cfg.c_z, generator=g, dtype=D)
    msa_mask, pair_mask = random_masks(b, s, r, seed)
    return m, z, msa_mask, pair_mask


def _stack_and_grads(module, m, z, msa_mask, pair_mask, seed=0):
    """(m_out, z_out) masked, input grads and param grads of a fixed random projection."""
    g = torch.Generator().manual_seed(seed + 100)
    wm = torch.randn(m.shape, generator=g, dtype=D)
    wz = torch.randn(z.shape, generator=g, dtype=D)
    leaves = [m.clone().requires_grad_(True), z.clone().requires_grad_(True)]
    module.zero_grad(set_to_none=True)
    mo, zo = module(*leaves, msa_mask, pair_mask)
    mo, zo = mo * msa_mask[..., None], zo * pair_mask[..., None]
    ((mo * wm).sum() + (zo * wz).sum()).backward()
    pgrads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return torch.cat([mo.flatten(), zo.flatten()]).detach(), [x.grad for x in leaves], pgrads


@pytest.mark.parametrize("preset", ["bioformer", "evoformer"])
@pytest.mark.parametrize("ln_order", ["pre", "post"])
def test_block_matches_naive_reference(preset, ln_order):
    cfg = _cfg(preset=preset, ln_order=ln_order)
    block = randomize_parameters_(EvoformerBlock(cfg).to(D).eval())
    m, z, msa_mask, pair_mask = _inputs(cfg=cfg)

    class Ref(torch.nn.Module):  # ref function with the block's parameters
        def __init__(self):
            super().__init__()
            self.block = block

        def forward(self, m, z, msa_mask, pair_mask):
            return ref_evoformer_block(m, z, msa_mask, pair_mask, self.block)

    class Ours(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.block = block

        def forward(self, m, z, msa_mask, pair_mask):
            return self.block(m, z, msa_mask, pair_mask)

    ours = _stack_and_grads(Ours(), m, z, msa_mask, pair_mask)
    ref = _stack_and_grads(Ref(), m, z, msa_mask, pair_mask)
    assert_same(ours, ref)
    # every parameter of the enabled ops receives a gradient
    n_params = sum(1 for _ in block.parameters())
    assert len(ours[2]) == n_params


def test_pre_and_post_orders_differ_and_post_output_is_normalised():
    m, z, msa_mask, pair_mask = _inputs()
    outs = {}
    for order in ("pre", "post"):
        block = randomize_parameters_(
            EvoformerBlock(_cfg(preset="evoformer", ln_order=order)).to(D)
        )
        block.eval()
        with torch.no_grad():
            outs[order] = block(m, z, msa_mask, pair_mask)
    assert not torch.allclose(outs["pre"][1], outs["post"][1])
    # post-LN: the last op of each stream is a LayerNorm (before its affine transform, mean 0)
    block = EvoformerBlock(_cfg(preset="evoformer", ln_order="post")).to(D).eval()
    with torch.no_grad():
        mo, zo = block(m, z, msa_mask, pair_mask)
    torch.testing.assert_close(zo.mean(-1), torch.zeros_like(zo[..., 0]), atol=1e-10, rtol=0)
    torch.testing.assert_close(mo.mean(-1), torch.zeros_like(mo[..., 0]), atol=1e-10, rtol=0)


@pytest.mark.parametrize("preset", ["bioformer", "evoformer"])
def test_chunked_stack_equals_unchunked_in_training(preset):
    m, z, msa_mask, pair_mask = _inputs(r=7)
    results = []
    for chunk in (None, 2):
        stack = randomize_parameters_(
            EvoformerStack(_cfg(preset=preset, n_blocks=2, chunk_size=chunk)).to(D)
        )
        stack.train()  # dropout > 0: same seed, same masks (dropout lives outside the chunks)
        torch.manual_seed(1)
        results.append(_stack_and_grads(stack, m, z, msa_mask, pair_mask))
    assert_same(*results)


@pytest.mark.parametrize("blocks_per_ckpt", [1, 2])
def test_checkpointing_gives_the_same_gradients(blocks_per_ckpt):
    m, z, msa_mask, pair_mask = _inputs()
    results = []
    for ckpt in (None, blocks_per_ckpt):
        cfg = _cfg(preset="evoformer", n_blocks=3, blocks_per_ckpt=ckpt, chunk_size=3)
        stack = randomize_parameters_(EvoformerStack(cfg).to(D)).train()
        torch.manual_seed(2)  # dropout on: the checkpoint must replay the same masks
        results.append(_stack_and_grads(stack, m, z, msa_mask, pair_mask))
    assert_same(*results)


def test_op_switches_build_only_enabled_ops():
    block = EvoformerBlock(_cfg(preset="evoformer", tri_att_end=False, column_attention=False))
    assert block.tri_att_end is None and block.msa_column_attention is None
    assert block.tri_att_start is not None and block.pair_transition is not None
    bio = EvoformerBlock(_cfg(preset="bioformer", tri_mul_out=True))
    assert bio.tri_mul_out is not None and bio.tri_mul_in is None and bio.tri_att_start is None


def test_shared_dropout_masks():
    torch.manual_seed(0)
    x = torch.ones(2, 5, 6, 8)
    row = DropoutRowwise(0.5).train()(x)
    col = DropoutColumnwise(0.5).train()(x)
    assert torch.equal(row, row[:, :1].expand_as(row))  # same mask for every row (dim -3)
    assert torch.equal(col, col[:, :, :1].expand_as(col))  # same mask for every column (dim -2)
    assert set(row.unique().tolist()) == {0.0, 2.0}
    assert torch.equal(DropoutRowwise(0.5).eval()(x), x)


def test_every_op_has_a_profiler_range():
    cfg = _cfg(preset="evoformer")
    block = EvoformerBlock(cfg).to(D)
    m, z, msa_mask, pair_mask = _inputs(cfg=cfg)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        block(m, z, msa_mask, pair_mask)
    names = {e.name for e in prof.events()}
    expected = {
        "evoformer_block",
        "msa_row_attention",
        "msa_column_attention",
        "msa_transition",
        "outer_product_mean",
        "triangle_multiplication_outgoing",
        "triangle_multiplication_incoming",
        "triangle_attention_starting_node",
        "triangle_attention_ending_node",
        "pair_transition",
    }
    assert expected <= names
