"""Apache Iceberg tables as merge targets and as inputs, in bounded memory.

``merge_iceberg`` runs the same merge engine as ``merge_dataset`` (every strategy, the same
validation, memory guard and pruning) into an Iceberg table: ``IcebergTarget`` lists the
current snapshot's data files from its manifests, the engine rewrites only the files that hold
matched keys and writes new rows in the table's schema (field ids included), and the commit is
one snapshot that removes the replaced files and adds the new ones. ``iceberg_dataset`` reads a
snapshot as a lazy ``pyarrow.dataset.Dataset``; ``remove_orphan_files`` deletes the files a
killed writer left behind.

Everything here needs the optional extra ``memsafe-dagster[iceberg]`` (pyiceberg), and nothing
imports pyiceberg until a function is called: names are imported lazily.
"""

from __future__ import annotations

from memsafe_dagster._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "merge_iceberg": "memsafe_dagster.datasets.iceberg.api",
    "IcebergMergeResult": "memsafe_dagster.datasets.iceberg.result",
    "IcebergCommitConflictError": "memsafe_dagster.datasets.iceberg.result",
    "iceberg_dataset": "memsafe_dagster.datasets.iceberg.read",
    "remove_orphan_files": "memsafe_dagster.datasets.iceberg.orphans",
    "resolve_table": "memsafe_dagster.datasets.iceberg.catalog",
    "resolve_catalog": "memsafe_dagster.datasets.iceberg.catalog",
}

__all__ = list(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
