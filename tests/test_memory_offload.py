"""Offloaded checkpoints and per-op checkpoints in the memory estimates; the r = 2001 verdicts."""

from __future__ import annotations

import json

import pytest

from evoformer.memory.__main__ import main
from evoformer.memory.analytical import GIB, estimate
from evoformer.memory.preflight import WORKSPACE_MIB, preflight
from evoformer.memory.spec import (
    HVG2000,
    HVG2000_EVOFORMER_MICRO_BATCH,
    StepSpec,
    data_shape,
    spec_from_config,
)
from evoformer.memory.traced import trace_step
from evoformer.model import ModelConfig
from evoformer.model.checkpointing import pinned_bytes

SMALL = dict(
    c_m=64,
    c_z=32,
    c_opm=16,
    n_blocks=3,
    c_hidden_msa=16,
    c_hidden_pair=16,
    c_hidden_tri_mul=32,
    blocks_per_ckpt=1,
    chunk_size=16,
)
SWITCHES = {"offload_checkpoints": True, "checkpoint_ops": True}


def small(preset: str, **model) -> StepSpec:
    blocks = {"n_blocks": 2} if preset == "evoformer" else {}  # one block with a pair stack
    cfg = ModelConfig(preset=preset, **{**SMALL, **blocks, **model})
    return StepSpec(model=cfg, batch_size=2, seq_len=63, n_genes=100, n_bins=11, precision="bf16")


def test_pinned_bytes_is_the_next_power_of_two():
    assert [pinned_bytes(n) for n in (0, 1, 3, 512, 513)] == [0, 1, 4, 512, 1024]


@pytest.mark.parametrize("preset", ["bioformer", "evoformer"])
def test_offloading_moves_the_checkpoints_to_the_host_and_the_estimates_agree(preset):
    base, off = small(preset), small(preset, **SWITCHES)
    t_base, t_off = trace_step(base), trace_step(off)
    a_off = estimate(off)
    # the traced host memory is the closed form: one (pinned, power-of-two) copy of m and z
    # per checkpointed block
    r, e = off.r, 2
    per_block = pinned_bytes(2 * r * 64 * e) + pinned_bytes(2 * r * r * 32 * e)
    assert t_off.host_peak_bytes == a_off.host_bytes == off.model.n_blocks * per_block
    assert t_base.host_peak_bytes == estimate(base).host_bytes == 0
    assert t_off.peak_bytes < t_base.peak_bytes
    # the analytical model follows the traced one as closely as without the switches
    assert a_off.peak_bytes == pytest.approx(t_off.peak_bytes, rel=0.10)
    by_op = t_off.by_op["stack"]["kept"]  # device memory only: the host copies are not in it
    assert by_op < t_off.host_peak_bytes


def _hvg2000(preset: str, micro: int, **switches: bool) -> StepSpec:
    model = {**HVG2000["model"], "preset": preset, **switches}
    train = {**HVG2000["train"], "micro_batch_size": micro}
    return spec_from_config(model, train, data_shape(**HVG2000["data"]), n_gpus=1)


def _fits_80(spec: StepSpec) -> bool:
    room = int(80 * GIB * 0.9) - WORKSPACE_MIB * 2**20
    return estimate(spec).peak_bytes <= room


def test_r2001_verdicts_on_one_80_gib_gpu_analytical():
    """The pre-flight's verdicts at r = 2001 through the analytical model (which agrees with the
    trace within 5% there: BENCHMARKS.md; the traced ones are the slow test below)."""
    bio = _hvg2000("bioformer", HVG2000["train"]["micro_batch_size"])
    evo = _hvg2000("evoformer", HVG2000_EVOFORMER_MICRO_BATCH)
    assert bio.r == 2001 and bio.batch_size >= 16 and evo.batch_size >= 4
    assert _fits_80(bio) and _fits_80(evo)
    # without offloading and per-op checkpoints neither fits
    plain = {"offload_checkpoints": False, "checkpoint_ops": False}
    assert not _fits_80(_hvg2000("bioformer", 16, **plain))
    assert not _fits_80(_hvg2000("evoformer", 4, **plain))
    # pinned host memory per GPU: 8 blocks x (m + z), each rounded up to a power of two
    assert estimate(bio).host_bytes == 8 * (pinned_bytes(16 * 2001 * 128 * 2) + 16 * GIB)


def test_the_preflight_suggests_offloading_when_the_host_holds_it():
    from evoformer.memory.preflight import suggestions

    plain = {"offload_checkpoints": False, "checkpoint_ops": False}
    spec = _hvg2000("bioformer", 16, **plain)
    room = int(72 * GIB) - WORKSPACE_MIB * 2**20
    change = "offload_checkpoints + checkpoint_ops"
    assert change in [s["change"] for s in suggestions(spec, room, 1.0, int(230 * GIB))]
    assert change not in [s["change"] for s in suggestions(spec, room, 1.0, int(100 * GIB))]


def test_the_host_memory_is_part_of_the_verdict():
    model = {**SMALL, "preset": "bioformer", "n_blocks": 2, **SWITCHES}
    train = {"micro_batch_size": 2, "precision": "bf16"}
    shape = data_shape(31, 11)
    ok = preflight(model, train, shape, gpu_mem_gib=80, host_mem_gib=1)
    assert ok.fits and ok.host_bytes > 0 and "host memory" in ok.message()
    tiny = ok.host_bytes * 2 / GIB  # two processes need 2 x host_bytes > 0.9 x this
    low = preflight(
        model, train, shape, gpu_mem_gib=80, n_gpus=2, host_mem_gib=tiny, raise_on_oom=False
    )
    assert not low.fits and "memory.host_mem_gib" in low.message() and "(too much)" in low.message()
    assert low.largest_fitting_micro_batch == 1  # half the micro-batch: half the host memory
    with pytest.raises(Exception, match="memory.host_mem_gib"):
        preflight(model, train, shape, gpu_mem_gib=80, host_mem_gib=0)
    plain = preflight({**model, "offload_checkpoints": False}, train, shape, 80, host_mem_gib=1e-9)
    assert plain.fits and plain.host_bytes == 0 and "host memory" not in plain.message()


def test_cli_switches_and_host_flag(capsys):
    args = ["--L", "31", "--B", "2", "--c-m", "32", "--c-z", "16", "--c-opm", "8", "--blocks", "2"]
    args += ["--ckpt", "1", "--precision", "bf16", "--offload", "--checkpoint-ops"]
    assert main([*args, "--method", "analytical", "--host-mem-gib", "1", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["analytical"]["host_bytes"] > 0
    assert res["analytical"]["spec"]["model"]["offload_checkpoints"] is True
    assert res["analytical"]["spec"]["model"]["checkpoint_ops"] is True
    assert main([*args, "--method", "analytical", "--host-mem-gib", "1e-6"]) == 1
    assert "host" in capsys.readouterr().out


@pytest.mark.slow
def test_r2001_verdicts_traced_as_the_preflight_does():
    """``python -m evoformer.memory --preset P --L 2000 --B b ... --offload --checkpoint-ops``
    (bioformer B 16, evoformer B 4) on one 80 GiB GPU; a few minutes on one CPU core."""
    for preset, micro in (("bioformer", 16), ("evoformer", HVG2000_EVOFORMER_MICRO_BATCH)):
        model = {**HVG2000["model"], "preset": preset}
        train = {**HVG2000["train"], "micro_batch_size": micro}
        pf = preflight(model, train, data_shape(**HVG2000["data"]), 80, host_mem_gib=256)
        assert pf.fits and pf.micro_batch_size == micro, pf.message()
        assert pf.analytical_peak_bytes == pytest.approx(pf.predicted_peak_bytes, rel=0.10)
        assert pf.host_bytes == estimate(_hvg2000(preset, micro)).host_bytes


def test_the_memory_report_shows_the_host_memory(tmp_path):
    from evoformer.memory.preflight import write_preflight
    from evoformer.memory.report import report

    model = {**SMALL, "preset": "bioformer", "n_blocks": 2, **SWITCHES}
    train = {"micro_batch_size": 2, "precision": "bf16"}
    pf = tmp_path / "preflight.json"
    write_preflight(pf, model, train, data_shape(31, 11), 80, n_gpus=2, host_mem_gib=4)
    row = report(pf, None, tmp_path / "r.md", tmp_path / "r.png", experiment="x")
    assert row["host_traced_bytes"] == row["host_analytical_bytes"] > 0
    md = (tmp_path / "r.md").read_text()
    assert "Host memory (pinned checkpoint inputs" in md and "memory.host_mem_gib" in md
