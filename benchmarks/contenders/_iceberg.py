"""What both Iceberg contenders share: the target as an Iceberg table under ``--out``.

``prepare`` (untimed) makes a SQL catalog on SQLite in ``--out`` and a table whose warehouse is
there too, copies the target's Parquet files into the table's data directory and registers
them with ``add_files`` (footers only, so it stays small under the cap). The files carry no
Parquet field ids, so pyiceberg sets the table's name mapping, as it does for any table made
from existing Parquet files; both contenders then merge into the same table.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

from benchmarks.contenders._common import parquet_files

CATALOG = "bench"
TABLE = "bench.target"


def catalog(out: Path) -> Any:
    """The benchmark's catalog in ``out`` (made by ``prepare``)."""
    from pyiceberg.catalog.sql import SqlCatalog

    return SqlCatalog(
        CATALOG, uri=f"sqlite:///{out}/catalog.db", warehouse=f"file://{out}/warehouse"
    )


def prepare(args: argparse.Namespace) -> None:
    """Create the table and register a copy of the target's files."""
    import pyarrow.parquet as pq

    args.out.mkdir(parents=True)
    cat = catalog(args.out)
    cat.create_namespace("bench")
    files = parquet_files(args.target)
    table = cat.create_table(TABLE, schema=pq.read_schema(files[0]))
    data = Path(table.location().removeprefix("file://")) / "data"
    data.mkdir(parents=True)
    copies = []
    for f in files:
        shutil.copyfile(f, data / f.name)
        copies.append(f"file://{data / f.name}")
    table.add_files(copies)


def data_files(out: Path) -> list[str]:
    """The current snapshot's data files (local paths), for verification."""
    from pyiceberg.manifest import DataFileContent

    table = catalog(out).load_table(TABLE)
    paths = []
    for task in table.scan().plan_files():
        if task.delete_files or task.file.content != DataFileContent.DATA:
            raise ValueError("the output table has row-level deletes; verification reads files")
        paths.append(task.file.file_path.removeprefix("file://"))
    return sorted(paths)
