"""IcebergTarget: the merge engine's ``MergeTarget`` for an Iceberg table.

- ``load``: the current snapshot's data files from its manifests (paths, record counts, key
  bounds). Footers are read lazily (``IcebergFile``): a file whose manifest bounds hold no
  source key is pruned without its footer ever being read; the others get row-group pruning
  from their footers as any Parquet target does. The schema is the table's, as Arrow with the
  Parquet field ids, so every file the engine writes is a valid Iceberg data file.
- ``new_file``: a path under the table's data location (its location provider decides, so
  ``write.data.path`` and object-store layouts are honoured).
- ``commit``: ONE snapshot through one pyiceberg snapshot producer: the replaced files are
  deleted and the new ones appended (an ``overwrite``; an ``append`` when nothing is removed),
  the summary carries the merge's counts under ``memsafe.*``. Conflicts are detected by the
  catalog (the snapshot's parent must still be the branch head) and, on pyiceberg's automatic
  retry, by serializable validation against every commit since the merge read the table: any
  data file added or removed concurrently is a conflict, so no update is ever lost.
- leaving ``open`` without a commit deletes every data file the merge wrote. When the
  catalog's answer is unknown (a connection lost mid-commit) the files are kept: they may be
  referenced. Files a killed process leaves are removed by ``remove_orphan_files``.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.fs as pafs

from memsafe_dagster.datasets.commit import crash_point
from memsafe_dagster.datasets.iceberg.catalog import table_name
from memsafe_dagster.datasets.iceberg.result import IcebergCommitConflictError
from memsafe_dagster.datasets.iceberg.snapshot import check_mergeable, live_data_files
from memsafe_dagster.datasets.iceberg.storage import TableStorage
from memsafe_dagster.datasets.keys import exact_code_of
from memsafe_dagster.datasets.merge.options import MergeOptions
from memsafe_dagster.datasets.merge.target import Bound, TargetDataset, TargetFile, target_file
from memsafe_dagster.datasets.merge.validate import target_fields_check

if TYPE_CHECKING:
    from pyiceberg.manifest import DataFile
    from pyiceberg.schema import Schema
    from pyiceberg.table import Table

log = logging.getLogger(__name__)

SUMMARY_PREFIX = "memsafe."
MERGE_ID = SUMMARY_PREFIX + "merge-id"


class IcebergTarget:
    """An Iceberg table as a merge target (see the module docstring)."""

    def __init__(self, table: Table, snapshot_properties: dict[str, str] | None = None) -> None:
        self.table = table
        self.storage = TableStorage(table)
        self.fs = self.storage.fs
        self.afs = self.storage.afs
        self.name = f"Iceberg table {table_name(table)}"
        self.snapshot_properties = dict(snapshot_properties or {})
        self.last_write: IcebergWrite | None = None

    def check(self) -> None:
        check_mergeable(self.table)

    @contextlib.contextmanager
    def open(self, operation: str, options: MergeOptions) -> Iterator[IcebergWrite]:
        write = IcebergWrite(self)
        self.last_write = write
        try:
            yield write
        finally:
            write.discard()


class IcebergWrite:
    """One merge's write into an Iceberg table: a ``TargetWrite``."""

    def __init__(self, target: IcebergTarget) -> None:
        self.target = target
        self.table = target.table
        self.txn = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:12]}"
        self.spill_base: str | None = None
        self.state = "open"  # then "committed", or "unknown" when the catalog did not answer
        self.snapshot_id: int | None = None
        self.parent_snapshot_id: int | None = None
        self._new: dict[str, str] = {}  # path -> URI of every data file handed out
        self._live: dict[str, DataFile] = {}  # path -> DataFile of the loaded snapshot
        self._removed: list[DataFile] = []

    # -- what the engine reads ------------------------------------------------------------------

    def load(self, keys: Sequence[str]) -> TargetDataset:
        table, storage = self.table, self.target.storage
        snapshot = table.current_snapshot()
        self.parent_snapshot_id = None if snapshot is None else snapshot.snapshot_id
        iceberg_schema = table.schema()
        schema = iceberg_schema.as_arrow()
        target_fields_check(schema, keys)
        files = []
        for data_file in live_data_files(table, snapshot, "merge into"):
            path = storage.path(data_file.file_path)
            self._live[path] = data_file
            files.append(IcebergFile(storage.afs, path, data_file, iceberg_schema, schema, keys))
        files.sort(key=lambda f: f.path)
        return TargetDataset(storage.location, files, schema)

    # -- what the engine writes -----------------------------------------------------------------

    def new_file(self, relative_path: str) -> str:
        name = relative_path.rsplit("/", 1)[-1]
        uri = self.table.location_provider().new_data_location(name)
        path = self.target.storage.path(uri)
        self._new[path] = uri
        return path

    def remove(self, path: str) -> None:
        self._removed.append(self._live[path])

    def commit(self, info: dict[str, Any]) -> None:
        """Commit the new files and the removals as one snapshot (see the module docstring)."""
        from pyiceberg.exceptions import CommitFailedException, ValidationException
        from pyiceberg.expressions import AlwaysTrue

        table = self.table
        added = self._data_files()
        tx = table.transaction()
        producer = _producer(tx, table, self._summary(info), append=not self._removed)
        # Serializable validation against every concurrent commit: any data file added or
        # deleted since this merge read the table conflicts (files are pruned by key only
        # inside this merge, so no narrower filter is sound for every strategy).
        producer.delete_by_predicate(AlwaysTrue())
        for data_file in self._removed:
            producer.delete_data_file(data_file)
        for data_file in added:
            producer.append_data_file(data_file)
        self.snapshot_id = producer.snapshot_id
        try:
            producer.commit()  # writes the manifests and stages the snapshot in ``tx``
            crash_point("iceberg-manifests-written")
            tx.commit_transaction()
        except (CommitFailedException, ValidationException) as exc:
            _clean_producer(producer)
            raise IcebergCommitConflictError(
                f"merge into Iceberg table {table_name(table)} conflicts with a concurrent "
                f"commit (this merge read snapshot {self.parent_snapshot_id}): {exc}. Nothing "
                "was committed and the merge's data files were deleted; run the merge again "
                "to merge against the new snapshot"
            ) from exc
        except BaseException as exc:
            if self._landed():
                self.state = "committed"
                if isinstance(exc, Exception):  # the snapshot is in: the merge succeeded
                    log.warning("memsafe: merge %s committed despite %r", self.txn, exc)
                    return
                raise
            self.state = "unknown"
            log.warning(
                "memsafe: commit of merge %s into Iceberg table %s has an unknown outcome; its "
                "%d data file(s) are kept (remove_orphan_files deletes them if unreferenced)",
                self.txn,
                table_name(table),
                len(self._new),
            )
            raise
        self.state = "committed"

    def discard(self) -> None:
        """Delete every data file this merge wrote, unless it may be committed."""
        if self.state != "open":
            return
        self.state = "discarded"
        afs = self.target.afs
        for path in self._new:
            with contextlib.suppress(FileNotFoundError, OSError, pa.ArrowException):
                afs.delete_file(path)

    # -- helpers ------------------------------------------------------------------------------

    def _data_files(self) -> list[DataFile]:
        """The written files as Iceberg DataFiles (statistics from their footers)."""
        from pyiceberg.io.pyarrow import parquet_file_to_data_file

        table = self.table
        paths = list(self._new)
        infos = self.target.afs.get_file_info(paths) if paths else []
        out = []
        for path, file_info in zip(paths, infos, strict=True):
            if file_info.type == pafs.FileType.NotFound:
                continue  # handed out to a sink that was aborted and deleted it
            data_file = parquet_file_to_data_file(table.io, table.metadata, self._new[path])
            data_file.spec_id = table.metadata.default_spec_id  # from_args drops it (0.12)
            out.append(data_file)
        return out

    def _summary(self, info: dict[str, Any]) -> dict[str, str]:
        out = {str(k): str(v) for k, v in self.target.snapshot_properties.items()}
        out.update(
            {
                MERGE_ID: self.txn,
                SUMMARY_PREFIX + "strategy": str(info["strategy"]),
                SUMMARY_PREFIX + "key-columns": ",".join(info["key_columns"]),
                SUMMARY_PREFIX + "inserted": str(info["inserted"]),
                SUMMARY_PREFIX + "updated": str(info["updated"]),
                SUMMARY_PREFIX + "deleted": str(info["deleted"]),
            }
        )
        return out

    def _landed(self) -> bool:
        """Whether this merge's snapshot is in the table (asked again of the catalog)."""
        if self.snapshot_id is None:
            return False
        try:
            self.table.refresh()
        except Exception:  # the catalog is unreachable: the outcome stays unknown
            return False
        return self.table.metadata.snapshot_by_id(self.snapshot_id) is not None


def _producer(tx: Any, table: Table, properties: dict[str, str], *, append: bool) -> Any:
    """The one snapshot producer of a merge: an overwrite, labelled ``append`` when the merge
    only adds files (streaming readers treat appends as new data); both validate."""
    from pyiceberg.table.snapshots import Operation
    from pyiceberg.table.update.snapshot import _OverwriteFiles

    if not append or table.current_snapshot() is None:
        return tx.update_snapshot(snapshot_properties=properties).overwrite()
    return _OverwriteFiles(
        operation=Operation.APPEND, transaction=tx, io=table.io, snapshot_properties=properties
    )


def _clean_producer(producer: Any) -> None:
    """Delete the manifests a failed producer wrote (pyiceberg does on a failed retry, not
    when staging itself failed)."""
    with contextlib.suppress(Exception):
        producer._clean_all_uncommitted()


class IcebergFile(TargetFile):
    """A live data file: manifest facts at once, footer facts on first use.

    ``file_bounds`` answers from the manifest's key bounds until the footer is read, so the
    scan prunes by them without opening the file; any footer attribute (``metadata``,
    ``bounds``, ``rg_starts``, ...) reads the footer once (``target.target_file``, the same
    code a Parquet target uses) and then answers from it.
    """

    def __init__(
        self,
        afs: pafs.FileSystem,
        path: str,
        data_file: DataFile,
        iceberg_schema: Schema,
        schema: pa.Schema,
        keys: Sequence[str],
    ) -> None:
        self.path = path
        self.rel = path.rsplit("/", 1)[-1]
        self.rows = int(data_file.record_count)
        self.matched_rows = None
        self.matched = 0
        self.key_scanned: set[int] = set()
        self.data_file = data_file
        self._afs = afs
        self._schema = schema
        self._keys = tuple(keys)
        self._manifest_bounds = manifest_bounds(data_file, iceberg_schema, schema, keys)
        offsets = data_file.split_offsets
        self._row_groups = len(offsets) if offsets else 1
        self._footer: TargetFile | None = None

    def _read_footer(self) -> TargetFile:
        if self._footer is None:
            footer = target_file(self._afs, self.path, self.rel, self._schema, self._keys)
            if footer.rows != self.rows:
                raise ValueError(
                    f"data file {self.data_file.file_path} holds {footer.rows} rows but the "
                    f"table's manifest says {self.rows}: the table's metadata does not match "
                    "its files"
                )
            self._footer = footer
        return self._footer

    def __getattr__(self, name: str) -> Any:
        # Only for attributes not set above: the footer's facts.
        if name.startswith("_") or name == "data_file":
            raise AttributeError(name)
        return getattr(self._read_footer(), name)

    @property
    def num_row_groups(self) -> int:
        if self._footer is None:
            return self._row_groups if self.rows else 0
        return self._footer.num_row_groups

    def file_bounds(self) -> list[Bound]:
        if self._footer is None:
            return list(self._manifest_bounds)
        return super().file_bounds()

    def __repr__(self) -> str:
        return f"IcebergFile({self.data_file.file_path!r}, rows={self.rows})"

    __eq__ = object.__eq__
    __hash__ = object.__hash__


def manifest_bounds(
    data_file: DataFile, iceberg_schema: Schema, schema: pa.Schema, keys: Sequence[str]
) -> list[Bound]:
    """Per key column, the file's manifest bounds in the key index's domain (None: unknown)."""
    lower = data_file.lower_bounds or {}
    upper = data_file.upper_bounds or {}
    out: list[Bound] = []
    for k in keys:
        field = iceberg_schema.find_field(k)
        lo, hi = lower.get(field.field_id), upper.get(field.field_id)
        bound = None
        if lo is not None and hi is not None:
            try:
                bound = _bound(field.field_type, schema.field(k).type, lo, hi)
            except (ValueError, TypeError, OverflowError):
                bound = None
        out.append(bound)
    return out


def _bound(iceberg_type: Any, arrow_type: pa.DataType, lo: bytes, hi: bytes) -> Bound:
    """Iceberg's serialized bounds as codes (integer-like keys) or str/bytes; truncated
    string bounds stay conservative (a prefix below, an incremented prefix above)."""
    from pyiceberg.conversions import from_bytes
    from pyiceberg.types import (
        BinaryType,
        DateType,
        IntegerType,
        LongType,
        StringType,
        TimestampType,
        TimestamptzType,
        TimeType,
    )

    if isinstance(
        iceberg_type,
        (IntegerType, LongType, DateType, TimeType, TimestampType, TimestamptzType),
    ):
        if pa.types.is_timestamp(arrow_type) and arrow_type.unit != "us":
            return None
        low, high = from_bytes(iceberg_type, lo), from_bytes(iceberg_type, hi)
        return exact_code_of(int(low), pa.int64()), exact_code_of(int(high), pa.int64())
    if isinstance(iceberg_type, StringType):
        return from_bytes(iceberg_type, lo), from_bytes(iceberg_type, hi)
    if isinstance(iceberg_type, BinaryType):
        return bytes(from_bytes(iceberg_type, lo)), bytes(from_bytes(iceberg_type, hi))
    return None
