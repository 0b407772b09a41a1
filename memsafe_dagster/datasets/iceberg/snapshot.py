"""A snapshot's live data files, from its manifests, and what memsafe refuses to touch.

memsafe reads Iceberg data files itself, by column name, one row group at a time (pyiceberg's
reader holds a whole decoded file). That is exact for copy-on-write tables whose columns were
never renamed: so a snapshot with row-level delete files (merge-on-read), a data file in
another format than Parquet, or a schema history in which a field id changed its name (or a
name its field id) is refused with an error naming it. Merges also refuse partitioned tables
(``check_mergeable``): the engine writes new rows into files without splitting them by
partition value.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyiceberg.manifest import DataFile
    from pyiceberg.table import Table
    from pyiceberg.table.snapshots import Snapshot


def live_data_files(table: Table, snapshot: Snapshot | None, what: str) -> Iterator[DataFile]:
    """The data files of ``snapshot`` (none for an empty table); ``what`` ("merge into",
    "read") words the refusals."""
    from pyiceberg.manifest import DataFileContent, FileFormat, ManifestContent

    if snapshot is None:
        return
    name = ".".join(table.name())
    for manifest in snapshot.manifests(table.io):
        for entry in manifest.fetch_manifest_entry(table.io, discard_deleted=True):
            data_file = entry.data_file
            if manifest.content != ManifestContent.DATA or data_file.content != (
                DataFileContent.DATA
            ):
                raise ValueError(
                    f"cannot {what} Iceberg table {name}: snapshot {snapshot.snapshot_id} has "
                    f"row-level delete files ({data_file.file_path}); memsafe handles "
                    "copy-on-write tables only. Rewrite the affected data files first (for "
                    "example Spark's rewrite_data_files with delete-file-threshold=1)"
                )
            if data_file.file_format != FileFormat.PARQUET:
                raise ValueError(
                    f"cannot {what} Iceberg table {name}: data file {data_file.file_path} is "
                    f"{data_file.file_format.value}; memsafe reads Parquet data files only"
                )
            yield data_file


def check_column_history(table: Table, what: str) -> None:
    """Refuse a schema history in which a field id was renamed or a name reused by another
    field id: files written before would be read wrongly by name."""
    from pyiceberg.schema import index_name_by_id

    current = index_name_by_id(table.schema())
    ids = {column: field_id for field_id, column in current.items()}
    name = ".".join(table.name())
    for schema in table.schemas().values():
        for field_id, column in index_name_by_id(schema).items():
            if field_id in current and current[field_id] != column:
                raise ValueError(
                    f"cannot {what} Iceberg table {name}: column {current[field_id]!r} (field "
                    f"id {field_id}) was called {column!r} in schema {schema.schema_id}; "
                    "memsafe reads data files by column name, so files written before the "
                    "rename would lose that column. Rewrite the table's data files first"
                )
            if column in ids and ids[column] != field_id:
                raise ValueError(
                    f"cannot {what} Iceberg table {name}: column {column!r} is field id "
                    f"{ids[column]} now but was field id {field_id} in schema "
                    f"{schema.schema_id} (dropped and added again); memsafe reads data files "
                    "by column name and would take the old column's values. Rewrite the "
                    "table's data files first"
                )


def check_mergeable(table: Table) -> None:
    """Refuse tables memsafe cannot merge into (partitioned, renamed columns)."""
    spec = table.spec()
    if not spec.is_unpartitioned():
        fields = ", ".join(f"{f.name} ({f.transform})" for f in spec.fields)
        raise ValueError(
            f"cannot merge into Iceberg table {'.'.join(table.name())}: it is partitioned by "
            f"{fields}, and memsafe's merge writes new rows without splitting them by "
            "partition value (partitioned Iceberg tables are not supported yet). Merge into "
            "an unpartitioned table, or one table per partition"
        )
    check_column_history(table, "merge into")
