"""Benchmarks (``make bench``): not collected by pytest, run as ``python -m tests.bench.<name>``."""
