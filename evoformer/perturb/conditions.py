"""The canonical spelling of a perturbation condition, shared by every perturbation module.

* control cells: ``ctrl`` (:data:`CONTROL`);
* perturbed cells: the perturbed genes, sorted, joined by ``+`` (:data:`SEP`): ``A``, ``A+B``.

The layouts of public data (GEARS ``A+ctrl``, scPerturb ``A_B``, ...) are parsed into this
spelling at the boundary; nothing downstream sees another.
"""

from __future__ import annotations

from collections.abc import Iterable

from evoformer.errors import InputError

#: Perturbation types, canonical names (the layouts map their labels to these).
TYPES = ("knockdown", "knockout", "activation")

CONTROL = "ctrl"
SEP = "+"


def make_condition(genes: Iterable[str]) -> str:
    """The canonical condition of a set of perturbed genes (empty: control).

    >>> make_condition(["B", "A"])
    'A+B'
    """
    genes = sorted(set(genes))
    for g in genes:
        if not g or SEP in g or g == CONTROL:
            raise InputError(f"perturbed gene {g!r}: empty, contains {SEP!r} or is {CONTROL!r}")
    return SEP.join(genes) if genes else CONTROL


def condition_genes(condition: str) -> tuple[str, ...]:
    """The perturbed genes of a canonical condition (``()`` for control)."""
    if condition == CONTROL:
        return ()
    return tuple(condition.split(SEP))


def is_control(condition: str) -> bool:
    return condition == CONTROL


def n_perturbed(condition: str) -> int:
    """0 for control, 1 for a single, 2 for a double, ..."""
    return len(condition_genes(condition))
