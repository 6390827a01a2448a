"""Benchmarks: each a script (`python benchmark/x.py` or `python -m benchmark.x`), importable by the tests."""
