"""build_merge_asset: the factory of merge assets, checked when they are defined.

It validates every argument once (with the merge package's own validators), freezes them in a
``MergeAssetSpec``, and builds the ``AssetsDefinition``: its input (an upstream asset streamed
through its IO manager) or run config (inbox files), its asset checks, its readable definition
metadata and pool. The spec rides on the returned definition for sensors (``merge_spec_of``).

Annotations here stay real objects (no postponed evaluation): Dagster reads them at runtime.
"""

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import dagster as dg

from memsafe_dagster.datasets.merge.request import MergeRequest
from memsafe_dagster.datasets.source import is_tabular
from memsafe_dagster.datasets.stream import ChunkStream
from memsafe_dagster.iceberg_catalog import DEFAULT_CATALOG_RESOURCE_KEY
from memsafe_dagster.io_managers import TABULAR
from memsafe_dagster.merge_asset.checks import MEMORY_HEADROOM, UNIQUE_KEYS
from memsafe_dagster.merge_asset.spec import (
    PLACEHOLDER,
    MergeAssetSpec,
    attach_spec,
    definition_metadata,
    iceberg_pool_name,
    merge_pool_name,
)
from memsafe_dagster.merge_asset.step import InboxMergeConfig, MergeConfig, materialize_merge


def _is_merge_source(_context: Any, value: Any) -> bool:
    return is_tabular(value)


#: The input type of a merge asset's upstream: ``ChunkedParquetIOManager`` streams it (its
#: typing type is ``ChunkStream``); whatever else ``is_tabular`` accepts from any other IO
#: manager passes the type check too.
MergeSourceType = dg.DagsterType(
    type_check_fn=_is_merge_source,
    name="MergeSource",
    description=f"What a merge asset merges: {TABULAR}.",
    typing_type=ChunkStream,
)


def build_merge_asset(
    name: str,
    *,
    source: dg.AssetsDefinition | dg.AssetSpec | dg.AssetKey | str,
    target_path: str | None = None,
    key_columns: str | Sequence[str],
    strategy: str = "upsert",
    target_table: str | None = None,
    catalog_resource_key: str = DEFAULT_CATALOG_RESOURCE_KEY,
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

    ``storage_options`` (fsspec options) apply to the target, the inbox and a path or URL
    source; a ``dg.EnvVar`` value is read when the run starts (and at every sensor tick),
    never at definition time, and no option is written into metadata.

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

    Iceberg: ``target_table="namespace.table"`` instead of ``target_path`` merges into that
    table of the ``IcebergCatalogResource`` under ``catalog_resource_key`` (default
    ``"iceberg_catalog"``), one snapshot per run (``merge_iceberg``); placeholders work as in
    ``target_path``. The materialization records ``memsafe/iceberg_snapshot_id`` and
    ``dagster/table_name``, and the snapshot summary the Dagster run id. The ``unique_keys``
    check is not defined for Iceberg targets (``check_unique_keys`` is ignored); concurrent
    writers are kept apart by Iceberg's optimistic commits, the pool by Dagster.
    """
    request = MergeRequest.create(
        strategy=strategy,
        key_columns=key_columns,
        on_duplicate_keys=on_duplicate_keys,
        merge_chunk_size_rows=merge_chunk_size_rows,
        enable_streaming_merge=enable_streaming_merge,
        options=merge_options,
    )
    keys = request.keys
    if target_table is not None:
        _check_target_table(target_path, target_table, catalog_resource_key)
        check_unique_keys = False
    elif not isinstance(target_path, str) or not target_path:
        raise ValueError(f"target_path must be a path or URL, got {target_path!r}")
    for label, value in (
        ("min_headroom_mb", min_headroom_mb),
        ("check_memory_mb", check_memory_mb),
    ):
        if value is not None and (not isinstance(value, (int, float)) or value <= 0):
            raise ValueError(f"{label} must be a positive number of MB, got {value!r}")

    inbox, upstream, partitions_def = _source(name, source, partitions_def)
    if target_table is not None:
        placeholders = _check_placeholders("target_table", target_table, partitions_def)
    else:
        placeholders = _check_placeholders("target_path", target_path, partitions_def)
    if inbox is not None:
        placeholders += _check_placeholders("source (inbox)", inbox, partitions_def)
    spec = MergeAssetSpec(
        key=dg.AssetKey([*_prefix(key_prefix), name]),
        target_path=target_path or "",
        request=request,
        memory_resource_key=memory_resource_key,
        storage_options=dict(storage_options or {}),
        inbox=inbox,
        inbox_pattern=inbox_pattern,
        placeholders=tuple(dict.fromkeys(placeholders)),
        check_unique_keys=check_unique_keys,
        min_headroom_mb=min_headroom_mb,
        check_memory_mb=check_memory_mb,
        pool=pool
        if pool is not None
        else (
            iceberg_pool_name(catalog_resource_key, target_table)
            if target_table is not None
            else merge_pool_name(target_path, storage_options)  # type: ignore[arg-type]
        ),
        upstream=upstream,
        target_table=target_table,
        catalog_resource_key=catalog_resource_key if target_table is not None else None,
    )
    target_name = target_table if target_table is not None else target_path
    what = f"{inbox} (inbox, {inbox_pattern})" if inbox else upstream.to_user_string()
    common: dict[str, Any] = {
        "name": name,
        "key_prefix": key_prefix,
        "partitions_def": partitions_def,
        "required_resource_keys": {memory_resource_key}
        | ({catalog_resource_key} if target_table is not None else set()),
        "check_specs": _check_specs(spec, partitions_def),
        "metadata": definition_metadata(spec),
        "pool": spec.pool,
        "retry_policy": retry_policy,
        "group_name": group_name,
        "tags": dict(tags) if tags else None,
        "owners": list(owners) if owners else None,
        "kinds": {"iceberg"} if target_table is not None else {"parquet"},
        "description": description
        or f"{strategy} of {what} into {target_name} by {', '.join(keys)} (memsafe merge).",
    }

    if inbox is not None:

        def merge_inbox(context: dg.AssetExecutionContext, config: InboxMergeConfig):
            return materialize_merge(
                context, spec, config.merge_chunk_size_rows, files=config.files
            )

        return attach_spec(dg.asset(**common)(merge_inbox), spec)

    ins = {
        "source": dg.AssetIn(
            key=upstream,
            metadata=dict(input_metadata) if input_metadata else None,
            partition_mapping=partition_mapping,
            dagster_type=MergeSourceType,
        )
    }

    def merge_upstream(context: dg.AssetExecutionContext, config: MergeConfig, source):
        return materialize_merge(context, spec, config.merge_chunk_size_rows, data=source)

    return attach_spec(dg.asset(ins=ins, **common)(merge_upstream), spec)


def _source(
    name: str,
    source: dg.AssetsDefinition | dg.AssetSpec | dg.AssetKey | str,
    partitions_def: dg.PartitionsDefinition | None,
) -> tuple[str | None, dg.AssetKey | None, dg.PartitionsDefinition | None]:
    """(inbox URL, upstream key, partitions) of ``source``; partitions default to the
    upstream's."""
    if isinstance(source, str):
        return source, None, partitions_def
    if isinstance(source, dg.AssetsDefinition):
        if len(source.keys) != 1:
            raise ValueError(
                f"source {name!r}: an AssetsDefinition with {len(source.keys)} assets; pass the "
                "AssetKey of the one to merge"
            )
        return None, source.key, _or(partitions_def, source.partitions_def)
    if isinstance(source, dg.AssetSpec):
        return None, source.key, _or(partitions_def, source.partitions_def)
    if isinstance(source, dg.AssetKey):
        return None, source, partitions_def
    raise TypeError(
        "source must be an upstream AssetsDefinition, AssetSpec or AssetKey, or the URL of "
        f"an inbox of Parquet files; got {type(source).__name__}"
    )


def _check_target_table(
    target_path: str | None, target_table: object, catalog_resource_key: object
) -> None:
    """``target_table`` names an Iceberg table (instead of, not beside, a target path)."""
    if target_path is not None:
        raise ValueError(
            "pass target_path (a Parquet dataset) or target_table (an Iceberg table), not both"
        )
    if not isinstance(target_table, str) or "." not in target_table.strip("."):
        raise ValueError(
            f"target_table must be an Iceberg table identifier 'namespace.table', got "
            f"{target_table!r}"
        )
    if not isinstance(catalog_resource_key, str) or not catalog_resource_key:
        raise ValueError(f"catalog_resource_key must name a resource, got {catalog_resource_key!r}")


def _or(
    given: dg.PartitionsDefinition | None, upstream: dg.PartitionsDefinition | None
) -> dg.PartitionsDefinition | None:
    return given if given is not None else upstream


def _check_specs(
    spec: MergeAssetSpec, partitions_def: dg.PartitionsDefinition | None
) -> list[dg.AssetCheckSpec]:
    """``unique_keys`` (unless switched off) and ``memory_headroom``.

    A partitioned asset's checks carry its partitions: Dagster then records each evaluation
    for the run's partition. Without them it plans the check for the partition but records the
    evaluation for none, and the plan stays a phantom "Skipped" record in the check history.
    """
    described = []
    if spec.check_unique_keys:
        keys = ", ".join(spec.key_columns)
        described.append((UNIQUE_KEYS, f"Every key ({keys}) occurs once in the target."))
    described.append(
        (MEMORY_HEADROOM, "Warns when the merge's peak RSS came close to the memory limit.")
    )
    with warnings.catch_warnings():
        # partitions_def on an AssetCheckSpec is marked preview; it is the documented way.
        warnings.simplefilter("ignore", dg.PreviewWarning)
        return [
            dg.AssetCheckSpec(
                name, asset=spec.key, description=description, partitions_def=partitions_def
            )
            for name, description in described
        ]


def _prefix(key_prefix: str | Sequence[str] | None) -> list[str]:
    if key_prefix is None:
        return []
    return [key_prefix] if isinstance(key_prefix, str) else list(key_prefix)


def _check_placeholders(
    label: str, template: str, partitions_def: dg.PartitionsDefinition | None
) -> tuple[str, ...]:
    """The placeholders of ``template``, each of which the partitions must be able to fill."""
    names = tuple(PLACEHOLDER.findall(template))
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
