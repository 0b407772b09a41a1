"""Streaming, writing and merging Parquet datasets in bounded memory; no Dagster imports.

Names are imported lazily (``from memsafe_dagster.datasets import X`` works for each).
"""

from __future__ import annotations

from memsafe_dagster._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "ChunkStream": "memsafe_dagster.datasets.stream",
    "ChunkStats": "memsafe_dagster.datasets.stream",
    "AdaptiveChunkSizer": "memsafe_dagster.datasets.adaptive",
    "process_in_chunks": "memsafe_dagster.datasets.chunks",
    "ChunkedParquetWriter": "memsafe_dagster.datasets.writer",
    "PyarrowDatasetIO": "memsafe_dagster.datasets.io",
    "TabularSource": "memsafe_dagster.datasets.source",
    "tabular_source": "memsafe_dagster.datasets.source",
    "is_tabular": "memsafe_dagster.datasets.source",
    "MergeResult": "memsafe_dagster.datasets.merge",
    "merge_dataset": "memsafe_dagster.datasets.merge",
    "merge_iceberg": "memsafe_dagster.datasets.iceberg",
    "DatasetTransaction": "memsafe_dagster.datasets.commit",
    "DatasetLockedError": "memsafe_dagster.datasets.commit",
    "CommitConflictError": "memsafe_dagster.datasets.commit",
    "RecoveryReport": "memsafe_dagster.datasets.commit",
    "recover": "memsafe_dagster.datasets.commit",
    "Snapshot": "memsafe_dagster.datasets.snapshot",
    "SnapshotError": "memsafe_dagster.datasets.snapshot",
}

__all__ = list(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
