"""Upsert contenders, each runnable as ``python -m benchmarks.contenders.<name>``."""
