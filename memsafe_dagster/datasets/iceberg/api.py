"""``merge_iceberg``: the merge engine into an Apache Iceberg table, one snapshot per merge.

Its parameters are ``merge_dataset``'s (one ``MergeRequest``), plus the table and its catalog.
This module imports nothing of pyiceberg: the work is done by ``run_iceberg_merge``, imported
when a merge runs.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from memsafe_dagster.datasets.merge.request import MergeRequest, ProgressCallback
from memsafe_dagster.memory import MemoryMonitor

if TYPE_CHECKING:
    from pyiceberg.catalog import Catalog
    from pyiceberg.table import Table

    from memsafe_dagster.datasets.iceberg.result import IcebergMergeResult

DEFAULT_CONFLICT_RETRIES = 2


def merge_iceberg(
    data: Any,
    table: Table | str | Sequence[str],
    strategy: str = "upsert",
    key_columns: str | Sequence[str] | None = None,
    *,
    catalog: Catalog | str | None = None,
    merge_max_memory_mb: float = 1024,
    merge_max_process_memory_mb: float | None = None,
    merge_min_system_available_mb: float = 512,
    merge_chunk_size_rows: int = 100_000,
    enable_streaming_merge: bool = True,
    merge_progress_callback: ProgressCallback | None = None,
    memory_monitor: MemoryMonitor | None = None,
    on_duplicate_keys: str = "error",
    conflict_retries: int = DEFAULT_CONFLICT_RETRIES,
    snapshot_properties: Mapping[str, str] | None = None,
    **options: Any,
) -> IcebergMergeResult:
    """Merge ``data`` into the Iceberg ``table`` by ``key_columns``, committing one snapshot.

    ``table``: a pyiceberg ``Table``, or an identifier ``"namespace.table"`` loaded from
    ``catalog`` (a pyiceberg ``Catalog``, or a catalog name resolved by pyiceberg's own
    configuration: ``.pyiceberg.yaml`` or ``PYICEBERG_CATALOG__<NAME>__*`` environment
    variables; None: its default catalog). ``key_columns`` default to the table's identifier
    fields. Everything else is as for ``merge_dataset``: ``data`` of any tabular kind, the five
    strategies, the memory budgets and ``**options`` (``target_file_rows``, ``row_group_size``,
    ``compression`` (default: the table's ``write.parquet.compression-codec``), ``workers``,
    ...). Invalid input raises ``ValueError`` naming the problem, and the table keeps its
    current snapshot.

    The commit is one snapshot (``overwrite``, or ``append`` when the merge only adds files)
    whose summary carries ``memsafe.merge-id``, ``memsafe.strategy`` and the counts, plus
    ``snapshot_properties``; the previous snapshot stays readable (time travel). A concurrent
    commit is retried by pyiceberg (``commit.retry.*`` table properties) when it touched no
    data files; one that did conflicts, and the merge is run again against the new snapshot up
    to ``conflict_retries`` times when ``data`` can be read again (a Table, Dataset or paths),
    else ``IcebergCommitConflictError`` is raised. Partitioned tables, tables with row-level
    delete files and tables with renamed columns are refused. Returns an
    ``IcebergMergeResult`` (a ``MergeResult`` with ``snapshot_id``).
    """
    from memsafe_dagster.datasets.iceberg.catalog import require_pyiceberg

    require_pyiceberg("merge_iceberg")
    from memsafe_dagster.datasets.iceberg.catalog import resolve_table

    if not isinstance(conflict_retries, int) or isinstance(conflict_retries, bool):
        raise ValueError(f"conflict_retries must be an integer >= 0, got {conflict_retries!r}")
    if conflict_retries < 0:
        raise ValueError(f"conflict_retries must be an integer >= 0, got {conflict_retries!r}")

    def request_for(keys: str | Sequence[str] | None) -> MergeRequest:
        return MergeRequest.create(
            strategy=strategy,
            key_columns=keys,
            on_duplicate_keys=on_duplicate_keys,
            merge_chunk_size_rows=merge_chunk_size_rows,
            enable_streaming_merge=enable_streaming_merge,
            merge_max_memory_mb=merge_max_memory_mb,
            merge_max_process_memory_mb=merge_max_process_memory_mb,
            merge_min_system_available_mb=merge_min_system_available_mb,
            memory_monitor=memory_monitor,
            merge_progress_callback=merge_progress_callback,
            options=options,
        )

    request = request_for(key_columns) if key_columns is not None else None
    resolved = resolve_table(table, catalog)
    if request is None:
        request = request_for(identifier_keys(resolved))
    return run_iceberg_merge(
        data,
        resolved,
        request,
        conflict_retries=conflict_retries,
        snapshot_properties=snapshot_properties,
    )


def identifier_keys(table: Table) -> tuple[str, ...]:
    """The table's identifier fields, or a ValueError asking for ``key_columns``."""
    names = sorted(table.schema().identifier_field_names())
    if not names:
        raise ValueError(
            f"key_columns is required: Iceberg table {'.'.join(table.name())} has no identifier "
            "fields to default to"
        )
    return tuple(names)


def run_iceberg_merge(
    data: Any,
    table: Table,
    request: MergeRequest,
    *,
    conflict_retries: int = DEFAULT_CONFLICT_RETRIES,
    snapshot_properties: Mapping[str, str] | None = None,
) -> IcebergMergeResult:
    """Run ``request`` into ``table`` (what ``merge_iceberg`` and the merge asset call)."""
    from memsafe_dagster.datasets.iceberg.catalog import table_name
    from memsafe_dagster.datasets.iceberg.result import (
        IcebergCommitConflictError,
        IcebergMergeResult,
    )
    from memsafe_dagster.datasets.iceberg.target import IcebergTarget
    from memsafe_dagster.datasets.merge.engine import run_merge

    rereadable = _rereadable(data)
    attempt = 0
    while True:
        attempt += 1
        table.refresh()
        target = IcebergTarget(table, dict(snapshot_properties or {}))
        try:
            result = run_merge(data, target, None, _with_table_defaults(request, table))
        except IcebergCommitConflictError as exc:
            if attempt > conflict_retries or not rereadable:
                if not rereadable and conflict_retries:
                    raise IcebergCommitConflictError(
                        f"{exc} (the source is read once, so memsafe could not merge it again)"
                    ) from exc.__cause__
                raise
            continue
        write = target.last_write
        assert write is not None
        return IcebergMergeResult.of(
            result,
            table=table_name(table),
            snapshot_id=write.snapshot_id if result.committed else None,
            parent_snapshot_id=write.parent_snapshot_id,
            attempts=attempt,
        )


def _with_table_defaults(request: MergeRequest, table: Table) -> MergeRequest:
    """The table's Parquet codec (``write.parquet.compression-*``) unless one is asked for."""
    if request.options.compression is not None:
        return request
    props = table.properties
    codec = props.get("write.parquet.compression-codec", "zstd").lower()
    level = props.get("write.parquet.compression-level")
    options = dataclasses.replace(
        request.options,
        compression="none" if codec == "uncompressed" else codec,
        compression_level=int(level) if level not in (None, "") else None,
    )
    options.validate()
    return dataclasses.replace(request, options=options)


def _rereadable(data: Any) -> bool:
    """Whether a conflicting merge can run again on the same ``data``."""
    from memsafe_dagster.datasets.source import is_dataset

    if isinstance(data, (str, os.PathLike)) or is_dataset(data):
        return True
    if isinstance(data, (list, tuple)) and data:
        return all(isinstance(p, (str, os.PathLike)) for p in data) or all(
            _is_arrow_table(item) for item in data
        )
    return _is_arrow_table(data)


def _is_arrow_table(obj: Any) -> bool:
    import pyarrow as pa

    return isinstance(obj, (pa.Table, pa.RecordBatch))
