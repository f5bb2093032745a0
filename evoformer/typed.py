"""Build a settings dataclass from a plain config dict, checking every key's type once.

``from_plain(TrainConfig, {"lr": "1e-3", ...}, "experiment.train")`` returns a ``TrainConfig`` or
raises :class:`~evoformer.errors.InputError` with one line naming the key (``experiment.train.lr``)
and what is wrong. Rules:

* an unknown key is an error (the message lists the known ones);
* ``int`` fields take integers (not booleans, not ``3.0``, not ``"3"``);
* ``float`` fields take integers and floats, and numeric strings such as ``"1e-3"``: PyYAML reads
  ``1e-3`` (no dot) as a string, a trap every user falls into once;
* ``bool`` fields take ``true``/``false`` only (the string ``"false"`` would otherwise be truthy);
* ``str`` fields take strings; ``X | None`` fields also take null;
* a nested dataclass field takes a mapping, checked the same way.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any, TypeVar

from evoformer.errors import InputError

T = TypeVar("T")
_FLOAT_TEXT = re.compile(r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$")


def from_plain(cls: type[T], d: dict[str, Any] | None, where: str) -> T:
    """``cls(**d)`` with every key checked and coerced (see the module docstring)."""
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise InputError(f"config key '{where}': expected a mapping, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    for key, value in d.items():
        if key not in fields:
            raise InputError(
                f"config key '{where}.{key}' is unknown (known: {', '.join(sorted(fields))})"
            )
        kwargs[key] = coerce(hints[key], value, f"{where}.{key}")
    return cls(**kwargs)


def coerce(tp: Any, value: Any, key: str) -> Any:
    """``value`` as type ``tp`` (int, float, bool, str, Optional, Literal, a dataclass)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(arg, value, key)
            except InputError as e:
                errors.append(str(e))
        raise InputError(errors[0] + (" or null" if type(None) in args else ""))
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise InputError(
                f"config key '{key}': got {value!r}, expected one of {', '.join(map(str, allowed))}"
            )
        return value
    if dataclasses.is_dataclass(tp):
        return from_plain(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise InputError(f"config key '{key}': got {value!r}, expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"config key '{key}': got {value!r}, expected an integer")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT_TEXT.match(value):
            return float(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InputError(f"config key '{key}': got {value!r}, expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise InputError(f"config key '{key}': got {value!r}, expected a string")
        return value
    return value
