"""Genetic-perturbation (Perturb-seq) data, splits, metrics and baselines.

One spelling of a condition everywhere (:mod:`evoformer.perturb.conditions`): ``ctrl`` for
control cells, otherwise the perturbed genes sorted and joined by ``+`` (``A``, ``A+B``).
"""
