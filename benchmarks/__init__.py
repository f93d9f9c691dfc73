"""Benchmarks and profilers, beside the product: ``python -m benchmarks.bench``, ``benchmarks.stepcost``."""
