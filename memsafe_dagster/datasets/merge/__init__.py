"""Bounded-memory, crash-safe merges of a source into a Parquet dataset by key columns.

``merge_dataset`` is the engine behind ``PyarrowDatasetIO.merge``; ``MergeResult`` reports what
it did; ``MergeRequest`` is one merge's parameters, validated once. See ``engine`` for the
phases, ``strategy`` for the table they follow and ``options.MergeOptions`` for the tuning
options. Names are imported lazily, so a caller that needs only ``STRATEGIES`` (the CLI's
parser) does not load the engine.
"""

from __future__ import annotations

from memsafe_dagster._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "STRATEGIES": "memsafe_dagster.datasets.merge.strategy",
    "RULES": "memsafe_dagster.datasets.merge.strategy",
    "DuplicateKeyError": "memsafe_dagster.datasets.merge.index",
    "MergeOptions": "memsafe_dagster.datasets.merge.options",
    "MergeRequest": "memsafe_dagster.datasets.merge.request",
    "MergeResult": "memsafe_dagster.datasets.merge.result",
    "merge_dataset": "memsafe_dagster.datasets.merge.api",
    "run_merge": "memsafe_dagster.datasets.merge.engine",
}

__all__ = list(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
