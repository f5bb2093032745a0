"""Traced (FakeTensorMode + MemTracker) and measured (CPU profiler) memory of a training step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools import mem_tracker

from evoformer.memory.emulation import cuda_emulation
from evoformer.memory.measured import live_bytes, measure_cpu_peak, measure_step
from evoformer.memory.naive import NaiveOuterProductMean, use_naive_opm
from evoformer.memory.spec import StepSpec
from evoformer.memory.traced import build_model, trace_step
from evoformer.model import ModelConfig
from evoformer.model.outer_product_mean import OuterProductMean

TINY = dict(
    c_m=32, c_z=16, c_opm=8, n_blocks=2, c_hidden_msa=8, c_hidden_pair=8, c_hidden_tri_mul=16
)


def tiny_spec(preset: str, **kw) -> StepSpec:
    model_keys = set(ModelConfig.__dataclass_fields__)
    model = {**TINY, "preset": preset, **{k: v for k, v in kw.items() if k in model_keys}}
    step = {"batch_size": 2, "seq_len": 47, "n_genes": 60, "n_bins": 11, "device": "cpu"}
    step.update({k: v for k, v in kw.items() if k not in model_keys})
    return StepSpec(model=ModelConfig(**model), **step)


@pytest.mark.parametrize(
    "kw",
    [
        {"preset": "bioformer"},
        {"preset": "evoformer"},
        {"preset": "evoformer", "chunk_size": 16, "blocks_per_ckpt": 1, "n_cells_per_msa": 2},
        {"preset": "bioformer", "opm": "naive", "ln_order": "post"},
    ],
)
def test_traced_equals_measured_on_cpu_within_10_percent(kw):
    spec = tiny_spec(**kw)
    traced = trace_step(spec)
    measured = measure_step(spec)
    assert measured.source == "profiler"
    assert abs(traced.peak_bytes / measured.peak_bytes - 1) < 0.10, (
        traced.peak_bytes,
        measured.peak_bytes,
    )
    # parameters + AdamW moments are part of both
    assert measured.baseline_bytes >= 3 * traced.by_category["parameters"]


def test_measure_cpu_peak_counts_allocations_and_baseline():
    keep = torch.zeros(1000)  # 4,000 bytes live before the step

    def step():
        a = torch.ones(250_000)  # 1,000,000 bytes
        b = torch.ones(125_000)  # + 500,000 while a is alive
        del a, b
        c = torch.ones(100_000)
        del c

    res = measure_cpu_peak(step, keep)
    assert res.baseline_bytes == 4000
    assert res.step_peak_bytes == 1_500_000
    assert res.peak_bytes == 1_504_000
    assert live_bytes(keep, [keep]) == 4000  # shared storages are counted once


def test_trace_is_fake_and_categorised():
    spec = tiny_spec("bioformer", device="cuda", precision="bf16", batch_size=64, seq_len=1023)
    res = trace_step(spec)  # ~tens of GiB on a GPU: nothing is allocated here
    assert res.peak_bytes > 8 * 2**30
    assert res.phase == "backward"
    cats = res.by_category
    with torch.device("meta"):
        n_tensors = len(list(build_model(spec).parameters()))
    # AdamW: two moments per parameter and one step counter per tensor (a 512-byte CUDA block)
    assert cats["optimizer"] == 2 * cats["parameters"] + 512 * n_tensors
    assert cats["activations"] > 0.5 * res.peak_bytes
    assert {"msa_row_attention", "outer_product_mean", "msa_transition"} <= set(res.by_op)
    # DDP adds one fp32 copy of the gradients
    ddp = trace_step(spec.replace(world_size=2, batch_size=2, seq_len=63))
    with torch.device("meta"):
        n_bytes = sum(4 * p.numel() for p in build_model(spec).parameters())
    assert ddp.by_category["ddp_buckets"] == n_bytes  # flat buckets: no per-tensor rounding
    assert ddp.peak_bytes == trace_step(spec.replace(batch_size=2, seq_len=63)).peak_bytes + n_bytes


def test_cuda_emulation_rounds_to_blocks_and_restores():
    orig = mem_tracker._WeakRefInfo._calculate_mem_consumed
    with FakeTensorMode(), cuda_emulation():
        x = torch.ones(3)
        info = mem_tracker._WeakRefInfo(
            x.untyped_storage().size(), 1, x.device, mem_tracker._MemRefType.ACT
        )
        assert info.mem_consumed == 512
    assert mem_tracker._WeakRefInfo._calculate_mem_consumed is orig


def test_cuda_emulation_autocast_policy_and_kernels():
    """CPU autocast + the emulation behave like CUDA autocast: matmuls and SDPA in bf16,
    softmax / layer_norm / sum of bf16 upcast to fp32; SDPA with a bias keeps a log-sum-exp."""
    seen = []

    class Spy(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with FakeTensorMode(), cuda_emulation(), torch.autocast("cpu", dtype=torch.bfloat16):
        x = torch.randn(4, 8, 32)
        w = torch.randn(16, 32)
        assert F.linear(x, w).dtype == torch.bfloat16
        h = x.bfloat16()
        assert torch.softmax(h, -1).dtype == torch.float32
        assert h.sum().dtype == torch.float32
        assert F.layer_norm(h, (32,)).dtype == torch.float32
        q = torch.randn(2, 4, 64, 32, requires_grad=True)
        bias = torch.randn(2, 4, 64, 64)
        with Spy():
            out = F.scaled_dot_product_attention(q, q, q, attn_mask=bias)
        assert out.dtype == torch.bfloat16
        assert any("_scaled_dot_product_efficient_attention" in s for s in seen)
        seen.clear()
        with Spy():
            F.scaled_dot_product_attention(q, q, q)
        assert any("_scaled_dot_product_flash_attention" in s for s in seen)
        seen.clear()
        strided = torch.randn(2, 64, 64, 4).movedim(-1, 1)  # a permuted pair bias
        with Spy():  # CUDA's fused kernels refuse a mask with a strided last dim
            F.scaled_dot_product_attention(q, q, q, attn_mask=strided)
        assert any("_safe_softmax" in s for s in seen)  # the math kernel's decomposition
        assert not any("efficient" in s for s in seen)
    with FakeTensorMode(), torch.autocast("cpu", dtype=torch.bfloat16):
        # plain CPU autocast keeps softmax in bf16: the difference the emulation corrects
        assert torch.softmax(torch.randn(4, 8).bfloat16(), -1).dtype == torch.bfloat16


def test_naive_outer_product_mean_equals_ours():
    torch.manual_seed(0)
    ours = OuterProductMean(c_m=12, c_z=6, c_hidden=4).double()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_()
    naive = NaiveOuterProductMean(12, 6, 4).double()
    naive.load_state_dict(ours.state_dict())
    m = torch.randn(2, 3, 7, 12, dtype=torch.float64)
    mask = (torch.rand(2, 3, 7) > 0.2).double()
    torch.testing.assert_close(naive(m, mask), ours(m, mask))
    spec = tiny_spec("bioformer")
    with torch.device("meta"):
        model = build_model(spec)
        assert use_naive_opm(model) == spec.model.n_blocks - 1
    assert (
        sum(isinstance(mod, NaiveOuterProductMean) for mod in model.modules())
        == spec.model.n_blocks - 1
    )
