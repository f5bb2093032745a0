"""Memory of a training step: analytical, traced and measured estimates, pre-flight, reports.

Public API::

    journal_rows, journal_table_markdown   analytical.py  the journal's table, recomputed
    estimate                               analytical.py  closed-form peak of a step, per op
    trace_step                             traced.py      FakeTensorMode + MemTracker peak
    measure_cpu_peak, measure_cuda_peak    measured.py    real peak of a step (CPU / GPU)
    measure_step                           measured.py    build and measure a step for real
    record_cpu_peak                        measured.py    the same as a context manager
    preflight, PreflightResult             preflight.py   does it fit? (raises InputError if not)
    report, memory_table                   report.py      per-experiment report, summary table
    StepSpec, spec_from_config, data_shape spec.py        what one step on one device looks like

Command line: ``python -m evoformer.memory --help``.
"""

from evoformer.memory.analytical import estimate, journal_rows, journal_table_markdown
from evoformer.memory.measured import (
    measure_cpu_peak,
    measure_cuda_peak,
    measure_step,
    record_cpu_peak,
)
from evoformer.memory.preflight import PreflightResult, preflight
from evoformer.memory.report import memory_table, memory_table_from_json, report
from evoformer.memory.spec import StepSpec, data_shape, data_shape_from_meta, spec_from_config
from evoformer.memory.traced import trace_step

__all__ = [
    "PreflightResult",
    "StepSpec",
    "data_shape",
    "data_shape_from_meta",
    "estimate",
    "journal_rows",
    "journal_table_markdown",
    "measure_cpu_peak",
    "measure_cuda_peak",
    "measure_step",
    "memory_table",
    "memory_table_from_json",
    "preflight",
    "record_cpu_peak",
    "report",
    "spec_from_config",
    "trace_step",
]
