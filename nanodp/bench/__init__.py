"""Benchmarks (GPU): `python -m nanodp.bench kernels|cluster|sparse|e2e` (nanodp/bench/__main__.py)."""
