"""evoformer: memory-efficient Evoformer operations and the BioFormer single-cell model.

Subpackages:
    evoformer.data    preprocessing stages (datasets, HVG selection, binning, splitting)
    evoformer.model   one module per Evoformer operation, the stack, and BioFormer
    evoformer.memory  analytical / traced / measured memory estimates and the pre-flight
"""

__version__ = "0.1.0"
