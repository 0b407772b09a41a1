"""Bounded-memory, crash-safe merges of a source into a Parquet dataset by key columns.

``merge_dataset`` is the engine behind ``PyarrowDatasetIO.merge``; ``MergeResult`` reports what
it did. See ``engine`` for the phases and ``options.MergeOptions`` for the tuning options.
"""

from __future__ import annotations

from memsafe_dagster.datasets.merge.api import merge_dataset
from memsafe_dagster.datasets.merge.index import DuplicateKeyError
from memsafe_dagster.datasets.merge.options import MergeOptions
from memsafe_dagster.datasets.merge.result import MergeResult
from memsafe_dagster.datasets.merge.strategy import STRATEGIES

__all__ = ["STRATEGIES", "DuplicateKeyError", "MergeOptions", "MergeResult", "merge_dataset"]
