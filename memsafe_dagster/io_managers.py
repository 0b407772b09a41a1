"""ChunkedParquetIOManager: assets as Parquet dataset directories, written and read chunk by chunk.

Outputs (``pa.Table``, ``RecordBatch``, ``RecordBatchReader``, ``pyarrow.dataset.Dataset``,
``ChunkStream``) are streamed into ``<base_path>/<asset key>/[<partition>/]`` under memory
pressure checks, staged and published atomically (a failed step leaves the previous version,
never a partial one). Inputs are loaded by their annotation: ``Dataset`` (lazy),
``RecordBatchReader``, ``ChunkStream`` (adaptive chunks) or ``pa.Table`` (refused when it would
not fit the memory budget). Dagster treats values an asset yields as events and cannot resolve
``Iterator[...]`` annotations, so a streaming asset returns a ``ChunkStream``::

    @asset(io_manager_key="io_manager")
    def cleaned(raw: ChunkStream) -> ChunkStream:
        return ChunkStream.from_batches(t.filter(pc.field("amount") > 0) for t in raw)

Input metadata (``AssetIn(metadata=...)``): ``columns`` (a list of names) and ``filter`` are
pushed down into the scan. ``filter`` is a list of ``(column, op, value)`` tuples in the
disjunctive normal form of ``pyarrow.parquet``'s ``filters`` (``[("x", ">", 0)]`` is a
conjunction, ``[[...], [...]]`` a disjunction of conjunctions; ops ``= == != < > <= >= in
not in``): Dagster records input metadata in its event log, so it must be plain data, and
this form is. A ``pyarrow.compute.Expression`` is accepted too where the metadata never
reaches the event log (direct ``load_input`` calls).

EMERGENCY while a loaded ``ChunkStream`` / ``RecordBatchReader`` is consumed, whether by a
returned stream (the idiom above) or by an asset body that drains it itself, fails the step
with the memsafe ``dagster.Failure`` and the figures as they stood. Every stream gets at most
one adaptive sizer, on the memory resource's monitor: a loaded stream that an asset returns as
it is is written with the sizer it was loaded with.

What counts as tabular data (what this IO manager writes and what a merge asset merges) is
``datasets.source.is_tabular``, the package's one answer.

Iceberg inputs: an input is an Iceberg table when its ``AssetIn`` metadata or the upstream
asset's definition metadata names one under ``memsafe/iceberg_table`` ("namespace.table"; a
merge asset built with ``target_table`` names its table itself, as ``memsafe/target_table``).
It is read through the ``iceberg_catalog`` resource as a snapshot's data files (the current
snapshot, or ``memsafe/iceberg_snapshot_id`` from the input metadata), under any of the
annotations above, ``columns`` and ``filter`` included; the whole table, whatever partitions
the input maps to.
"""

import math
import os
import sys
import types
import typing
import warnings
import weakref
from collections.abc import Mapping, Sequence
from typing import Any, get_args, get_origin

import dagster as dg
import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from dagster import InitResourceContext, InputContext, OutputContext, UPathIOManager
from pydantic import Field, PrivateAttr, model_validator

from memsafe_dagster import metadata as md
from memsafe_dagster.datasets.chunks import process_in_chunks
from memsafe_dagster.datasets.filesystem import (
    env_reference,
    options_for,
)
from memsafe_dagster.datasets.parquet import check_compression
from memsafe_dagster.datasets.snapshot import Snapshot, as_dataset, snapshot
from memsafe_dagster.datasets.source import is_tabular
from memsafe_dagster.datasets.stream import ChunkStream
from memsafe_dagster.datasets.writer import ChunkedParquetWriter
from memsafe_dagster.iceberg_catalog import IcebergCatalogResource
from memsafe_dagster.memory import MemoryMonitor, MemoryPressureError
from memsafe_dagster.memory.sizes import MiB
from memsafe_dagster.resources import MemoryMonitorResource

DATASET, READER, STREAM, TABLE = "Dataset", "RecordBatchReader", "ChunkStream", "Table"
STREAMING_ANNOTATIONS = (
    "pyarrow.dataset.Dataset (lazy), pyarrow.RecordBatchReader or "
    "memsafe_dagster.datasets.ChunkStream"
)
FILES = "memsafe/files"
ICEBERG_TABLE = "memsafe/iceberg_table"
ICEBERG_SNAPSHOT_ID = "memsafe/iceberg_snapshot_id"
_MERGE_TARGET_TABLE = "memsafe/target_table"  # what a merge asset with target_table records
ESTIMATED_MB = "memsafe/estimated_mb"
TABULAR = (
    "pa.Table, pa.RecordBatch, pa.RecordBatchReader, pyarrow.dataset.Dataset, ChunkStream "
    "or a list of RecordBatch/Table"
)


class ChunkedParquetIOManager(dg.ConfigurableIOManager, UPathIOManager):
    """Parquet dataset directories per asset (and partition), streamed in bounded memory.

    Every output records ``dagster/row_count``, ``dagster/column_schema``, the memsafe/*
    figures of the step (peaks, pressure, limit, headroom, chunks) and ``path``. At EMERGENCY
    pressure the step fails with the memsafe ``dagster.Failure`` and nothing is published.
    Under a ``RetryPolicy`` the n-th retry streams with ``chunk_size_rows // 2**n``.
    """

    base_path: str | None = Field(
        default=None,
        description="Base directory, any fsspec URL (default: the instance's storage directory).",
    )
    # ``storage_options`` in config and in the constructor; the Python attribute has another
    # name because UPathIOManager owns a ``storage_options`` property (the base path's options).
    configured_storage_options: dict[str, Any] = Field(
        default_factory=dict,
        alias="storage_options",
        description=(
            "fsspec storage options for base_path (endpoint, region, ...); values may be "
            "dg.EnvVar, read when the run starts (credentials: dg.EnvVar or the environment)."
        ),
    )
    filesystem_options: dict[str, Any] | None = Field(
        default=None, description="Deprecated name of storage_options."
    )
    chunk_size_rows: int = Field(
        default=100_000, description="Rows per chunk when writing and streaming inputs."
    )
    compression: str = Field(default="zstd", description="Parquet compression codec.")
    row_group_size: int | None = Field(
        default=None, description="Rows per Parquet row group (default: one per chunk)."
    )
    max_rows_per_file: int | None = Field(
        default=None, description="Roll to a new file after this many rows (default: one file)."
    )
    adaptive: bool = Field(
        default=True, description="Shrink chunks under memory pressure, grow them back when calm."
    )
    memory: MemoryMonitorResource | None = Field(
        default=None,
        description="The memory budget (default: MemoryMonitorResource(), container profile).",
    )
    iceberg_catalog: IcebergCatalogResource | None = Field(
        default=None,
        description="The catalog of Iceberg inputs (memsafe/iceberg_table metadata).",
    )

    _base_path: Any = PrivateAttr(default=None)
    _memory: MemoryMonitorResource | None = PrivateAttr(default=None)
    # Streams this IO manager loaded: each already has its sizer, so writing one adds none.
    _sized: weakref.WeakSet = PrivateAttr(default_factory=weakref.WeakSet)

    @model_validator(mode="before")
    @classmethod
    def _validate_config(cls, data: Any) -> Any:
        # Raw values: an EnvVar is a placeholder until the run resolves it and validates again.
        if not isinstance(data, Mapping):
            return data
        data = _storage_options_alias(data)
        for name in ("chunk_size_rows", "row_group_size", "max_rows_per_file"):
            value = data.get(name)
            if value is None or hasattr(value, "env_var_name"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(
                    f"ChunkedParquetIOManager.{name} must be a positive integer, got {value!r}"
                )
        compression = data.get("compression")
        if compression is not None and not hasattr(compression, "env_var_name"):
            check_compression(compression, None)
        return data

    def setup_for_execution(self, context: InitResourceContext) -> None:
        from upath import UPath

        if self.base_path is not None:
            protocol = fsspec.core.split_protocol(self.base_path)[0]
            options = options_for(protocol, self.configured_storage_options)
            self._base_path = UPath(self.base_path, **options)
        else:
            instance = context.instance
            if instance is None:
                raise ValueError(
                    "ChunkedParquetIOManager needs base_path when no Dagster instance is at hand"
                )
            self._base_path = UPath(instance.storage_directory())
        self._memory = self.memory if self.memory is not None else MemoryMonitorResource()

    @property
    def storage_options(self) -> dict[str, Any]:
        """The fsspec options of ``base_path`` as its filesystem is built (environment
        references read), as ``UPathIOManager.storage_options`` promises."""
        if self._base_path is not None:
            return dict(getattr(self._base_path, "storage_options", None) or {})
        protocol = fsspec.core.split_protocol(self.base_path or "")[0]
        return options_for(protocol, self.configured_storage_options)

    # -- paths --------------------------------------------------------------------------------

    def make_safe_partition_path(self, base_path: Any, partition: str) -> Any:
        # A partition key stays below the asset's directory: a leading "/" and ".." segments
        # are escaped, as Dagster's own filesystem IO manager does.
        if partition.startswith("/"):
            partition = "%2F" + partition[1:]
        return base_path / "/".join("%2E%2E" if p == ".." else p for p in partition.split("/"))

    @property
    def memory_resource(self) -> MemoryMonitorResource:
        if self._memory is None:
            self._memory = self.memory if self.memory is not None else MemoryMonitorResource()
        return self._memory

    # -- writing ------------------------------------------------------------------------------

    def dump_to_path(self, context: OutputContext, obj: Any, path: Any) -> None:
        if obj is None:
            context.log.warning(
                f"memsafe: output {context.name} is None; nothing written to {path}"
            )
            return
        _check_writable(obj, context)
        retry = retry_number(context)
        chunk_rows = max(1, self.chunk_size_rows // 2**retry)
        stage = f"writing {_what(context)} to {path} (chunk_size_rows={chunk_rows}, retry {retry})"
        partitioned = context.has_asset_partitions
        with self.memory_resource.track(context, stage=stage, record=False) as tracker:
            tracker.extra.update({md.CHUNK_SIZE_ROWS: chunk_rows, md.RETRY_NUMBER: retry})
            stream = self._output_stream(obj, chunk_rows, context)
            files = self._write(stream, path)
            tracker.chunks = stream.stats.chunks
        context.add_output_metadata(
            md.for_ui(
                {
                    **tracker.metadata,
                    **md.stream_metadata(stream.stats),
                    **md.table_metadata(stream.schema, stream.stats.rows, partitioned=partitioned),
                    FILES: dg.MetadataValue.int(files),
                }
            )
        )

    def _output_stream(self, obj: Any, chunk_rows: int, context: OutputContext) -> ChunkStream:
        """``obj`` as a stream with one adaptive sizer on the memory resource's monitor: a
        stream this IO manager loaded has it already, anything else gets it here."""
        if isinstance(obj, ChunkStream) and obj in self._sized:
            if obj.consumed:
                raise ValueError(
                    f"output {context.name!r}: this ChunkStream was already iterated (streams "
                    "are single-pass)"
                )
            return obj
        return process_in_chunks(
            obj if not isinstance(obj, (list, tuple)) else iter(obj),
            chunk_size_rows=chunk_rows,
            memory_monitor=self.memory_resource.get_monitor(),
            adaptive=self.adaptive,
        )

    def _write(self, stream: ChunkStream, path: Any) -> int:
        """Stream every chunk into new files of the dataset directory; one commit swaps them
        for the previous version (an exception leaves the previous version untouched)."""
        with ChunkedParquetWriter.to_dataset(
            path.path,
            mode="overwrite",
            filesystem=path.fs,
            schema=stream.schema,
            compression=self.compression,
            row_group_size=self.row_group_size,
            max_rows_per_file=self.max_rows_per_file,
        ) as writer:
            for chunk in stream:
                writer.write(chunk)
        return len(writer.files)

    # -- loading ------------------------------------------------------------------------------

    def load_input(self, context: InputContext) -> Any:
        kind, as_dict = resolve_annotation(context)
        iceberg = iceberg_input(context)
        if iceberg is not None:
            return self._load_iceberg(context, kind, as_dict, *iceberg)
        if not context.has_asset_key or not context.has_asset_partitions:
            if as_dict:
                raise TypeError(
                    f"input {context.name!r} is annotated {_type_name(context)} (one entry per "
                    "partition) but the upstream asset is not partitioned"
                )
            return self.load_from_path(context, self._get_path(context))
        keys = list(context.asset_partition_keys)
        if not keys:
            return None
        paths = self._get_paths_for_partitions(context)
        allow_missing = bool(
            (context.definition_metadata or {}).get("allow_missing_partitions", False)
        )
        found: dict[str, Snapshot] = {}
        for key in keys:
            path = paths[key]
            snap = snapshot(path.fs, path.path)  # before or after a concurrent commit
            if not snap.files:
                if allow_missing:
                    context.log.warning(self.get_missing_partition_log_message(key))
                    continue
                raise FileNotFoundError(
                    f"partition {key} of {_what(context)} has no data at {path}: "
                    "materialize it first (or set allow_missing_partitions in the input metadata)"
                )
            found[key] = snap
        if as_dict:
            return {key: self._load(context, kind, [snap]) for key, snap in found.items()}
        return self._load(context, kind, list(found.values()))

    def load_from_path(self, context: InputContext, path: Any) -> Any:
        kind, _ = resolve_annotation(context)
        snap = snapshot(path.fs, path.path)  # before or after a concurrent commit
        if not snap.files:
            raise FileNotFoundError(f"{_what(context)} has no data at {path}: materialize it first")
        return self._load(context, kind, [snap])

    def _load_iceberg(
        self,
        context: InputContext,
        kind: str,
        as_dict: bool,
        identifier: str,
        snapshot_id: int | None,
    ) -> Any:
        """An Iceberg table's snapshot as the annotation asks (see the module docstring)."""
        if as_dict:
            raise TypeError(
                f"input {context.name!r} is the Iceberg table {identifier}, one table for every "
                "partition: annotate it as one of pyarrow.dataset.Dataset, RecordBatchReader, "
                "ChunkStream or pyarrow.Table, not a dict per partition"
            )
        if self.iceberg_catalog is None:
            raise ValueError(
                f"input {context.name!r} is the Iceberg table {identifier}: give "
                "ChunkedParquetIOManager an iceberg_catalog=IcebergCatalogResource(...) to read it"
            )
        from memsafe_dagster.datasets.iceberg.read import iceberg_dataset

        table = self.iceberg_catalog.load_table(identifier)
        return self._load_dataset(context, kind, iceberg_dataset(table, snapshot_id=snapshot_id))

    def _load(self, context: InputContext, kind: str, snapshots: list[Snapshot]) -> Any:
        """The snapshots' files as one dataset, opened where each file is now."""
        return self._load_dataset(context, kind, as_dataset(snapshots))

    def _load_dataset(self, context: InputContext, kind: str, dataset: ds.Dataset) -> Any:
        definition = context.definition_metadata or {}
        columns = _columns(definition.get("columns"))
        row_filter = to_expression(definition.get("filter"))
        retry = retry_number(context)
        chunk_rows = max(1, self.chunk_size_rows // 2**retry)
        stage = f"loading input {context.name!r} from {_what(context)}"
        if kind == DATASET:
            return _project(dataset, columns, row_filter)
        if kind == TABLE:
            return self._load_table(context, dataset, columns, row_filter, stage)
        monitor = self.memory_resource.get_monitor()
        stream = process_in_chunks(
            dataset,
            chunk_size_rows=chunk_rows,
            memory_monitor=monitor,
            adaptive=self.adaptive,
            columns=columns,
            filter=row_filter,
        )

        def as_failure(exc: BaseException) -> BaseException | None:
            # The asset body drains this stream itself: EMERGENCY still fails the step with
            # the memsafe Failure and its figures, not a bare MemoryPressureError.
            if isinstance(exc, MemoryPressureError):
                return md.pressure_failure(f"{stage} (consumed by the asset)", monitor)
            return None

        stream.add_hooks(on_error=as_failure)
        self._sized.add(stream)
        if kind == READER:
            return stream.to_reader()
        return stream

    def _load_table(
        self,
        context: InputContext,
        dataset: ds.Dataset,
        columns: list[str] | None,
        row_filter: pc.Expression | None,
        stage: str,
    ) -> pa.Table:
        monitor = self.memory_resource.get_monitor()
        estimate = estimate_table_bytes(dataset, columns, row_filter)
        room = headroom_bytes(monitor)
        if estimate > room:
            raise dg.Failure(
                description=(
                    f"memsafe: input {context.name!r} from {_what(context)} would take about "
                    f"{estimate / MiB:.1f} MB in memory as a pa.Table, but only "
                    f"{max(room, 0) / MiB:.1f} MB of the memory budget is left. Annotate the "
                    f"input as {STREAMING_ANNOTATIONS} to stream it in chunks, narrow it with "
                    "the 'columns' / 'filter' input metadata, or raise the budget."
                ),
                metadata={
                    **md.memory_metadata(monitor),
                    **md.budgets_metadata(monitor),
                    ESTIMATED_MB: round(estimate / MiB, 2),
                    "memsafe/available_budget_mb": round(room / MiB, 2),
                    md.STAGE: stage,
                },
                allow_retries=False,
            )
        try:
            return dataset.to_table(
                columns=columns, filter=row_filter, batch_readahead=1, fragment_readahead=1
            )
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise ValueError(f"input {context.name!r}: columns/filter: {exc}") from None


# -- helpers ----------------------------------------------------------------------------------


def _canonical(value: Any) -> Any:
    """``value`` with every environment reference as ``("env", NAME)``: Dagster keeps an
    ``EnvVar`` as ``{"env": NAME}`` once it has processed the config."""
    name = env_reference(value)
    if name is not None:
        return ("env", name)
    if isinstance(value, Mapping):
        return {k: _canonical(v) for k, v in value.items()}
    return value


def _caller_stacklevel() -> int:
    """The ``stacklevel`` of the first frame outside Dagster, pydantic and this module: the
    code that built the IO manager."""
    here = _storage_options_alias.__code__.co_filename
    level, frame = 2, sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        inside = name == here or any(
            f"{os.sep}{package}{os.sep}" in name for package in ("dagster", "pydantic")
        )
        if not inside:
            return level
        frame, level = frame.f_back, level + 1
    return 2


def _storage_options_alias(data: Mapping[str, Any]) -> Mapping[str, Any]:
    """``filesystem_options`` (the deprecated name) moved to ``storage_options``, with a
    DeprecationWarning; both at once is a ValueError."""
    old = data.get("filesystem_options")
    if not old:  # unset (Dagster passes an empty mapping for it when it builds the resource)
        return {k: v for k, v in data.items() if k != "filesystem_options"}
    out = {k: v for k, v in data.items() if k != "filesystem_options"}
    given = data.get("storage_options")
    if given:
        mine, theirs = _canonical(given), _canonical(old)
        if all(k in mine and mine[k] == v for k, v in theirs.items()):
            # Dagster rebuilding the resource: the alias was moved when it was first built
            # (the value Dagster kept of it may have lost entries, never gained any).
            return out
        raise ValueError(
            "ChunkedParquetIOManager: give storage_options only (filesystem_options is its "
            "deprecated name, and both were given)"
        )
    warnings.warn(
        "ChunkedParquetIOManager(filesystem_options=...) is deprecated: use storage_options=",
        DeprecationWarning,
        stacklevel=_caller_stacklevel(),
    )
    out["storage_options"] = old
    return out


def iceberg_input(context: InputContext) -> tuple[str, int | None] | None:
    """(table identifier, snapshot id or None) when the input is an Iceberg table."""
    own = context.definition_metadata or {}
    identifier = own.get(ICEBERG_TABLE)
    if identifier is None:
        upstream = getattr(context, "upstream_output", None)
        theirs = (upstream.definition_metadata or {}) if upstream is not None else {}
        identifier = theirs.get(ICEBERG_TABLE) or theirs.get(_MERGE_TARGET_TABLE)
    if identifier is None:
        return None
    identifier = getattr(identifier, "value", identifier)  # a MetadataValue from the spec
    if not isinstance(identifier, str) or "{" in identifier:
        raise ValueError(
            f"input {context.name!r}: {identifier!r} is not one Iceberg table identifier "
            "'namespace.table' (a table per partition is read by naming it in the input's "
            f"{ICEBERG_TABLE!r} metadata)"
        )
    snapshot = own.get(ICEBERG_SNAPSHOT_ID)
    snapshot = getattr(snapshot, "value", snapshot)
    return identifier, None if snapshot is None else int(snapshot)


def retry_number(context: InputContext | OutputContext) -> int:
    """How many attempts of the running step came before this one (0 outside a run)."""
    try:
        return int(context.step_context.previous_attempt_count)
    except (dg.DagsterInvariantViolationError, AttributeError):
        return 0


def resolve_annotation(context: InputContext) -> tuple[str, bool]:
    """(what to load, one entry per partition?) from the input's type annotation."""
    typing_type = _typing_type(context)
    as_dict = False
    origin = get_origin(typing_type)
    if origin in (dict, Mapping, typing.Dict, typing.Mapping):  # noqa: UP006
        args = get_args(typing_type)
        typing_type = args[1] if len(args) == 2 else Any
        as_dict = True
    typing_type = _unwrap_optional(typing_type)
    kind = _kind(typing_type)
    if kind is None:
        raise TypeError(
            f"ChunkedParquetIOManager cannot load input {context.name!r} annotated "
            f"{_type_name(context)}: annotate it as pyarrow.dataset.Dataset, "
            "pyarrow.RecordBatchReader, memsafe_dagster.datasets.ChunkStream or pyarrow.Table "
            "(or dict[str, one of them] for one entry per partition)"
        )
    return kind, as_dict


def _typing_type(context: InputContext) -> Any:
    try:
        return context.dagster_type.typing_type
    except dg.DagsterInvariantViolationError:
        return Any


def _unwrap_optional(typing_type: Any) -> Any:
    args = get_args(typing_type)
    if get_origin(typing_type) in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return typing_type


def _kind(typing_type: Any) -> str | None:
    if typing_type in (Any, object, None, type(None)):
        return DATASET  # lazy: the safe default when nothing is asked for
    if not isinstance(typing_type, type):
        return None
    if issubclass(typing_type, ds.Dataset):
        return DATASET
    if issubclass(typing_type, ChunkStream):
        return STREAM
    if issubclass(typing_type, pa.RecordBatchReader):
        return READER
    if issubclass(typing_type, pa.Table):
        return TABLE
    return None


def _type_name(context: InputContext) -> str:
    typing_type = _typing_type(context)
    return getattr(typing_type, "__name__", None) or repr(typing_type)


def _what(context: InputContext | OutputContext) -> str:
    try:
        if context.has_asset_key:
            what = f"asset {context.asset_key.to_user_string()}"
            if context.has_asset_partitions:
                keys = context.asset_partition_keys
                what += f" partition {keys[0]}" if len(keys) == 1 else f" ({len(keys)} partitions)"
            return what
    except dg.DagsterInvariantViolationError:
        pass
    return f"output {'/'.join(context.get_identifier())}"


def _check_writable(obj: Any, context: OutputContext) -> None:
    if is_tabular(obj):
        return
    raise TypeError(
        f"ChunkedParquetIOManager cannot write output {context.name!r} of type "
        f"{type(obj).__name__}: return {TABULAR}. A generator must be wrapped in "
        "ChunkStream.from_batches(...) (Dagster treats yielded values as events)."
    )


def _columns(value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ValueError(f"input metadata 'columns' must be a list of column names, got {value!r}")
    columns = list(value)
    if not columns or not all(isinstance(c, str) for c in columns):
        raise ValueError(f"input metadata 'columns' must be a list of column names, got {value!r}")
    return columns


def to_expression(value: Any) -> pc.Expression | None:
    """An input's ``filter`` metadata as a PyArrow expression (see the module docstring)."""
    if value is None or isinstance(value, pc.Expression):
        return value
    if isinstance(value, (list, tuple)) and value:
        normalized = _normalize_dnf(value)
        try:
            return pq.filters_to_expression(normalized)
        except (TypeError, ValueError, pa.ArrowInvalid) as exc:
            raise ValueError(f"input metadata 'filter' {value!r}: {exc}") from None
    raise ValueError(
        "input metadata 'filter' must be a non-empty list of (column, op, value) tuples, e.g. "
        f"[('amount', '>', 0)], or [[...], [...]] for OR; got {value!r}"
    )


def _normalize_dnf(value: Sequence[Any]) -> list[Any]:
    """Tuples from lists (Dagster's event log turns tuples into lists)."""

    def predicate(item: Any) -> tuple:
        if not isinstance(item, (list, tuple)) or len(item) != 3 or not isinstance(item[0], str):
            raise ValueError(
                f"input metadata 'filter': {item!r} is not a (column, op, value) predicate"
            )
        column, op, operand = item
        if isinstance(operand, list):
            operand = tuple(operand) if op in ("in", "not in") else operand
        return (column, op, operand)

    first = value[0]
    is_predicate = (
        isinstance(first, (list, tuple)) and len(first) == 3 and isinstance(first[0], str)
    )
    if is_predicate:
        return [predicate(p) for p in value]
    return [[predicate(p) for p in conjunction] for conjunction in value]


def _project(
    dataset: ds.Dataset, columns: list[str] | None, row_filter: pc.Expression | None
) -> ds.Dataset:
    """A lazy dataset restricted to ``columns`` and ``row_filter`` (nothing read yet)."""
    if columns is not None:
        missing = [c for c in columns if dataset.schema.get_field_index(c) < 0]
        if missing:
            raise ValueError(
                f"input metadata 'columns': {missing} not in the dataset "
                f"(it has {dataset.schema.names})"
            )
        dataset = dataset.replace_schema(pa.schema([dataset.schema.field(c) for c in columns]))
    if row_filter is not None:
        try:
            dataset.scanner(filter=row_filter, batch_readahead=1, fragment_readahead=1)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise ValueError(
                f"input metadata 'filter' does not apply to this Dataset ({exc}); for a Dataset "
                "input, the filter's columns must be among 'columns'"
            ) from None
        dataset = dataset.filter(row_filter)
    return dataset


def estimate_table_bytes(
    dataset: ds.Dataset, columns: list[str] | None, row_filter: pc.Expression | None
) -> int:
    """In-memory size of ``dataset.to_table(columns, filter)``, from Parquet metadata.

    Uses each row group's uncompressed size of the selected columns; with a filter, scales
    by the fraction of rows that pass it (counted, reading only the filter's columns).
    """
    wanted = set(columns) if columns is not None else None
    total_bytes = 0
    total_rows = 0
    for fragment in dataset.get_fragments():
        meta = fragment.metadata
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            total_rows += group.num_rows
            for c in range(group.num_columns):
                column = group.column(c)
                top = column.path_in_schema.split(".", 1)[0]
                if wanted is None or top in wanted:
                    total_bytes += column.total_uncompressed_size
    if row_filter is None or total_rows == 0:
        return total_bytes
    kept = dataset.count_rows(filter=row_filter, batch_readahead=1, fragment_readahead=1)
    return math.ceil(total_bytes * kept / total_rows)


def headroom_bytes(monitor: MemoryMonitor) -> int:
    """What may still be allocated before any signal reaches EMERGENCY."""
    reading = monitor.read()
    rooms = [int(monitor.max_pyarrow_mb * MiB) - reading.pyarrow_bytes]
    if monitor.max_process_memory_mb:
        rooms.append(int(monitor.max_process_memory_mb * MiB) - reading.rss_bytes)
    if reading.available_bytes is not None:
        rooms.append(reading.available_bytes - int(monitor.min_system_available_mb * MiB))
    return min(rooms)
