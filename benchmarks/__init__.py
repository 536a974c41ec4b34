"""Benchmarks: `python -m benchmarks.NAME` from the repository root (results in BENCHMARKS.md)."""
