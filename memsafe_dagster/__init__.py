"""memsafe-dagster: Dagster asset runs that move Parquet data inside their memory budget.

Names are imported lazily so ``memsafe status`` and the core layers start without importing
Dagster; ``from memsafe_dagster import X`` works for every public name below. This package is
also the ``dagster_dg_cli.registry_modules`` entry point: ``dg`` lists the components it
exports as ``memsafe_dagster.MergeComponent`` and ``memsafe_dagster.MemoryResourceComponent``.
"""

from __future__ import annotations

from memsafe_dagster._lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    # memory
    "MemoryMonitor": "memsafe_dagster.memory",
    "MemoryPressureLevel": "memsafe_dagster.memory",
    "MemoryPressureError": "memsafe_dagster.memory",
    "MemoryLimits": "memsafe_dagster.memory",
    "MemorySampler": "memsafe_dagster.memory",
    "detect_memory_limits": "memsafe_dagster.memory",
    "parse_memory_size": "memsafe_dagster.memory",
    "psutil": "memsafe_dagster.memory",
    # datasets
    "ChunkStream": "memsafe_dagster.datasets",
    "process_in_chunks": "memsafe_dagster.datasets",
    "ChunkedParquetWriter": "memsafe_dagster.datasets",
    "PyarrowDatasetIO": "memsafe_dagster.datasets",
    "MergeResult": "memsafe_dagster.datasets",
    "merge_iceberg": "memsafe_dagster.datasets",
    # pipeline
    "MemoryAwarePipeline": "memsafe_dagster.pipeline",
    # dagster layer
    "MemoryMonitorResource": "memsafe_dagster.resources",
    "ChunkedParquetIOManager": "memsafe_dagster.io_managers",
    "build_merge_asset": "memsafe_dagster.merge_asset",
    "IcebergCatalogResource": "memsafe_dagster.iceberg_catalog",
    "memory_gate": "memsafe_dagster.sensors",
    "build_inbox_sensor": "memsafe_dagster.sensors",
    "build_memsafe_failure_sensor": "memsafe_dagster.sensors",
    "build_merge_job": "memsafe_dagster.schedules",
    "container_executor": "memsafe_dagster.executor",
    "k8s_tags_from_history": "memsafe_dagster.k8s",
    "AdmissionLedger": "memsafe_dagster.memory.admission",
    "build_merge_schedule": "memsafe_dagster.schedules",
    # components (dg): the dagster_dg_cli.registry_modules entry point names this package
    "MergeComponent": "memsafe_dagster.components",
    "MemoryResourceComponent": "memsafe_dagster.components",
}

__all__ = [*_EXPORTS, "__version__"]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
