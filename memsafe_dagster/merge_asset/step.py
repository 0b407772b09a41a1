"""The merge asset's step: one materialization, from run config and spec to MaterializeResult.

It resolves the run's partition into a target (and inbox), picks the inbox files, runs the
merge (``run_merge`` with the spec's ``MergeRequest``) inside the memory resource's ``track``
(EMERGENCY becomes the memsafe ``dagster.Failure`` and leaves the target as it was), archives
the inbox files only after the commit, evaluates the checks and assembles the metadata from
the ``MergeResult``: nothing is re-read after the commit. Every retry halves the chunk size.

Annotations here stay real objects (no postponed evaluation): Dagster reads them at runtime.
"""

import contextlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import dagster as dg
import fsspec
from pydantic import Field

from memsafe_dagster import metadata as md
from memsafe_dagster.checks import positive_int
from memsafe_dagster.datasets.filesystem import arrow_filesystem, resolve_filesystem
from memsafe_dagster.datasets.inbox import (
    InboxFile,
    archive,
    batch_dataset,
    batch_key,
    select_batch,
)
from memsafe_dagster.datasets.merge.engine import run_merge
from memsafe_dagster.datasets.merge.result import MergeResult
from memsafe_dagster.datasets.merge.target import load_target
from memsafe_dagster.datasets.stream import ChunkStream
from memsafe_dagster.datasets.unique import UniqueKeysReport
from memsafe_dagster.iceberg_catalog import IcebergCatalogResource
from memsafe_dagster.merge_asset.checks import (
    headroom_check,
    unique_keys_check,
    unique_keys_report,
)
from memsafe_dagster.merge_asset.spec import TABLE_NAME, MergeAssetSpec
from memsafe_dagster.resources import MemoryMonitorResource

# Materialization metadata beyond DESIGN.md's table.
INBOX_FILES = "memsafe/inbox_files"
INBOX_ARCHIVED = "memsafe/inbox_archived_to"
UNIQUE_KEYS_META = "memsafe/unique_keys"
ICEBERG_SNAPSHOT_ID = "memsafe/iceberg_snapshot_id"

PROGRESS_LOG_INTERVAL_S = 10.0


class MergeConfig(dg.Config):
    """Run config of a merge asset fed by an upstream asset."""

    merge_chunk_size_rows: int | None = Field(
        default=None,
        description="Rows per merge chunk for this run (default: the asset's; halved per retry).",
    )


class InboxMergeConfig(dg.Config):
    """Run config of an inbox merge asset: which files to merge (the inbox sensor sets it)."""

    files: list[str] = Field(
        default_factory=list,
        description=(
            "Files to merge (paths or names inside the inbox); empty: every file now in the inbox."
        ),
    )
    merge_chunk_size_rows: int | None = Field(
        default=None,
        description="Rows per merge chunk for this run (default: the asset's; halved per retry).",
    )


def materialize_merge(
    context: dg.AssetExecutionContext,
    spec: MergeAssetSpec,
    chunk_override: int | None,
    *,
    data: Any = None,
    files: Sequence[str] | None = None,
) -> dg.MaterializeResult:
    """Merge ``data`` (an upstream's value) or the inbox ``files`` into the spec's target."""
    memory: MemoryMonitorResource = getattr(context.resources, spec.memory_resource_key)
    retry = context.retry_number
    requested = (
        spec.request.chunk_rows
        if chunk_override is None
        else positive_int("merge_chunk_size_rows", chunk_override)
    )
    chunk_rows = max(1, requested // 2**retry)
    partition_key, dimensions = _partition(context, spec)
    table = None
    if spec.target_table is not None:
        table = _iceberg_table(context, spec, partition_key, dimensions)
        target = f"Iceberg table {spec.table_for(partition_key, dimensions)}"
        fs = target_stripped = None
    else:
        target = spec.target_for(partition_key, dimensions)
        fs, target_stripped = resolve_filesystem(target, storage_options=spec.storage_options)
    _warn_if_pool_unlimited(context, spec.pool)

    inbox_fs = inbox_path = None
    batch: list[InboxFile] = []
    if spec.inbox is not None:
        inbox_url = spec.inbox_for(partition_key, dimensions)
        inbox_fs, inbox_path = resolve_filesystem(inbox_url, storage_options=spec.storage_options)
        inbox_path = inbox_path.rstrip("/")
        batch = select_batch(
            inbox_fs, inbox_path, spec.inbox_pattern, files or [], log=context.log.info
        )
        what = f"{len(batch)} inbox file(s) from {inbox_url}"
    else:
        what = f"asset {spec.upstream.to_user_string()}"  # type: ignore[union-attr]
        if isinstance(data, ChunkStream):
            data.chunk_size_rows = chunk_rows
    stage = (
        f"merging {what} into {target} ({spec.strategy} by {', '.join(spec.key_columns)}, "
        f"merge_chunk_size_rows={chunk_rows}, retry {retry})"
    )

    with memory.track(context, stage=stage, record=False) as tracker:
        tracker.extra.update(
            {
                md.CHUNK_SIZE_ROWS: dg.MetadataValue.int(chunk_rows),
                md.RETRY_NUMBER: dg.MetadataValue.int(retry),
                # The op config field a relaunch after a memory failure may halve.
                md.CHUNK_CONFIG: dg.MetadataValue.text("merge_chunk_size_rows"),
                md.URI: dg.MetadataValue.path(target if table is None else table.location()),
            }
        )
        monitor = tracker.monitor
        if spec.inbox is not None and not batch:
            context.log.info(f"memsafe: no files to merge in {spec.inbox}; target left as is")
            result = _unchanged_result(spec, fs, target_stripped, table)
        else:
            request = spec.request.with_chunk_rows(chunk_rows).with_memory(
                monitor, _progress_logger(context)
            )
            source = data if spec.inbox is None else batch_dataset(inbox_fs, batch)
            if table is not None:
                result = _merge_iceberg(context, source, table, request)
            else:
                result = run_merge(
                    source, target_stripped, fs, request, storage_options=spec.storage_options
                )
        archived: list[str] = []
        if batch:
            # Only now, after the commit: a failure before this point leaves every file in the
            # inbox, and merging them again gives the same dataset.
            archived = archive(inbox_fs, inbox_path, batch, batch_key(batch))
        unique = None
        if spec.check_unique_keys:
            unique = unique_keys_report(spec, fs, target_stripped, monitor)

    figures = tracker.figures  # the step's window: it already holds what the merge guard saw
    metadata: dict[str, Any] = {
        **md.merge_metadata(result, monitor, figures=figures, chunks=_chunks(data)),
        **md.budgets_metadata(monitor),
        **tracker.extra,
    }
    if result.schema is not None:
        metadata.update(
            md.table_metadata(
                result.schema, result.target_count_after, partitioned=bool(spec.placeholders)
            )
        )
    else:
        metadata[md.ROW_COUNT] = dg.MetadataValue.int(int(result.target_count_after))
    if table is not None:
        metadata.update(_iceberg_metadata(result, table))
    if batch:
        metadata[INBOX_FILES] = dg.MetadataValue.json([f.name for f in batch])
        metadata[INBOX_ARCHIVED] = dg.MetadataValue.path(archived[0].rsplit("/", 1)[0])
    checks = [headroom_check(spec, figures, monitor)]
    if unique is not None:
        checks.insert(0, unique_keys_check(spec, unique, result))
        if isinstance(unique, UniqueKeysReport):
            metadata[UNIQUE_KEYS_META] = dg.MetadataValue.json(unique.to_dict())
    context.log.info(
        f"memsafe: {spec.strategy} into {target}: {result.inserted} inserted, {result.updated} "
        f"updated, {result.deleted} deleted; {result.target_count_after} rows; peak RSS "
        f"{figures.peak_rss_mb:.0f} MB of {figures.limit_mb:.0f} MB ({figures.limit_source})"
    )
    return dg.MaterializeResult(metadata=md.for_ui(metadata), check_results=checks)


def _partition(
    context: dg.AssetExecutionContext, spec: MergeAssetSpec
) -> tuple[str | None, dict[str, str]]:
    """The run's partition key and, for a multi-partition key, its dimensions."""
    if not context.has_partition_key:
        if spec.placeholders and context.has_partition_key_range:
            raise ValueError(
                f"{spec.target_path!r} is one dataset per partition: run one partition per run "
                "(a backfill of this asset launches one run per partition)"
            )
        return None, {}
    key = context.partition_key
    dimensions: dict[str, str] = {}
    if isinstance(key, dg.MultiPartitionKey):
        dimensions = dict(key.keys_by_dimension)
    return str(key), dimensions


def _iceberg_table(
    context: dg.AssetExecutionContext,
    spec: MergeAssetSpec,
    partition_key: str | None,
    dimensions: dict[str, str],
) -> Any:
    """The run's Iceberg target table, from the catalog resource."""
    catalog = getattr(context.resources, spec.catalog_resource_key or "")
    if not isinstance(catalog, IcebergCatalogResource):
        raise TypeError(
            f"resource {spec.catalog_resource_key!r} must be an IcebergCatalogResource (the "
            f"catalog of {spec.target_table}), got {type(catalog).__name__}"
        )
    return catalog.load_table(spec.table_for(partition_key, dimensions))


def _merge_iceberg(
    context: dg.AssetExecutionContext, data: Any, table: Any, request: Any
) -> MergeResult:
    """One snapshot whose summary names the Dagster run that made it."""
    from memsafe_dagster.datasets.iceberg.api import run_iceberg_merge

    return run_iceberg_merge(
        data,
        table,
        request,
        snapshot_properties={
            "dagster.run-id": context.run.run_id,
            "dagster.asset-key": context.asset_key.to_user_string(),
        },
    )


def _iceberg_metadata(result: MergeResult, table: Any) -> dict[str, dg.MetadataValue]:
    """The table and the snapshot the merge committed (ids as text: they exceed 32 bits)."""
    out = {TABLE_NAME: dg.MetadataValue.text(".".join(table.name()))}
    snapshot_id = getattr(result, "snapshot_id", None)
    if snapshot_id is None and table.current_snapshot() is not None:
        snapshot_id = table.current_snapshot().snapshot_id  # nothing changed: the current one
    if snapshot_id is not None:
        out[ICEBERG_SNAPSHOT_ID] = dg.MetadataValue.text(str(snapshot_id))
    return out


def _unchanged_result(
    spec: MergeAssetSpec,
    fs: fsspec.AbstractFileSystem | None,
    target: str | None,
    table: Any = None,
) -> MergeResult:
    """The result of merging nothing: the target's rows and schema as the merge would see
    them (its footers, read by the merge's own ``load_target``; an Iceberg table's current
    snapshot)."""
    if table is not None:
        snapshot = table.current_snapshot()
        rows = (
            int(snapshot.summary.additional_properties.get("total-records", 0)) if snapshot else 0
        )
        return MergeResult(
            strategy=spec.strategy,
            target_count_before=rows,
            target_count_after=rows,
            schema=table.schema().as_arrow(),
        )
    assert fs is not None and target is not None
    dataset = load_target(fs, arrow_filesystem(fs), target, spec.key_columns)
    return MergeResult(
        strategy=spec.strategy,
        target_count_before=dataset.rows,
        target_count_after=dataset.rows,
        schema=dataset.schema,
    )


def _chunks(data: Any) -> int | None:
    return data.stats.chunks if isinstance(data, ChunkStream) else None


def _progress_logger(context: dg.AssetExecutionContext) -> Callable[[int, int], None]:
    """A progress callback that logs at most every ``PROGRESS_LOG_INTERVAL_S``."""
    last = [time.monotonic()]

    def progress(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] >= PROGRESS_LOG_INTERVAL_S:
            last[0] = now
            share = f" ({100 * done / total:.0f} %)" if total else ""
            context.log.info(f"memsafe: merge progress {done:,} of ~{total:,} rows{share}")

    return progress


def _warn_if_pool_unlimited(context: dg.AssetExecutionContext, pool: str) -> None:
    with contextlib.suppress(Exception):  # storages without pool support: nothing to say
        info = context.instance.event_log_storage.get_concurrency_info(pool)
        if info.limit is None:
            context.log.warning(
                f"memsafe: pool {pool} has no limit, so Dagster may run two merges into this "
                "target at once (the dataset lock then makes the second wait). Set "
                "`concurrency: pools: default_limit: 1` in dagster.yaml or `dagster instance "
                f"concurrency set {pool} 1`."
            )
