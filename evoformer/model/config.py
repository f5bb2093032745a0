"""Model configuration: one dataclass, built from the plain ``model:`` dict of config.yaml.

Three presets choose which Evoformer operations run in every block:

* ``none`` (the ablation): no pair representation at all - no ``z``, no pair bias in the row
  attention, no outer product mean, no pair stack: a plain transformer over the gene tokens with
  the same width and depth, to measure what the pair representation earns;

* ``bioformer`` (the journal's model): MSA row attention with pair bias, MSA transition and the
  outer product mean into the pair representation ``z``; no column attention, no pair stack.
* ``evoformer`` (AlphaFold 2, supplement Alg. 6): all of the above plus MSA column attention,
  triangle multiplication (outgoing, incoming), triangle attention (starting, ending node) and
  the pair transition.

Each op switch defaults to its preset's value; an explicit ``True``/``False`` overrides it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from evoformer.errors import InputError

PRESETS: dict[str, dict[str, bool]] = {
    "none": {
        "column_attention": False,
        "tri_mul_out": False,
        "tri_mul_in": False,
        "tri_att_start": False,
        "tri_att_end": False,
        "pair_transition": False,
    },
    "bioformer": {
        "column_attention": False,
        "tri_mul_out": False,
        "tri_mul_in": False,
        "tri_att_start": False,
        "tri_att_end": False,
        "pair_transition": False,
    },
    "evoformer": {
        "column_attention": True,
        "tri_mul_out": True,
        "tri_mul_in": True,
        "tri_att_start": True,
        "tri_att_end": True,
        "pair_transition": True,
    },
}

OP_SWITCHES: tuple[str, ...] = tuple(PRESETS["evoformer"])
#: Op switches that update the pair representation (impossible without one).
PAIR_OPS: tuple[str, ...] = (
    "tri_mul_out",
    "tri_mul_in",
    "tri_att_start",
    "tri_att_end",
    "pair_transition",
)


@dataclass
class ModelConfig:
    """Hyper-parameters of BioFormer / the Evoformer stack (AF2 names where they exist).

    Attributes:
        preset: ``"none"``, ``"bioformer"`` or ``"evoformer"``; gives the defaults of the op
            switches (``none``: no pair representation, see the module docstring).
        c_m: MSA (per-token) channels, BioFormer's ``d_model``.
        c_z: pair channels.
        c_opm: hidden channels of the outer product mean (AF2 ``c``, 32).
        n_heads_msa, c_hidden_msa: heads and channels per head of the MSA attentions.
        n_heads_pair, c_hidden_pair: heads and channels per head of the triangle attentions.
        c_hidden_tri_mul: hidden channels of the triangle multiplicative updates.
        transition_n: expansion factor of the MSA and pair transitions.
        n_blocks: Evoformer blocks.
        ln_order: ``"pre"`` (AF2: ``x + op(LN(x))``) or ``"post"`` (``LN(x + op(x))``).
        dropout_msa: row-wise dropout after MSA row attention (AF2: 0.15).
        dropout_pair: row-/column-wise dropout after triangle ops (AF2: 0.25).
        value_encoder: ``"embedding"`` (table over bins) or ``"continuous"`` (MLP on the bin value,
            as BioFormer / scGPT).
        loss: ``"ce"`` (cross-entropy over bins) or ``"mse"`` (regression on the bin value).
        n_cells_per_msa: S, cells treated as one "MSA" sharing a pair representation (1: each cell
            has its own ``z``).
        chunk_size: rows per chunk for the outer product mean, triangle attention, triangle
            multiplication (channels) and pair transition; ``None`` = no chunking. Valid in
            training: the triangle ops' and the transition's chunks are recomputed in backward
            so only one chunk's intermediates live; the outer product mean's chunks keep only
            views of their inputs, so they need no recomputation.
        blocks_per_ckpt: blocks per activation checkpoint in training; ``None`` = off.
        offload_checkpoints: keep the checkpointed groups' inputs (``m`` and ``z``) in pinned
            host memory between forward and backward instead of on the GPU (needs
            ``blocks_per_ckpt``; a copy to the host and one back per group and step; no effect on
            a CPU run). The memory pre-flight counts that host memory.
        checkpoint_ops: also make every op (residual update) of a block its own activation
            checkpoint: the recomputation of a checkpointed group keeps only the streams between
            its ops (with ``blocks_per_ckpt``), or the forward keeps only those (without). Costs
            one more forward of every op in backward.
        column_attention, tri_mul_out, tri_mul_in, tri_att_start, tri_att_end, pair_transition:
            op switches; ``None`` = the preset's value.
    """

    preset: str = "bioformer"
    c_m: int = 128
    c_z: int = 128
    c_opm: int = 32
    n_heads_msa: int = 4
    c_hidden_msa: int = 32
    n_heads_pair: int = 4
    c_hidden_pair: int = 32
    c_hidden_tri_mul: int = 128
    transition_n: int = 4
    n_blocks: int = 8
    ln_order: str = "pre"
    dropout_msa: float = 0.15
    dropout_pair: float = 0.25
    value_encoder: str = "embedding"
    loss: str = "ce"
    n_cells_per_msa: int = 1
    chunk_size: int | None = None
    blocks_per_ckpt: int | None = None
    offload_checkpoints: bool = False
    checkpoint_ops: bool = False
    column_attention: bool | None = None
    tri_mul_out: bool | None = None
    tri_mul_in: bool | None = None
    tri_att_start: bool | None = None
    tri_att_end: bool | None = None
    pair_transition: bool | None = None

    def __post_init__(self) -> None:
        self._validate()
        for name in OP_SWITCHES:
            if getattr(self, name) is None:
                setattr(self, name, PRESETS[self.preset][name])

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        def bad(key: str, what: str) -> InputError:
            return InputError(f"model config key '{key}': {what}")

        choices = {
            "preset": tuple(PRESETS),
            "ln_order": ("pre", "post"),
            "value_encoder": ("embedding", "continuous"),
            "loss": ("ce", "mse"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise bad(key, f"got {getattr(self, key)!r}, expected one of {list(allowed)}")
        positive = (
            "c_m",
            "c_z",
            "c_opm",
            "n_heads_msa",
            "c_hidden_msa",
            "n_heads_pair",
            "c_hidden_pair",
            "c_hidden_tri_mul",
            "transition_n",
            "n_blocks",
            "n_cells_per_msa",
        )
        for key in positive:
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise bad(key, f"got {value!r}, expected a positive integer")
        for key in ("chunk_size", "blocks_per_ckpt"):
            value = getattr(self, key)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise bad(key, f"got {value!r}, expected a positive integer or null")
        for key in ("dropout_msa", "dropout_pair"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
                raise bad(key, f"got {value!r}, expected a number in [0, 1)")
        for key in ("offload_checkpoints", "checkpoint_ops"):
            if not isinstance(getattr(self, key), bool):
                raise bad(key, f"got {getattr(self, key)!r}, expected true or false")
        if self.offload_checkpoints and self.blocks_per_ckpt is None:
            raise bad("offload_checkpoints", "offloads checkpoint inputs: set blocks_per_ckpt")
        for key in OP_SWITCHES:
            value = getattr(self, key)
            if value is not None and not isinstance(value, bool):
                raise bad(key, f"got {value!r}, expected true, false or null")
        if self.preset == "none":
            on = [k for k in PAIR_OPS if getattr(self, k)]
            if on:
                raise bad(on[0], "is a pair update, but preset none has no pair representation")

    # ------------------------------------------------------------------ (de)serialisation
    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, where: str = "experiment.model") -> ModelConfig:
        """Build from a plain dict (config.yaml's ``model:`` section); an unknown key or a value
        of the wrong type raises InputError naming it."""
        from evoformer.typed import from_plain

        return from_plain(cls, d, where)

    def to_dict(self) -> dict[str, Any]:
        """Fully resolved config (op switches filled from the preset) as plain Python types.
        The memory switches that change no number (:data:`OFF_OMITTED`) are left out while off,
        so adding them changed no run's spec, config hash or Snakemake parameter (nothing
        retrains)."""
        d = dataclasses.asdict(self)
        for key in OFF_OMITTED:
            if not d[key]:
                del d[key]
        return d

    @property
    def uses_pair(self) -> bool:
        """False for preset ``none``: no pair representation ``z`` at all."""
        return self.preset != "none"

    @property
    def pair_stack(self) -> bool:
        """True when any triangle op or the pair transition is on."""
        return any(getattr(self, k) for k in PAIR_OPS)


#: ``ModelConfig`` switches that change memory, not numbers: left out of its plain dict when off.
OFF_OMITTED = ("offload_checkpoints", "checkpoint_ops")
