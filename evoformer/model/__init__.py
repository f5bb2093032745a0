"""Memory-efficient Evoformer operations (one module each) and the BioFormer single-cell model.

Public API::

    ModelConfig            config.py      hyper-parameters, presets "bioformer" / "evoformer"
    BioFormer              bioformer.py   the single-cell model (forward, loss)
    apply_value_mask       masking.py     choose masked positions for the value loss
    fixed_mask             masking.py     the held-out (validation / test) mask
    count_parameters       bioformer.py   parameters per component
    load_prior_network     prior.py       gene-gene prior network TSV -> [G, G]; how it enters
                                          the model (PRIOR_MODES: init, bias, both)

Operations: msa_row_attention, msa_column_attention, transitions, outer_product_mean,
triangle_multiplication, triangle_attention (evoformer.py: EvoformerBlock, EvoformerStack).
"""

from evoformer.model.bioformer import BioFormer, count_parameters, metrics_to_floats
from evoformer.model.config import ModelConfig
from evoformer.model.evoformer import EvoformerBlock, EvoformerStack
from evoformer.model.masking import apply_value_mask, fixed_mask, mask_generator
from evoformer.model.prior import load_prior_network

__all__ = [
    "BioFormer",
    "EvoformerBlock",
    "EvoformerStack",
    "ModelConfig",
    "apply_value_mask",
    "fixed_mask",
    "mask_generator",
    "count_parameters",
    "load_prior_network",
    "metrics_to_floats",
]
