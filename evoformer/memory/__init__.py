"""Memory of a training step: analytical, traced and measured estimates, pre-flight, reports.

Public API::

    journal_rows, journal_table_markdown   analytical.py  the journal's table, recomputed
    estimate                               analytical.py  closed-form peak of a step, per op
    trace_step                             traced.py      FakeTensorMode + MemTracker peak
    measure_cpu_peak, measure_cuda_peak    measured.py    real peak of a step (CPU / GPU)
    measure_step                           measured.py    build and measure a step for real
    record_cpu_peak                        measured.py    the same as a context manager
    preflight, PreflightResult             preflight.py   does it fit? (raises InputError if not)
    WORKSPACE_MIB                          preflight.py   default workspace allowance (GPU)
    HOST_MEM_GIB                           preflight.py   default host memory of a node (offload)
    report, memory_table                   report.py      per-experiment report, summary table
    StepSpec, spec_from_config, data_shape spec.py        what one step on one device looks like

Command line: ``python -m evoformer.memory --help``.
"""

from __future__ import annotations

import importlib
from typing import Any

# Imported on first use (PEP 562): the traced estimate pulls in torch.distributed._tools
# (~1.5 s), which the trainer, importing only ``measured``, should not pay at every start.
_WHERE = {
    "estimate": "analytical",
    "journal_rows": "analytical",
    "journal_table_markdown": "analytical",
    "measure_cpu_peak": "measured",
    "measure_cuda_peak": "measured",
    "measure_step": "measured",
    "record_cpu_peak": "measured",
    "PreflightResult": "preflight",
    "WORKSPACE_MIB": "preflight",
    "HOST_MEM_GIB": "preflight",
    "preflight": "preflight",
    "memory_table": "report",
    "memory_table_from_json": "report",
    "report": "report",
    "StepSpec": "spec",
    "data_shape": "spec",
    "data_shape_from_meta": "spec",
    "spec_from_config": "spec",
    "trace_step": "traced",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)


__all__ = sorted(_WHERE)
