"""Benchmarks of memsafe-dagster against its peers; run with ``python -m benchmarks.run``."""
