"""Efficiency accounting: the FLOPs and memory traffic of a training step, the devices' peaks.

Public API::

    count_step, StepCost, TrafficCounter    count.py   FLOPs (FlopCounterMode) and traffic of one
                                                       micro-batch, on fake tensors
    PEAKS, DevicePeak, device_peak           peaks.py   datasheet peaks of A100 / H100 / H200
    throughput_fields, THROUGHPUT_FIELDS     peaks.py   achieved TFLOP/s and share of the peak

``peaks`` imports no torch (the result tables read its field names); ``count`` does.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "count_step": "count",
    "StepCost": "count",
    "TrafficCounter": "count",
    "touched_bytes": "count",
    "PEAKS": "peaks",
    "DevicePeak": "peaks",
    "device_peak": "peaks",
    "lookup_device": "peaks",
    "throughput_fields": "peaks",
    "THROUGHPUT_FIELDS": "peaks",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)


__all__ = sorted(_WHERE)
