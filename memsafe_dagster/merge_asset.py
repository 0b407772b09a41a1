"""build_merge_asset: a Dagster asset that merges a source into a Parquet dataset by key columns.

The source is an upstream asset (streamed through its IO manager: ``ChunkedParquetIOManager``
hands it over as a ``ChunkStream``) or an inbox of Parquet files (an fsspec URL; each file is
merged exactly once and moved to ``_processed/`` only after the merge committed). The merge is
``merge_dataset``: bounded memory, only files holding matched keys rewritten, one crash-safe
commit. Each materialization records the merge counts, the target's rows and schema and the
memsafe/* memory figures, and runs two asset checks: ``unique_keys`` (streamed over the
target's key columns, spilled to disk by hash bucket when they exceed their budget) and
``memory_headroom``. EMERGENCY pressure fails the step with the memsafe ``dagster.Failure``
and leaves the target as it was; under a ``RetryPolicy`` every retry halves the chunk size.

Annotations here stay real objects (no postponed evaluation): Dagster reads them at runtime.
"""

import contextlib
import hashlib
import math
import os
import re
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import dagster as dg
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from pydantic import Field

from memsafe_dagster import metadata as md
from memsafe_dagster.datasets.filesystem import (
    arrow_filesystem,
    is_hidden,
    join,
    list_data_files,
    resolve_filesystem,
)
from memsafe_dagster.datasets.inbox import (
    PROCESSED_DIR,
    InboxFile,
    archive,
    batch_key,
    inbox_file,
    list_inbox,
)
from memsafe_dagster.datasets.merge import STRATEGIES, MergeOptions, MergeResult, merge_dataset
from memsafe_dagster.datasets.merge.validate import normalize_key_columns
from memsafe_dagster.datasets.stream import ChunkStream
from memsafe_dagster.memory import MemoryMonitor, MemoryPressureError, MemoryPressureLevel
from memsafe_dagster.memory.sizes import MiB
from memsafe_dagster.resources import MemoryMonitorResource, MemoryTracker

UNIQUE_KEYS = "unique_keys"
MEMORY_HEADROOM = "memory_headroom"
DUPLICATE_POLICIES = ("error", "first", "last")

# Definition metadata of every merge asset (the inbox sensor reads the inbox from it).
TARGET_PATH = "memsafe/target_path"
KEY_COLUMNS = "memsafe/key_columns"
STRATEGY = "memsafe/strategy"
INBOX = "memsafe/inbox"
INBOX_PATTERN = "memsafe/inbox_pattern"
POOL = "memsafe/pool"
# Materialization metadata beyond DESIGN.md's table.
INBOX_FILES = "memsafe/inbox_files"
INBOX_ARCHIVED = "memsafe/inbox_archived_to"
UNIQUE_KEYS_META = "memsafe/unique_keys"

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_PROGRESS_LOG_INTERVAL_S = 10.0
_WARNING_RATIO = 0.7  # the monitor's WARNING ratio: memory_headroom's default threshold

# Inbox merge assets' storage options (credentials stay out of definition metadata).
_STORAGE_OPTIONS: dict[dg.AssetKey, dict[str, Any]] = {}


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


def _is_mergeable(_context: Any, value: Any) -> bool:
    return isinstance(
        value, (ChunkStream, pa.Table, pa.RecordBatch, pa.RecordBatchReader, ds.Dataset)
    )


#: The input type of a merge asset's upstream: ``ChunkedParquetIOManager`` streams it (its
#: typing type is ``ChunkStream``), and a Table, RecordBatchReader or Dataset from any other IO
#: manager passes the type check too.
MergeSourceType = dg.DagsterType(
    type_check_fn=_is_mergeable,
    name="MergeSource",
    description="What a merge asset merges: a ChunkStream, Table, RecordBatchReader or Dataset.",
    typing_type=ChunkStream,
)


@dataclass(frozen=True)
class MergeAssetSpec:
    """What a merge asset was built with (also readable with ``merge_asset_spec``)."""

    key: dg.AssetKey
    target_path: str
    key_columns: tuple[str, ...]
    strategy: str
    memory_resource_key: str
    merge_chunk_size_rows: int
    on_duplicate_keys: str
    enable_streaming_merge: bool
    merge_options: Mapping[str, Any]
    storage_options: Mapping[str, Any]
    inbox: str | None
    inbox_pattern: str
    placeholders: tuple[str, ...]
    check_unique_keys: bool
    min_headroom_mb: float | None
    check_memory_mb: float | None
    pool: str | None
    upstream: dg.AssetKey | None = None

    def target_for(self, partition_key: str | None, dimensions: Mapping[str, str]) -> str:
        """The target URL for one partition (``{partition_key}`` and dimension names filled)."""
        return _fill(self.target_path, partition_key, dimensions)

    def inbox_for(self, partition_key: str | None, dimensions: Mapping[str, str]) -> str:
        assert self.inbox is not None
        return _fill(self.inbox, partition_key, dimensions)


def _fill(template: str, partition_key: str | None, dimensions: Mapping[str, str]) -> str:
    def value(match: re.Match) -> str:
        name = match.group(1)
        if name == "partition_key":
            if partition_key is None:
                raise ValueError(f"{template!r} needs a partition key and the run has none")
            return partition_key.replace("|", "/")
        return dimensions[name]

    return _PLACEHOLDER.sub(value, template)


def build_merge_asset(
    name: str,
    *,
    source: dg.AssetsDefinition | dg.AssetSpec | dg.AssetKey | str,
    target_path: str,
    key_columns: str | Sequence[str],
    strategy: str = "upsert",
    partitions_def: dg.PartitionsDefinition | None = None,
    partition_mapping: dg.PartitionMapping | None = None,
    memory_resource_key: str = "memory",
    merge_chunk_size_rows: int = 100_000,
    on_duplicate_keys: str = "error",
    enable_streaming_merge: bool = True,
    storage_options: Mapping[str, Any] | None = None,
    inbox_pattern: str = "*.parquet",
    input_metadata: Mapping[str, Any] | None = None,
    check_unique_keys: bool = True,
    min_headroom_mb: float | None = None,
    check_memory_mb: float | None = None,
    pool: str | None = None,
    retry_policy: dg.RetryPolicy | None = None,
    key_prefix: str | Sequence[str] | None = None,
    group_name: str | None = None,
    description: str | None = None,
    tags: Mapping[str, str] | None = None,
    owners: Sequence[str] | None = None,
    **merge_options: Any,
) -> dg.AssetsDefinition:
    """An asset merging ``source`` into the Parquet dataset at ``target_path`` by ``key_columns``.

    ``source``: an upstream ``AssetsDefinition`` / ``AssetSpec`` / ``AssetKey`` (loaded by its IO
    manager; ``ChunkedParquetIOManager`` streams it in chunks) or a string: the fsspec URL of an
    inbox directory of Parquet files matching ``inbox_pattern``. An inbox asset takes run config
    ``files`` (what the inbox sensor passes; empty: every file in the inbox), merges them in one
    commit (oldest first, so ``on_duplicate_keys="last"`` keeps the newest row) and then moves
    them to ``<inbox>/_processed/<batch key>/``.

    ``target_path`` (and an inbox URL) may contain ``{partition_key}`` (``|`` of a multi-partition
    key becomes ``/``) or a multi-partition dimension name such as ``{date}``. ``partitions_def``
    defaults to the upstream asset's, which then maps partition to partition.

    Memory: budgets come from the ``MemoryMonitorResource`` under ``memory_resource_key``; the
    merge runs inside its ``track``. ``merge_chunk_size_rows`` is halved on every retry of a
    ``retry_policy``. ``on_duplicate_keys``, ``enable_streaming_merge`` and ``**merge_options``
    (``row_group_size``, ``target_file_rows``, ``compression``, ``lock_timeout_s``, ``workers``,
    ...) go to ``merge_dataset``.

    Checks: ``unique_keys`` (ERROR when a key occurs twice in the target or has a null; reads
    only the key columns, in at most ``check_memory_mb``, default a quarter of the PyArrow
    budget; ``check_unique_keys=False`` leaves it out) and ``memory_headroom`` (WARN when the
    peak left less than ``min_headroom_mb`` below the limit; default: the headroom left at 70 %
    of the process budget, where pressure turns WARNING).

    ``pool`` (default: one derived from the target) keeps Dagster from running two merges into
    one target at once once the instance gives pools a limit (``concurrency: pools:
    default_limit: 1`` in dagster.yaml); the dataset's lock is the second line of defence.
    """
    keys = normalize_key_columns(key_columns)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {list(STRATEGIES)}, got {strategy!r}")
    if on_duplicate_keys not in DUPLICATE_POLICIES:
        raise ValueError(
            f"on_duplicate_keys must be one of {list(DUPLICATE_POLICIES)}, got "
            f"{on_duplicate_keys!r}"
        )
    _positive_int("merge_chunk_size_rows", merge_chunk_size_rows)
    MergeOptions.from_kwargs(merge_options)  # unknown or bad options fail at definition time
    if not isinstance(target_path, str) or not target_path:
        raise ValueError(f"target_path must be a path or URL, got {target_path!r}")
    for label, value in (
        ("min_headroom_mb", min_headroom_mb),
        ("check_memory_mb", check_memory_mb),
    ):
        if value is not None and (not isinstance(value, (int, float)) or value <= 0):
            raise ValueError(f"{label} must be a positive number of MB, got {value!r}")

    inbox: str | None = None
    upstream: dg.AssetKey | None = None
    if isinstance(source, str):
        inbox = source
    elif isinstance(source, dg.AssetsDefinition):
        if len(source.keys) != 1:
            raise ValueError(
                f"source {name!r}: an AssetsDefinition with {len(source.keys)} assets; pass the "
                "AssetKey of the one to merge"
            )
        upstream = source.key
        if partitions_def is None:
            partitions_def = source.partitions_def
    elif isinstance(source, dg.AssetSpec):
        upstream = source.key
        if partitions_def is None:
            partitions_def = source.partitions_def
    elif isinstance(source, dg.AssetKey):
        upstream = source
    else:
        raise TypeError(
            "source must be an upstream AssetsDefinition, AssetSpec or AssetKey, or the URL of "
            f"an inbox of Parquet files; got {type(source).__name__}"
        )

    placeholders = _check_placeholders("target_path", target_path, partitions_def)
    if inbox is not None:
        placeholders += _check_placeholders("source (inbox)", inbox, partitions_def)
    if pool is None:
        pool = merge_pool_name(target_path, storage_options)

    asset_key = dg.AssetKey([*_prefix(key_prefix), name])
    spec = MergeAssetSpec(
        key=asset_key,
        target_path=target_path,
        key_columns=keys,
        strategy=strategy,
        memory_resource_key=memory_resource_key,
        merge_chunk_size_rows=merge_chunk_size_rows,
        on_duplicate_keys=on_duplicate_keys,
        enable_streaming_merge=enable_streaming_merge,
        merge_options=dict(merge_options),
        storage_options=dict(storage_options or {}),
        inbox=inbox,
        inbox_pattern=inbox_pattern,
        placeholders=tuple(dict.fromkeys(placeholders)),
        check_unique_keys=check_unique_keys,
        min_headroom_mb=min_headroom_mb,
        check_memory_mb=check_memory_mb,
        pool=pool,
        upstream=upstream,
    )
    check_specs = [
        dg.AssetCheckSpec(
            MEMORY_HEADROOM,
            asset=asset_key,
            description="Warns when the merge's peak RSS came close to the memory limit.",
        )
    ]
    if check_unique_keys:
        check_specs.insert(
            0,
            dg.AssetCheckSpec(
                UNIQUE_KEYS,
                asset=asset_key,
                description=f"Every key ({', '.join(keys)}) occurs once in the target.",
            ),
        )
    definition_metadata: dict[str, Any] = {
        TARGET_PATH: target_path,
        KEY_COLUMNS: ", ".join(keys),
        STRATEGY: strategy,
        POOL: pool,
    }
    what = f"{inbox} (inbox, {inbox_pattern})" if inbox else upstream.to_user_string()
    common: dict[str, Any] = {
        "name": name,
        "key_prefix": key_prefix,
        "partitions_def": partitions_def,
        "required_resource_keys": {memory_resource_key},
        "check_specs": check_specs,
        "pool": pool,
        "retry_policy": retry_policy,
        "group_name": group_name,
        "tags": dict(tags) if tags else None,
        "owners": list(owners) if owners else None,
        "kinds": {"parquet"},
        "description": description
        or f"{strategy} of {what} into {target_path} by {', '.join(keys)} (memsafe merge).",
    }

    if inbox is not None:
        definition_metadata[INBOX] = inbox
        definition_metadata[INBOX_PATTERN] = inbox_pattern

        def merge_inbox(context: dg.AssetExecutionContext, config: InboxMergeConfig):
            return _materialize(context, spec, config.merge_chunk_size_rows, files=config.files)

        asset = dg.asset(metadata=definition_metadata, **common)(merge_inbox)
        if spec.storage_options:
            _STORAGE_OPTIONS[asset_key] = dict(spec.storage_options)
        return asset

    ins = {
        "source": dg.AssetIn(
            key=upstream,
            metadata=dict(input_metadata) if input_metadata else None,
            partition_mapping=partition_mapping,
            dagster_type=MergeSourceType,
        )
    }

    def merge_upstream(context: dg.AssetExecutionContext, config: MergeConfig, source):
        return _materialize(context, spec, config.merge_chunk_size_rows, data=source)

    return dg.asset(ins=ins, metadata=definition_metadata, **common)(merge_upstream)


def merge_asset_spec(asset: dg.AssetsDefinition) -> dict[str, Any]:
    """The memsafe definition metadata of a merge asset (target, keys, strategy, inbox, pool)."""
    meta = asset.specs_by_key[asset.key].metadata
    return {k: v for k, v in meta.items() if k.startswith("memsafe/")}


def inbox_storage_options(asset: dg.AssetsDefinition) -> dict[str, Any]:
    """The storage options an inbox merge asset was built with (not in its metadata)."""
    return dict(_STORAGE_OPTIONS.get(asset.key, {}))


def merge_pool_name(target_path: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """A stable concurrency pool name for a target: readable tail plus a hash of the full URL.

    Two spellings of one local directory (relative, absolute, ``file://``) get the same pool.
    """
    try:
        fs, stripped = resolve_filesystem(target_path, storage_options=storage_options)
        protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
        normalized = f"{protocol}://{stripped.rstrip('/')}"
    except (ValueError, ImportError):
        normalized = target_path.rstrip("/")
    tail = "-".join(p for p in normalized.split("/")[-2:] if p)
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "_", tail).strip("_")[:60] or "target"
    digest = hashlib.sha256(normalized.encode()).hexdigest()[:8]
    return f"memsafe-merge-{readable}-{digest}"


# -- the step -------------------------------------------------------------------------------------


def _materialize(
    context: dg.AssetExecutionContext,
    spec: MergeAssetSpec,
    chunk_override: int | None,
    *,
    data: Any = None,
    files: Sequence[str] | None = None,
) -> dg.MaterializeResult:
    memory: MemoryMonitorResource = getattr(context.resources, spec.memory_resource_key)
    retry = context.retry_number
    requested = chunk_override if chunk_override is not None else spec.merge_chunk_size_rows
    _positive_int("merge_chunk_size_rows", requested)
    chunk_rows = max(1, requested // 2**retry)
    partition_key, dimensions = _partition(context, spec)
    target = spec.target_for(partition_key, dimensions)
    fs, target_stripped = resolve_filesystem(target, storage_options=spec.storage_options)
    _warn_if_pool_unlimited(context, spec.pool)

    inbox_fs = inbox_path = None
    batch: list[InboxFile] = []
    if spec.inbox is not None:
        inbox_url = spec.inbox_for(partition_key, dimensions)
        inbox_fs, inbox_path = resolve_filesystem(inbox_url, storage_options=spec.storage_options)
        inbox_path = inbox_path.rstrip("/")
        batch = _inbox_batch(context, inbox_fs, inbox_path, spec.inbox_pattern, files or [])
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
                md.PATH: dg.MetadataValue.path(target),
            }
        )
        monitor = tracker.monitor
        if spec.inbox is not None and not batch:
            context.log.info(f"memsafe: no files to merge in {spec.inbox}; target left as is")
            result = _unchanged_result(spec.strategy, fs, target_stripped)
        else:
            source_data = data if spec.inbox is None else _inbox_dataset(inbox_fs, batch)
            result = merge_dataset(
                source_data,
                target_stripped,
                fs=fs,
                strategy=spec.strategy,
                key_columns=list(spec.key_columns),
                merge_max_memory_mb=monitor.max_pyarrow_mb,
                merge_max_process_memory_mb=monitor.max_process_memory_mb or None,
                merge_min_system_available_mb=monitor.min_system_available_mb,
                merge_chunk_size_rows=chunk_rows,
                enable_streaming_merge=spec.enable_streaming_merge,
                merge_progress_callback=_progress_logger(context),
                memory_monitor=monitor,
                on_duplicate_keys=spec.on_duplicate_keys,
                **spec.merge_options,
            )
        archived: list[str] = []
        if batch:
            # Only now, after the commit: a failure before this point leaves every file in the
            # inbox, and merging them again gives the same dataset.
            archived = archive(inbox_fs, inbox_path, batch, batch_key(batch))
        unique: UniqueKeysReport | BaseException | None = None
        if spec.check_unique_keys:
            unique = _verify_unique(spec, fs, target_stripped, monitor)

    figures = _step_figures(tracker, result)
    schema = _target_schema(fs, target_stripped)
    templated = bool(spec.placeholders)
    metadata: dict[str, Any] = {
        **md.merge_metadata(result, monitor),
        **md.memory_metadata(figures, chunks=_chunks(data)),
        **md.budgets_metadata(monitor),
        **tracker.extra,
    }
    if schema is not None:
        metadata.update(md.table_metadata(schema, result.target_count_after, partitioned=templated))
    else:
        metadata[md.ROW_COUNT] = dg.MetadataValue.int(int(result.target_count_after))
    if batch:
        metadata[INBOX_FILES] = dg.MetadataValue.json([f.name for f in batch])
        metadata[INBOX_ARCHIVED] = dg.MetadataValue.path(archived[0].rsplit("/", 1)[0])
    checks = [_headroom_check(spec, figures, monitor)]
    if spec.check_unique_keys:
        checks.insert(0, _unique_check(spec, unique, result))
        if isinstance(unique, UniqueKeysReport):
            metadata[UNIQUE_KEYS_META] = dg.MetadataValue.json(unique.to_dict())
    context.log.info(
        f"memsafe: {spec.strategy} into {target}: {result.inserted} inserted, {result.updated} "
        f"updated, {result.deleted} deleted; {result.target_count_after} rows; peak RSS "
        f"{figures.peak_rss_mb:.0f} MB of {figures.limit_mb:.0f} MB ({figures.limit_source})"
    )
    return dg.MaterializeResult(metadata=metadata, check_results=checks)


def _partition(
    context: dg.AssetExecutionContext, spec: MergeAssetSpec
) -> tuple[str | None, dict[str, str]]:
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


def _inbox_batch(
    context: dg.AssetExecutionContext,
    fs: fsspec.AbstractFileSystem,
    inbox: str,
    pattern: str,
    requested: Sequence[str],
) -> list[InboxFile]:
    """The files of this run: those asked for (skipping any an earlier run already merged and
    archived), or every file in the inbox. Oldest first."""
    if not requested:
        return list_inbox(fs, inbox, pattern)
    batch = []
    for raw in requested:
        path = _inbox_member(fs, inbox, raw)
        if not fs.exists(path):
            name = path.rsplit("/", 1)[-1]
            processed = fs.glob(join(inbox, PROCESSED_DIR, "*", name))
            if processed:
                context.log.info(f"memsafe: {name} was already merged (now {processed[0]})")
                continue
            raise ValueError(f"inbox file {raw!r} not found in {inbox}")
        batch.append(inbox_file(fs, path))
    return sorted(batch, key=lambda f: (f.mtime, f.path))


def _inbox_member(fs: fsspec.AbstractFileSystem, inbox: str, raw: str) -> str:
    """``raw`` (a URL, an absolute path, or a path relative to the inbox) as a path inside
    ``inbox``; anything else is a ValueError."""
    if not isinstance(raw, str) or not raw:
        raise ValueError(f"files: {raw!r} is not a file name or path")
    absolute = "://" in raw or raw.startswith("/")
    stripped = fs._strip_protocol(raw) if absolute else join(inbox, raw)
    relative = stripped[len(inbox) :].lstrip("/") if stripped.startswith(inbox + "/") else None
    if not relative or ".." in relative.split("/") or is_hidden(relative):
        raise ValueError(f"files: {raw!r} is not a file in the inbox {inbox}")
    return stripped


def _inbox_dataset(fs: fsspec.AbstractFileSystem, batch: Sequence[InboxFile]) -> ds.Dataset:
    """The batch's files as one lazy dataset, in batch order (oldest first).

    Its schema unifies the files' own (a column only some files have is kept, null elsewhere),
    so the merge sees every column and refuses one the target does not know.
    """
    afs = arrow_filesystem(fs)
    schemas = []
    for f in batch:
        with afs.open_input_file(f.path) as fh:
            schemas.append(pq.ParquetFile(fh, pre_buffer=False).schema_arrow)
    try:
        schema = pa.unify_schemas(schemas, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        names = ", ".join(f.name for f in batch)
        raise ValueError(f"inbox files {names} have incompatible schemas: {exc}") from None
    return ds.dataset([f.path for f in batch], schema=schema, filesystem=afs, format="parquet")


def _unchanged_result(strategy: str, fs: fsspec.AbstractFileSystem, target: str) -> MergeResult:
    rows = _target_rows(fs, target)
    return MergeResult(strategy=strategy, target_count_before=rows, target_count_after=rows)


def _target_files(fs: fsspec.AbstractFileSystem, target: str) -> list[str]:
    return [f for f in list_data_files(fs, target) if f.endswith(".parquet")]


def _target_rows(fs: fsspec.AbstractFileSystem, target: str) -> int:
    afs = arrow_filesystem(fs)
    rows = 0
    for path in _target_files(fs, target):
        with afs.open_input_file(path) as fh:
            rows += pq.ParquetFile(fh, pre_buffer=False).metadata.num_rows
    return rows


def _target_schema(fs: fsspec.AbstractFileSystem, target: str) -> pa.Schema | None:
    files = _target_files(fs, target)
    if not files:
        return None
    with arrow_filesystem(fs).open_input_file(files[0]) as fh:
        return pq.ParquetFile(fh, pre_buffer=False).schema_arrow


def _chunks(data: Any) -> int | None:
    return data.stats.chunks if isinstance(data, ChunkStream) else None


def _step_figures(tracker: MemoryTracker, result: MergeResult) -> md.MemoryFigures:
    """The step's figures: the worse of the tracker's sampling and the merge's own guard."""
    figures = tracker.figures
    return md.MemoryFigures(
        pressure=max(figures.pressure, MemoryPressureLevel.parse(result.max_pressure)),
        peak_rss_bytes=max(figures.peak_rss_bytes, int(result.peak_rss_mb * MiB)),
        peak_pyarrow_bytes=max(figures.peak_pyarrow_bytes, int(result.peak_pyarrow_mb * MiB)),
        limit_bytes=figures.limit_bytes,
        limit_source=figures.limit_source,
    )


def _progress_logger(context: dg.AssetExecutionContext) -> Callable[[int, int], None]:
    last = [time.monotonic()]

    def progress(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] >= _PROGRESS_LOG_INTERVAL_S:
            last[0] = now
            share = f" ({100 * done / total:.0f} %)" if total else ""
            context.log.info(f"memsafe: merge progress {done:,} of ~{total:,} rows{share}")

    return progress


def _warn_if_pool_unlimited(context: dg.AssetExecutionContext, pool: str | None) -> None:
    if pool is None:
        return
    with contextlib.suppress(Exception):  # storages without pool support: nothing to say
        info = context.instance.event_log_storage.get_concurrency_info(pool)
        if info.limit is None:
            context.log.warning(
                f"memsafe: pool {pool} has no limit, so Dagster may run two merges into this "
                "target at once (the dataset lock then makes the second wait). Set "
                "`concurrency: pools: default_limit: 1` in dagster.yaml or `dagster instance "
                f"concurrency set {pool} 1`."
            )


# -- checks ---------------------------------------------------------------------------------------


def _verify_unique(
    spec: MergeAssetSpec, fs: fsspec.AbstractFileSystem, target: str, monitor: MemoryMonitor
) -> "UniqueKeysReport | BaseException":
    budget_mb = spec.check_memory_mb or max(16.0, 0.25 * float(monitor.max_pyarrow_mb))

    def pressure() -> None:
        reading, level = monitor.sample()
        if level is MemoryPressureLevel.EMERGENCY:
            raise MemoryPressureError(
                "memory pressure EMERGENCY during the unique_keys check",
                level,
                monitor.status_of(reading, level),
            )

    try:
        return verify_unique_keys(
            target,
            spec.key_columns,
            filesystem=fs,
            memory_budget_mb=budget_mb,
            on_chunk=pressure,
        )
    except MemoryPressureError as exc:
        return exc


def _unique_check(
    spec: MergeAssetSpec, report: "UniqueKeysReport | BaseException | None", result: MergeResult
) -> dg.AssetCheckResult:
    if not isinstance(report, UniqueKeysReport):
        return dg.AssetCheckResult(
            check_name=UNIQUE_KEYS,
            passed=False,
            severity=dg.AssetCheckSeverity.WARN,
            description=f"not verified: {report}",
        )
    meta = {
        "rows": dg.MetadataValue.int(report.rows),
        "duplicate_keys": dg.MetadataValue.int(report.duplicate_keys),
        "duplicate_rows": dg.MetadataValue.int(report.duplicate_rows),
        "null_key_rows": dg.MetadataValue.int(report.null_key_rows),
        "buckets": dg.MetadataValue.int(report.buckets),
        "duration_s": dg.MetadataValue.float(round(report.duration_s, 3)),
    }
    if report.examples:
        meta["examples"] = dg.MetadataValue.json(report.examples)
    keys = ", ".join(spec.key_columns)
    if report.passed:
        description = f"{report.rows} rows, every key ({keys}) once"
    else:
        description = (
            f"{report.duplicate_keys} key(s) ({keys}) occur more than once "
            f"({report.duplicate_rows} rows), {report.null_key_rows} row(s) with a null key"
        )
    if report.rows != result.target_count_after:
        description += f"; the target holds {report.rows} rows, the merge reported " + str(
            result.target_count_after
        )
    return dg.AssetCheckResult(
        check_name=UNIQUE_KEYS,
        passed=report.passed,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata=meta,
        description=description,
    )


def _headroom_check(
    spec: MergeAssetSpec, figures: md.MemoryFigures, monitor: MemoryMonitor
) -> dg.AssetCheckResult:
    budget_mb = float(monitor.max_process_memory_mb or figures.limit_mb)
    threshold = (
        spec.min_headroom_mb
        if spec.min_headroom_mb is not None
        else max(0.0, figures.limit_mb - _WARNING_RATIO * budget_mb)
    )
    headroom = figures.headroom_mb
    calm = figures.pressure < MemoryPressureLevel.WARNING
    passed = headroom >= threshold and calm
    description = (
        f"peak RSS {figures.peak_rss_mb:.0f} MB, limit {figures.limit_mb:.0f} MB "
        f"({figures.limit_source}): headroom {headroom:.0f} MB "
        f"{'>=' if headroom >= threshold else '<'} {threshold:.0f} MB; "
        f"worst pressure {figures.pressure.value}"
    )
    if not passed:
        description += (
            ". Next time this may hit EMERGENCY: lower merge_chunk_size_rows or raise the limit"
        )
    return dg.AssetCheckResult(
        check_name=MEMORY_HEADROOM,
        passed=passed,
        severity=dg.AssetCheckSeverity.WARN,
        description=description,
        metadata={
            md.HEADROOM_MB: dg.MetadataValue.float(round(headroom, 2)),
            "memsafe/min_headroom_mb": dg.MetadataValue.float(round(threshold, 2)),
            md.PEAK_RSS_MB: dg.MetadataValue.float(round(figures.peak_rss_mb, 2)),
            md.LIMIT_MB: dg.MetadataValue.float(round(figures.limit_mb, 2)),
            md.PRESSURE: dg.MetadataValue.text(figures.pressure.value),
        },
    )


# -- key uniqueness in bounded memory -------------------------------------------------------------


@dataclass
class UniqueKeysReport:
    """What ``verify_unique_keys`` found."""

    rows: int = 0
    duplicate_keys: int = 0
    duplicate_rows: int = 0
    null_key_rows: int = 0
    buckets: int = 1
    largest_bucket_rows: int = 0
    duration_s: float = 0.0
    examples: list[dict[str, Any]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.duplicate_keys == 0 and self.null_key_rows == 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "rows": self.rows,
            "duplicate_keys": self.duplicate_keys,
            "duplicate_rows": self.duplicate_rows,
            "null_key_rows": self.null_key_rows,
            "buckets": self.buckets,
            "largest_bucket_rows": self.largest_bucket_rows,
            "duration_s": round(self.duration_s, 4),
            "examples": self.examples,
        }


# Bytes of memory per byte of key data while grouping (the hash table and the counts).
_GROUP_BY_OVERHEAD = 3
_MAX_BUCKETS = 4096
_MAX_EXAMPLES = 5


def verify_unique_keys(
    path: str,
    key_columns: str | Sequence[str],
    *,
    filesystem: fsspec.AbstractFileSystem | None = None,
    storage_options: Mapping[str, Any] | None = None,
    memory_budget_mb: float = 256,
    chunk_size_rows: int = 65_536,
    spill_dir: str | None = None,
    on_chunk: Callable[[], None] | None = None,
) -> UniqueKeysReport:
    """Count keys that occur more than once in the Parquet dataset at ``path``, in bounded memory.

    Reads only the key columns, chunk by chunk. When the keys (as sized by the files' footers)
    would not fit ``memory_budget_mb``, rows are first spilled to local Arrow IPC files by a hash
    of the key, so each bucket holds every occurrence of its keys and fits the budget; each
    bucket is then grouped exactly. ``on_chunk`` runs before each chunk (a pressure check).
    """
    keys = list(normalize_key_columns(key_columns))
    started = time.perf_counter()
    if filesystem is None:
        fs, root = resolve_filesystem(path, storage_options=storage_options)
    else:
        fs, root = filesystem, filesystem._strip_protocol(path)
    files = _target_files(fs, root)
    report = UniqueKeysReport()
    if not files:
        report.duration_s = time.perf_counter() - started
        return report
    afs = arrow_filesystem(fs)
    key_bytes = 0
    for f in files:
        with afs.open_input_file(f) as fh:
            meta = pq.ParquetFile(fh, pre_buffer=False).metadata
        names = set(meta.schema.to_arrow_schema().names)
        missing = [k for k in keys if k not in names]
        if missing:
            raise ValueError(f"key column(s) {missing} missing from {f}")
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            for c in range(group.num_columns):
                column = group.column(c)
                if column.path_in_schema.split(".", 1)[0] in keys:
                    key_bytes += column.total_uncompressed_size
    budget = max(1, int(memory_budget_mb * MiB))
    needed = math.ceil(key_bytes * _GROUP_BY_OVERHEAD / budget)
    buckets = 1 if needed <= 1 else min(_MAX_BUCKETS, 1 << (needed - 1).bit_length())
    report.buckets = buckets

    def chunks():
        for f in files:
            with afs.open_input_file(f) as fh:
                pf = pq.ParquetFile(fh, pre_buffer=False)
                for batch in pf.iter_batches(batch_size=chunk_size_rows, columns=keys):
                    if on_chunk is not None:
                        on_chunk()
                    yield pa.Table.from_batches([batch]).select(keys)

    if buckets == 1:
        parts = list(chunks())
        table = pa.concat_tables(parts, promote_options="permissive") if parts else None
        if table is not None:
            report.largest_bucket_rows = table.num_rows
            _group(table, keys, report)
    else:
        with tempfile.TemporaryDirectory(prefix="memsafe-unique-", dir=spill_dir) as tmp:
            _spilled(chunks(), keys, buckets, tmp, report, on_chunk)
    report.duration_s = time.perf_counter() - started
    return report


def _spilled(
    chunks: Any,
    keys: list[str],
    buckets: int,
    tmp: str,
    report: UniqueKeysReport,
    on_chunk: Callable[[], None] | None,
) -> None:
    shift = np.uint64(64 - (buckets.bit_length() - 1))
    writers: dict[int, pa.ipc.RecordBatchStreamWriter] = {}
    sinks: dict[int, Any] = {}
    rows_per_bucket = np.zeros(buckets, dtype=np.int64)
    schema: pa.Schema | None = None
    try:
        for table in chunks:
            if table.num_rows == 0:
                continue
            table = table.combine_chunks()
            if schema is None:
                schema = table.schema
            elif not table.schema.equals(schema):
                table = table.cast(schema)
            bucket = (key_hash(table, keys) >> shift).astype(np.int64)
            order = np.argsort(bucket, kind="stable")
            counts = np.bincount(bucket, minlength=buckets)
            rows_per_bucket += counts
            ordered = table.take(pa.array(order))
            start = 0
            for b in np.flatnonzero(counts):
                n = int(counts[b])
                if b not in writers:
                    sinks[b] = pa.OSFile(os.path.join(tmp, f"{b:05d}.arrow"), "wb")
                    writers[b] = pa.ipc.new_stream(sinks[b], schema)
                writers[b].write_table(ordered.slice(start, n))
                start += n
    finally:
        for writer in writers.values():
            writer.close()
        for sink in sinks.values():
            sink.close()
    report.largest_bucket_rows = int(rows_per_bucket.max(initial=0))
    for b in sorted(writers):
        if on_chunk is not None:
            on_chunk()
        with pa.OSFile(os.path.join(tmp, f"{b:05d}.arrow"), "rb") as fh:
            table = pa.ipc.open_stream(fh).read_all()
        _group(table, keys, report)
        del table


def _group(table: pa.Table, keys: list[str], report: UniqueKeysReport) -> None:
    report.rows += table.num_rows
    nulls = None
    for k in keys:
        is_null = pc.is_null(table[k])
        nulls = is_null if nulls is None else pc.or_(nulls, is_null)
    report.null_key_rows += int(pc.sum(nulls.cast(pa.int64())).as_py() or 0)
    counts = table.group_by(keys, use_threads=False).aggregate([([], "count_all")])
    repeated = counts.filter(pc.greater(counts["count_all"], 1))
    if repeated.num_rows:
        report.duplicate_keys += repeated.num_rows
        report.duplicate_rows += int(pc.sum(repeated["count_all"]).as_py())
        room = _MAX_EXAMPLES - len(report.examples)
        if room > 0:
            for row in repeated.slice(0, room).to_pylist():
                count = row.pop("count_all")
                report.examples.append({"key": _jsonable(row), "count": count})


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    return {
        k: v if isinstance(v, (int, float, str, bool, type(None))) else str(v)
        for k, v in row.items()
    }


# -- a vectorized 64-bit hash of key columns (bucket assignment only: collisions are harmless) ----

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_NULL_HASH = np.uint64(0x5BD1E9955BD1E995)
_PRIME = 0x100000001B3
_HASH_WINDOW_BYTES = 1 << 20


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: every input bit affects every output bit."""
    h = h ^ (h >> np.uint64(30))
    h = h * _M1
    h = h ^ (h >> np.uint64(27))
    h = h * _M2
    return h ^ (h >> np.uint64(31))


def key_hash(table: pa.Table, keys: Sequence[str]) -> np.ndarray:
    """A well-mixed uint64 hash per row of the key columns (equal keys, equal hashes)."""
    h = np.zeros(table.num_rows, dtype=np.uint64)
    for k in keys:
        column = table[k]
        array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        h = _mix(h * _GOLDEN + _column_hash(array, k))
    return h


def _column_hash(array: pa.Array, name: str) -> np.ndarray:
    t = array.type
    if pa.types.is_dictionary(t):
        array = array.dictionary_decode()
        t = array.type
    if pa.types.is_boolean(t):
        array = array.cast(pa.int8())
        t = array.type
    if pa.types.is_temporal(t) and t.bit_width in (32, 64):
        array = array.view(pa.int32() if t.bit_width == 32 else pa.int64())
        t = array.type
    if pa.types.is_integer(t):
        values = np.asarray(pc.cast(array, pa.int64(), safe=False).fill_null(0)).view(np.uint64)
    elif pa.types.is_floating(t):
        floats = np.asarray(pc.cast(array, pa.float64()).fill_null(0.0)) + 0.0  # -0.0 == 0.0
        values = floats.view(np.uint64)
    else:
        values = _bytes_hash(_as_large_binary(array, name))
    values = _mix(values.copy())
    if array.null_count:
        values[np.asarray(array.is_null())] = _NULL_HASH
    return values


def _as_large_binary(array: pa.Array, name: str) -> pa.Array:
    """Binary values as they are; anything else (strings, decimals, ...) as its text."""
    t = array.type
    try:
        if pa.types.is_large_binary(t):
            return array
        if pa.types.is_binary(t) or pa.types.is_fixed_size_binary(t):
            return array.cast(pa.large_binary())
        return array.cast(pa.large_string()).view(pa.large_binary())
    except (pa.ArrowNotImplementedError, pa.ArrowInvalid) as exc:
        raise ValueError(f"key column {name!r} of type {t} cannot be checked: {exc}") from None


def _bytes_hash(array: pa.Array) -> np.ndarray:
    """A polynomial hash of each value's bytes, vectorized over windows of the data buffer
    (about ``_HASH_WINDOW_BYTES`` at a time, so temporaries stay small for any chunk)."""
    n = len(array)
    _, offsets_buf, data_buf = array.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=np.int64)[array.offset : array.offset + n + 1]
    lengths = np.diff(offsets)
    out = lengths.astype(np.uint64) * _GOLDEN
    if data_buf is None or n == 0 or offsets[-1] == offsets[0]:
        return out
    data = np.frombuffer(data_buf, dtype=np.uint8)
    i = 0
    while i < n:
        j = int(np.searchsorted(offsets, offsets[i] + _HASH_WINDOW_BYTES, side="right")) - 1
        j = min(max(j, i + 1), n)
        window = lengths[i:j]
        nonempty = window > 0
        if nonempty.any():
            start, end = int(offsets[i]), int(offsets[j])
            values = data[start:end].astype(np.uint64)
            starts = (offsets[i:j] - start)[nonempty]
            position = np.arange(end - start, dtype=np.int64) - np.repeat(starts, window[nonempty])
            powers = np.cumprod(np.full(int(window.max()), _PRIME, dtype=np.uint64))
            sums = np.add.reduceat(values * powers[position], starts)
            hashed = out[i:j]
            hashed[nonempty] ^= sums
        i = j
    return out


# -- small helpers --------------------------------------------------------------------------------


def _positive_int(label: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{label} must be a positive integer, got {value!r}")


def _prefix(key_prefix: str | Sequence[str] | None) -> list[str]:
    if key_prefix is None:
        return []
    return [key_prefix] if isinstance(key_prefix, str) else list(key_prefix)


def _check_placeholders(
    label: str, template: str, partitions_def: dg.PartitionsDefinition | None
) -> tuple[str, ...]:
    names = tuple(_PLACEHOLDER.findall(template))
    if not names:
        return ()
    if partitions_def is None:
        raise ValueError(
            f"{label} {template!r} has placeholders {list(names)} but the asset is not "
            "partitioned: pass partitions_def"
        )
    allowed = {"partition_key"}
    if isinstance(partitions_def, dg.MultiPartitionsDefinition):
        allowed |= {d.name for d in partitions_def.partitions_defs}
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise ValueError(
            f"{label} {template!r}: unknown placeholder(s) {unknown}; use {sorted(allowed)}"
        )
    return names
