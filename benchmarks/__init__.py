"""Benchmarks and the one-shot GPU check (``python -m benchmarks.gpu_check``); run from the
repository root."""
