"""Bounded Parquet reading, and the one place that turns bytes into rows.

Memory is bounded by bytes, not rows: a 100k-row chunk is 4 MB of narrow rows and 100 MB of
1 KB rows. Row width comes from the footer (uncompressed column-chunk sizes over rows, of the
columns read), and ``rows_for_bytes`` turns a byte allowance into rows, with the caller's
``*_chunk_size_rows`` as the maximum.

Every Parquet file is opened by ``open_parquet``: no pre-buffering and a ``READ_BUFFER_BYTES``
read buffer, so a column chunk is streamed page by page instead of being read whole (without a
buffer PyArrow reads each column chunk of a row group at once, which for a pandas-default
file, one row group, is the whole file). ``parquet_batches`` reads the fragments of a Parquet
``pyarrow.dataset.Dataset`` by pulling batches from each file in turn: nothing is decoded
before the consumer asks for it. A dataset scanner instead decodes ahead into a queue that
only pauses past a high-water mark of hundreds of MB, so a consumer slower than the reader
(per-chunk work, a CPU quota) lets memory grow with the dataset.

``check_column_chunks`` refuses, from the footer alone, a file with a column chunk larger
than the budget, before anything is staged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from memsafe_dagster.memory.sizes import MiB, format_mb

if TYPE_CHECKING:
    import pyarrow.dataset as ds

    from memsafe_dagster.memory import MemoryMonitor

#: Read buffer of every Parquet input stream: one page (1 MiB by default) at a time.
READ_BUFFER_BYTES = 1 * MiB
#: Bytes a row is taken to have when nothing says otherwise (no footer, no rows).
DEFAULT_ROW_BYTES = 64.0
#: A chunk may take this share of the memory budget it is read under (the consumer's work,
#: the next chunk being decoded and the writer's row group come on top of it).
CHUNK_BUDGET_SHARE = 1 / 16


class ColumnChunkTooLargeError(ValueError):
    """A column chunk larger than the memory budget: refused from the footer, up front."""


def open_parquet(source: Any, metadata: pq.FileMetaData | None = None) -> pq.ParquetFile:
    """``source`` (a path or an open file) as a ``ParquetFile`` that streams column chunks
    through a ``READ_BUFFER_BYTES`` buffer and never pre-buffers a row group."""
    return pq.ParquetFile(
        source, metadata=metadata, pre_buffer=False, buffer_size=READ_BUFFER_BYTES
    )


def row_bytes(metadata: pq.FileMetaData, columns: Sequence[str] | None = None) -> float | None:
    """Uncompressed bytes per row of ``columns`` (all when None), from the footer; None for a
    file without rows."""
    if not metadata.num_rows or not metadata.num_row_groups:
        return None
    wanted = None if columns is None else set(columns)
    total = 0
    for i in range(metadata.num_row_groups):
        rg = metadata.row_group(i)
        if wanted is None:
            total += rg.total_byte_size
            continue
        for c in range(rg.num_columns):
            col = rg.column(c)
            if col.path_in_schema.split(".", 1)[0] in wanted:
                total += col.total_uncompressed_size
    return total / metadata.num_rows


def table_row_bytes(table: pa.Table | pa.RecordBatch) -> float | None:
    """Bytes per row of an in-memory table (None without rows)."""
    return table.nbytes / table.num_rows if table.num_rows else None


def rows_for_bytes(
    budget_bytes: float, row_width: float | None, max_rows: int, *, min_rows: int = 1
) -> int:
    """How many rows of ``row_width`` bytes fit in ``budget_bytes``: at most ``max_rows``, at
    least ``min_rows`` (and never more than ``max_rows``)."""
    width = row_width if row_width and row_width > 0 else DEFAULT_ROW_BYTES
    fit = int(budget_bytes // width)
    return max(min(min_rows, max_rows), min(max_rows, fit))


def monitor_budget_bytes(monitor: MemoryMonitor) -> int:
    """The bytes a monitor lets the work use: the smallest of its PyArrow budget, its process
    budget and what the container may use beyond the memory it must keep free."""
    budgets = [monitor.max_pyarrow_mb * MiB]
    if monitor.max_process_memory_mb:
        budgets.append(monitor.max_process_memory_mb * MiB)
    budgets.append(monitor.limits.limit_bytes - monitor.min_system_available_mb * MiB)
    return int(max(MiB, min(budgets)))


def chunk_budget_bytes(budget_bytes: float) -> float:
    """The bytes one chunk may take under a memory budget of ``budget_bytes``."""
    return budget_bytes * CHUNK_BUDGET_SHARE


def largest_column_chunk(metadata: pq.FileMetaData) -> tuple[int, str, int] | None:
    """(row group, column path, uncompressed bytes) of the file's largest column chunk."""
    best: tuple[int, str, int] | None = None
    for i in range(metadata.num_row_groups):
        rg = metadata.row_group(i)
        for c in range(rg.num_columns):
            col = rg.column(c)
            size = col.total_uncompressed_size
            if best is None or size > best[2]:
                best = (i, col.path_in_schema, size)
    return best


def check_column_chunks(path: str, metadata: pq.FileMetaData, budget_bytes: int) -> None:
    """Raise ``ColumnChunkTooLargeError`` naming the file, row group, column, size and budget
    when one column chunk of ``path`` is larger than ``budget_bytes``."""
    largest = largest_column_chunk(metadata)
    if largest is None or largest[2] <= budget_bytes:
        return
    rg, column, size = largest
    raise ColumnChunkTooLargeError(
        f"{path}: row group {rg} holds a column chunk of {format_mb(size)} (column {column!r}, "
        f"uncompressed) that cannot fit the memory budget of {format_mb(budget_bytes)}; "
        "nothing was read or staged. Rewrite the file with smaller row groups, or raise the "
        "memory budget"
    )


def iter_file_batches(
    pf: pq.ParquetFile,
    batch_rows: int,
    *,
    columns: Sequence[str] | None = None,
    row_groups: Sequence[int] | None = None,
    use_threads: bool = True,
) -> Iterator[pa.RecordBatch]:
    """Batches of at most ``batch_rows`` rows, pulled one at a time (nothing read ahead)."""
    if pf.metadata.num_row_groups == 0:
        return iter(())
    return pf.iter_batches(
        batch_size=max(1, batch_rows),
        row_groups=None if row_groups is None else list(row_groups),
        columns=None if columns is None else list(columns),
        use_threads=use_threads,
    )


def filter_columns(schema: pa.Schema, filter: pc.Expression) -> list[str]:
    """The top-level columns ``filter`` refers to (those it cannot be evaluated without)."""
    empty = schema.empty_table()
    used = []
    for name in schema.names:
        try:
            empty.drop_columns([name]).filter(filter)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, KeyError):
            used.append(name)
    return used


def is_plain_parquet_dataset(dataset: ds.Dataset) -> bool:
    """A file system dataset of Parquet files whose fragments ``parquet_batches`` can read
    (not one made by ``Dataset.filter``, which has its own filter and hides its fragments)."""
    import pyarrow.dataset as ds

    if not isinstance(dataset, ds.FileSystemDataset) or not isinstance(
        dataset.format, ds.ParquetFileFormat
    ):
        return False
    try:
        dataset.get_fragments()  # refused for a filtered or projected dataset
    except ValueError:
        return False
    return True


def parquet_batches(
    dataset: ds.Dataset,
    rows: Callable[[], int] | None,
    *,
    columns: Sequence[str] | None,
    filter: pc.Expression | None,
    budget_bytes: float | None = None,
    fallback: Callable[[ds.Fragment], Iterator[pa.Table]],
) -> Iterator[pa.Table]:
    """The rows of a Parquet ``dataset`` pulled file by file, ``filter`` applied per batch.

    Files are pruned by partition and row groups by statistics (footers only). A fragment
    with partition columns or a physical schema that lacks a needed column is read by
    ``fallback`` (a scan of that one file). Each batch has at most ``rows()`` rows, fewer
    when the file's rows are wide (``budget_bytes`` per chunk).
    """
    schema = dataset.schema
    needed: list[str] | None = None
    if columns is not None:
        needed = list(columns)
        if filter is not None:
            needed += [c for c in filter_columns(schema, filter) if c not in needed]
    for fragment in dataset.get_fragments(filter=filter):
        partitioned = not _is_true(fragment.partition_expression)
        with fragment.filesystem.open_input_file(fragment.path) as fh:
            pf = open_parquet(fh)
            names = pf.schema_arrow.names
            if partitioned or any(c not in names for c in (needed or schema.names)):
                yield from fallback(fragment)
                continue
            groups = None
            if filter is not None:
                subset = fragment.subset(filter=filter, schema=schema)
                groups = [g.id for g in subset.row_groups] if subset is not None else []
                if not groups:
                    continue
            size = rows() if rows is not None else 64 * 1024
            if budget_bytes is not None:
                size = rows_for_bytes(budget_bytes, row_bytes(pf.metadata, needed), size)
            for batch in iter_file_batches(pf, size, columns=needed, row_groups=groups):
                table = pa.Table.from_batches([batch])
                if filter is not None:
                    table = table.filter(filter)
                if columns is not None:
                    table = table.select(list(columns))
                yield table


def _is_true(expression: pc.Expression | None) -> bool:
    return expression is None or expression.equals(pc.scalar(True))
