"""The sizes of every item: the GPU run's (the journal's step among them) and the CPU dry run's."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class StepConfig:
    """One training step's configuration: model keys (``ModelConfig``), data and batch.

    ``n_hvg`` genes per cell (every gene a token: ``L = n_hvg``, ``r = L + 1``), ``n_bins`` bins,
    ``micro_batch`` MSAs of ``S = n_cells_per_msa`` cells per step, ``precision`` bf16 / fp32.
    """

    name: str
    model: dict[str, Any]
    n_hvg: int
    n_bins: int
    micro_batch: int
    precision: str

    def describe(self) -> str:
        m = self.model
        extra = []
        if m.get("chunk_size"):
            extra.append(f"chunk {m['chunk_size']}")
        if m.get("blocks_per_ckpt"):
            extra.append(f"ckpt {m['blocks_per_ckpt']}")
        if m.get("offload_checkpoints"):
            extra.append("offloaded")
        if m.get("checkpoint_ops"):
            extra.append("per-op ckpt")
        return (
            f"{m['preset']} r={self.n_hvg + 1} c_m={m['c_m']} c_z={m['c_z']} c_opm={m['c_opm']} "
            f"blocks={m['n_blocks']} B={self.micro_batch} {self.precision}"
            + (" " + " ".join(extra) if extra else "")
        )


@dataclass(frozen=True)
class Sizes:
    """Everything whose size differs between the GPU run and the CPU dry run."""

    journal: StepConfig
    pair_stack: StepConfig
    smoke_model: dict[str, Any]
    smoke_cells: int
    smoke_genes: int
    smoke_micro: int
    smoke_global: int
    smoke_steps: int
    throughput_steps: int
    throughput_target_s: float
    ddp_timeout_s: int
    r2001: StepConfig  # offloaded and per-op checkpoints (item memory_r2001)
    #: ``train.compile`` modes the ``compile`` item times (the first is the baseline)
    compile_modes: tuple[str, ...] = ("eager", "fused", "blocks", "model")


def journal_step() -> StepConfig:
    """The journal's step, :data:`evoformer.memory.spec.JOURNAL` (its only spelling)."""
    from evoformer.memory.spec import JOURNAL

    return StepConfig(
        name="journal",
        model=dict(JOURNAL["model"]),
        n_hvg=JOURNAL["data"]["n_hvg"],
        n_bins=JOURNAL["data"]["n_bins"],
        micro_batch=JOURNAL["train"]["micro_batch_size"],
        precision=JOURNAL["train"]["precision"],
    )


def hvg2000_step(micro_batch: int) -> StepConfig:
    """:data:`evoformer.memory.spec.HVG2000` (r = 2001, checkpoints offloaded to pinned host
    memory, per-op checkpoints) at ``micro_batch``: the GPU machine's 128 GiB of host memory
    holds the 32 GiB the step pins at micro-batch 4, not the 128 GiB of the configured 16."""
    from evoformer.memory.spec import HVG2000

    return StepConfig(
        name="r2001",
        model=dict(HVG2000["model"]),
        n_hvg=HVG2000["data"]["n_hvg"],
        n_bins=HVG2000["data"]["n_bins"],
        micro_batch=micro_batch,
        precision=HVG2000["train"]["precision"],
    )


def gpu_sizes() -> Sizes:
    journal = journal_step()
    pair = StepConfig(
        name="pair_stack",
        model={
            "preset": "evoformer",
            "c_m": 64,
            "c_z": 64,
            "c_opm": 32,
            "n_heads_msa": 4,
            "c_hidden_msa": 16,
            "n_heads_pair": 4,
            "c_hidden_pair": 16,
            "c_hidden_tri_mul": 64,
            "n_blocks": 4,
            "chunk_size": 32,
            "blocks_per_ckpt": 1,
        },
        n_hvg=128,
        n_bins=51,
        micro_batch=4,
        precision="bf16",
    )
    smoke = {"preset": "bioformer", "c_m": 64, "c_z": 32, "c_opm": 16, "n_blocks": 2}
    r2001 = hvg2000_step(4)
    return Sizes(journal, pair, smoke, 512, 127, 16, 16, 20, 10, 15.0, 300, r2001)


def cpu_sizes() -> Sizes:
    journal = StepConfig(
        name="journal",
        model={
            "preset": "bioformer",
            "c_m": 32,
            "n_heads_msa": 2,
            "c_hidden_msa": 16,
            "c_z": 16,
            "c_opm": 8,
            "n_blocks": 2,
            "blocks_per_ckpt": 1,
        },
        n_hvg=31,
        n_bins=11,
        micro_batch=4,
        precision="fp32",
    )
    pair = StepConfig(
        name="pair_stack",
        model={
            "preset": "evoformer",
            "c_m": 16,
            "c_z": 16,
            "c_opm": 8,
            "n_heads_msa": 2,
            "c_hidden_msa": 8,
            "n_heads_pair": 2,
            "c_hidden_pair": 8,
            "c_hidden_tri_mul": 16,
            "n_blocks": 2,
            "chunk_size": 8,
            "blocks_per_ckpt": 1,
        },
        n_hvg=15,
        n_bins=11,
        micro_batch=2,
        precision="fp32",
    )
    smoke = {"preset": "bioformer", "c_m": 16, "c_z": 8, "c_opm": 4, "n_blocks": 1}
    r2001 = StepConfig(
        name="r2001",
        model={
            **journal.model,
            "chunk_size": 8,
            "offload_checkpoints": True,
            "checkpoint_ops": True,
        },
        n_hvg=31,
        n_bins=11,
        micro_batch=2,
        precision="fp32",
    )
    # no compiled mode in the dry run: a cold inductor compile takes minutes on a loaded CPU
    # (tests/test_model_fused.py checks a compiled block against eager)
    return Sizes(journal, pair, smoke, 96, 15, 4, 8, 3, 3, 2.0, 240, r2001, ("eager", "fused"))
