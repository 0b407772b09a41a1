"""Reading an Iceberg snapshot in bounded memory: its data files as a ``pyarrow.dataset``.

pyiceberg's own readers decode a whole data file at a time and queue every file at once. A
snapshot's data files are immutable, so a ``pyarrow.dataset.Dataset`` over exactly the files
of one snapshot, in the table's schema (columns by name, missing ones as nulls, field ids left
out), is a consistent snapshot read that every memsafe reader streams by row group (a
concurrent merge commits a new snapshot and leaves these files in place). Refused as for the
merge: row-level deletes, non-Parquet files, renamed columns (``snapshot``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import pyarrow.dataset as ds

from memsafe_dagster.datasets.iceberg.catalog import resolve_table
from memsafe_dagster.datasets.iceberg.snapshot import check_column_history, live_data_files
from memsafe_dagster.datasets.iceberg.storage import TableStorage

if TYPE_CHECKING:
    from pyiceberg.catalog import Catalog
    from pyiceberg.table import Table


def iceberg_dataset(
    table: Table | str | Sequence[str],
    *,
    catalog: Catalog | str | None = None,
    snapshot_id: int | None = None,
) -> ds.Dataset:
    """A lazy dataset of ``table``'s current snapshot (or ``snapshot_id``): nothing is read
    but the manifests until it is scanned."""
    from pyiceberg.io.pyarrow import schema_to_pyarrow

    table = resolve_table(table, catalog)
    check_column_history(table, "read")
    if snapshot_id is None:
        snapshot = table.current_snapshot()
    else:
        snapshot = table.snapshot_by_id(snapshot_id)
        if snapshot is None:
            known = [s.snapshot_id for s in table.snapshots()]
            raise ValueError(
                f"Iceberg table {'.'.join(table.name())} has no snapshot {snapshot_id} "
                f"(it has {known})"
            )
    storage = TableStorage(table)
    schema_id = snapshot.schema_id if snapshot is not None else None
    iceberg_schema = (
        table.schemas().get(schema_id, table.schema())
        if schema_id is not None
        else (table.schema())
    )
    schema = schema_to_pyarrow(iceberg_schema, include_field_ids=False)
    paths = sorted(storage.path(f.file_path) for f in live_data_files(table, snapshot, "read"))
    return ds.dataset(paths, schema=schema, filesystem=storage.afs, format="parquet")
