"""Efficiency accounting (evoformer.flops): FLOPs of a hand-counted model, scaling with the cells,
the recompute under checkpointing, the traffic rules, the peak table and the achieved figures."""

from __future__ import annotations

import functools

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from evoformer.errors import InputError
from evoformer.flops.count import StepCost, TrafficCounter, count_step
from evoformer.flops.peaks import THROUGHPUT_FIELDS, device_peak, lookup_device, throughput_fields
from evoformer.memory.spec import StepSpec
from evoformer.model import ModelConfig

# a model small enough to count by hand: B micro-batch, r = L + 1 tokens, K bins
B, L, K = 3, 9, 7
R = L + 1
C_M, H, D, N_T, C_Z, C = 8, 2, 4, 4, 6, 3


def spec(preset: str, ckpt: int | None, batch: int = B, **kw) -> StepSpec:
    model = ModelConfig(
        preset=preset,
        c_m=C_M,
        n_heads_msa=H,
        c_hidden_msa=D,
        c_z=C_Z,
        c_opm=C,
        n_blocks=2,
        transition_n=N_T,
        blocks_per_ckpt=ckpt,
    )
    return StepSpec(model=model, batch_size=batch, seq_len=L, n_genes=20, n_bins=K, **kw)


@functools.cache
def counted(
    preset: str,
    ckpt: int | None,
    batch: int = B,
    device: str = "cpu",
    precision: str = "fp32",
    traffic: bool = False,
) -> StepCost:
    """``count_step`` of :func:`spec`, once per argument set (each count is a fake step)."""
    return count_step(
        spec(preset, ckpt, batch, device=device, precision=precision), traffic=traffic
    )


def hand_count(preset: str) -> tuple[int, int, int]:
    """(forward, forward of the two blocks, one block's transition linear_2) by hand:
    a matmul [m, k] x [k, n] is 2 m k n FLOPs; per cell, S = 1."""
    hc = H * D
    row_attention = (
        4 * 2 * B * R * C_M * hc  # q, k, v, gate
        + 2 * 2 * B * H * R * R * D  # q k^T and p v
        + 2 * B * R * hc * C_M  # output
    )
    linear_2 = 2 * B * R * (N_T * C_M) * C_M
    transition = 2 * B * R * C_M * (N_T * C_M) + linear_2
    heads = 2 * B * L * C_M * C_M + 2 * B * L * C_M * K  # value head: two Linears on the genes
    blocks = 2 * (row_attention + transition)
    embed = 0
    if preset == "bioformer":
        embed = 2 * 2 * B * R * C_M * C_Z  # pair_left, pair_right
        blocks += 2 * 2 * B * R * R * C_Z * H  # pair bias, both blocks
        # outer product mean, first block only (the last has no pair update): linear_a/b,
        # Q = b W, a Q (the mask count n_ij is a product, not a matmul, with S = 1)
        blocks += 2 * 2 * B * R * C_M * C + 2 * B * R * C * C * C_Z + 2 * B * R * C * R * C_Z
    return embed + blocks + heads, blocks, linear_2


@pytest.mark.parametrize("preset", ["none", "bioformer"])
def test_flops_equal_the_hand_count(preset: str) -> None:
    forward, blocks, last_linear_2 = hand_count(preset)
    plain = counted(preset, None)
    assert plain.forward_flops == forward
    # every matmul's operands require grad: backward = 2 x forward
    assert plain.model_flops == plain.hardware_flops == 3 * forward
    assert not plain.recompute_counted
    ckpt = counted(preset, 1)
    assert ckpt.recompute_counted and ckpt.model_flops == 3 * forward
    # the recompute of every block (one checkpoint each) up to the last tensor backward needs:
    # non-reentrant checkpointing stops there, so a block ending with the MSA transition never
    # recomputes its linear_2 (preset none: both blocks; bioformer: the last one, the first
    # ends with the outer product mean, whose normalisation saves a tensor made after its matmul)
    skipped = 2 * last_linear_2 if preset == "none" else last_linear_2
    assert ckpt.hardware_flops - ckpt.model_flops == blocks - skipped
    assert ckpt.model_flops_per_sample == 3 * forward / B


def test_flops_scale_with_the_cells_and_the_gpu_kernels_add_the_attention_recompute() -> None:
    one, two = counted("bioformer", 1), counted("bioformer", 1, batch=2 * B)
    for key in ("forward_flops", "model_flops", "hardware_flops"):
        assert getattr(two, key) == 2 * getattr(one, key)
    assert two.model_flops_per_sample == one.model_flops_per_sample
    # on a GPU the fused attention backward recomputes q k^T: + 2 B H r^2 d per attention
    gpu, cpu = counted("bioformer", None, device="cuda"), counted("bioformer", None)
    assert gpu.forward_flops == cpu.forward_flops
    assert gpu.model_flops - cpu.model_flops == 2 * (2 * B * H * R * R * D)


def test_chunked_recompute_is_executed_not_model_flops() -> None:
    """Chunks recomputed in backward (the triangle ops, the transitions) cost executed FLOPs
    only; the forward and the model FLOPs do not depend on the chunking."""
    base = dict(c_m=8, c_z=6, c_opm=3, n_blocks=2, c_hidden_msa=4, c_hidden_pair=4)
    base.update(c_hidden_tri_mul=4, n_heads_pair=2)

    def evoformer(chunk: int | None) -> StepCost:
        model = ModelConfig(preset="evoformer", chunk_size=chunk, **base)
        return count_step(StepSpec(model=model, batch_size=2, seq_len=L, n_genes=20, n_bins=K))

    plain, chunked = evoformer(None), evoformer(4)
    assert chunked.forward_flops == plain.forward_flops
    assert chunked.model_flops == plain.model_flops == plain.hardware_flops
    assert chunked.recompute_counted and chunked.hardware_flops > chunked.model_flops


def test_traffic_counts_reads_and_writes_not_views() -> None:
    with FakeTensorMode():
        x = torch.zeros(4, 6)  # 96 bytes
        b = torch.zeros(6)
        z = torch.zeros(2, 3, 3, 5)  # r = 3: an r x r tensor, 360 bytes
        with TrafficCounter(r=3) as t:
            _ = x.view(24).t()  # views move nothing
        assert t.total_bytes == 0
        with TrafficCounter(r=3) as t:
            _ = x + 1  # read 96, write 96
        assert t.total_bytes == 192 and t.pair_bytes == 0
        with TrafficCounter(r=3) as t:
            _ = x + b.expand(4, 6)  # the broadcast bias is read once: 96 + 24 + 96
        assert t.total_bytes == 216
        with TrafficCounter(r=3) as t:
            x.add_(x)  # in place: x read once, written once
        assert t.total_bytes == 192
        with TrafficCounter(r=3) as t:
            _ = x.t().contiguous()  # a real copy
            _ = z.to(torch.bfloat16)  # read 360 fp32, write 180 bf16: all pair
        assert t.total_bytes == 192 + 540 and t.pair_bytes == 540


def test_step_traffic_follows_the_precision() -> None:
    fp32 = counted("bioformer", None, device="cuda", traffic=True)
    bf16 = counted("bioformer", None, device="cuda", precision="bf16", traffic=True)
    assert fp32.traffic_bytes and bf16.traffic_bytes
    assert bf16.traffic_bytes < 0.8 * fp32.traffic_bytes
    assert 0 < bf16.pair_traffic_bytes < bf16.traffic_bytes
    assert bf16.arithmetic_intensity == bf16.hardware_flops / bf16.traffic_bytes
    # the precision moves bytes, not FLOPs (the backward may differ: with d = 4 a GPU has no
    # fused bf16 attention kernel and falls back to the math path)
    assert bf16.forward_flops == fp32.forward_flops
    assert counted("bioformer", None).traffic_bytes is None


def test_peak_table_and_override() -> None:
    assert device_peak("NVIDIA H100 80GB HBM3", "bf16")[0] == 989.5  # the SXM part
    assert device_peak("NVIDIA H100 80GB HBM3", "fp32")[0] == 67.0
    assert device_peak("NVIDIA H100 PCIe", "bf16")[0] == 756.5
    assert device_peak("NVIDIA H200", "bf16")[0] == 989.5
    assert device_peak("NVIDIA H200 NVL", "bf16")[0] == 835.5
    peak, source = device_peak("NVIDIA A100-SXM4-80GB", "fp32")
    assert peak == 19.5 and "A100" in source and "datasheet" in source
    assert lookup_device("NVIDIA A100-SXM4-40GB").hbm_tb_per_s == 1.555
    for name in ("cpu", "NVIDIA GH200 480GB", "NVIDIA L40S", None):
        assert device_peak(name, "bf16") == (None, None)
    assert device_peak("cpu", "fp32", 2.5) == (2.5, "train.peak_tflops")
    assert device_peak("NVIDIA H200", "bf16", 500) == (500.0, "train.peak_tflops")
    with pytest.raises(InputError, match="train.peak_tflops"):
        device_peak("cpu", "fp32", 0)


def test_throughput_fields_are_consistent() -> None:
    cost = StepCost(
        batch_size=4,
        forward_flops=4 * 10**9,
        model_flops=12 * 10**9,
        hardware_flops=16 * 10**9,
        traffic_bytes=None,
        pair_traffic_bytes=None,
        recompute_counted=True,
        device="cuda",
        precision="bf16",
    )
    out = throughput_fields(cost, 250.0, 2, 100.0, "x")
    assert tuple(out) == THROUGHPUT_FIELDS
    assert out["model_flops_per_sample"] == 3e9 and out["hardware_flops_per_sample"] == 4e9
    assert out["model_tflops_per_s"] == pytest.approx(3e9 * 250 / 1e12)
    assert out["hardware_tflops_per_s"] == pytest.approx(4e9 * 250 / 1e12)
    assert out["model_flops_utilization"] == pytest.approx(0.75 / 200)
    assert out["hardware_flops_utilization"] == pytest.approx(1.0 / 200)
    no_peak = throughput_fields(cost, 250.0, 2, None, None)
    assert no_peak["model_tflops_per_s"] == pytest.approx(0.75)
    assert no_peak["model_flops_utilization"] is None and no_peak["peak_tflops_source"] is None
    none = throughput_fields(None, 250.0, 2, 100.0, "x")
    assert none["model_tflops_per_s"] is None and none["peak_tflops_per_device"] == 100.0
