"""process_in_chunks: stream a Parquet dataset (or a table, reader or stream) in bounded memory.

Peak memory depends on the chunk, not on the dataset nor on how fast the consumer is. A
Parquet dataset (a path, a list of paths, or a ``pyarrow.dataset.Dataset`` of Parquet files) is
pulled file by file through ``datasets.reader``: nothing is decoded before the consumer asks
for it, column chunks stream through a bounded read buffer, and per-file metadata is not
cached. A dataset scanner (used only for other formats, partitioned files and filtered
``Dataset`` objects, one file at a time where it can) decodes ahead into a queue that pauses
only past a high-water mark far above a chunk, which a slow consumer (per-chunk work, a CPU
quota) lets fill.

Bytes bound the chunk: ``chunk_size_rows`` is a maximum, lowered for wide rows so a chunk takes
at most ``reader.CHUNK_BUDGET_SHARE`` of the monitor's budget (row widths from the footers).
The returned ``ChunkStream`` re-chunks the batches to the current chunk size, which adaptive
sizing lowers under pressure; a file's batches are sized when the file is opened, so a smaller
size applies to the stream's chunks at once and to the reads from the next file.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from memsafe_dagster.checks import non_negative_seconds, positive_int, positive_number
from memsafe_dagster.datasets.adaptive import attach_monitor
from memsafe_dagster.datasets.reader import chunk_budget_bytes, monitor_budget_bytes, rows_for_bytes
from memsafe_dagster.datasets.source import tabular_source
from memsafe_dagster.datasets.stream import ChunkStream
from memsafe_dagster.memory import MemoryMonitor

if TYPE_CHECKING:
    import pyarrow.dataset as ds

# A pressure check costs tens of microseconds; a 50k-row chunk of a fast scan, a few hundred.
# After a NORMAL reading the next check waits this long (any other level: every chunk).
DEFAULT_CHECK_INTERVAL_S = 0.005
# The default monitor keeps 10 % of the limit free, at most 512 MB (the MemoryMonitor default).
DEFAULT_RESERVE_FRACTION = 0.1

ProgressCallback = Callable[[int, "int | None"], Any]
Source: TypeAlias = (
    "str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | ds.Dataset | pa.Table"
    " | pa.RecordBatch | pa.RecordBatchReader | ChunkStream | Iterable[pa.RecordBatch | pa.Table]"
)


def process_in_chunks(
    dataset: Source,
    chunk_size_rows: int = 100_000,
    max_memory_mb: float = 2048,
    memory_monitor: MemoryMonitor | None = None,
    enable_progress: bool = False,
    progress_callback: ProgressCallback | None = None,
    *,
    columns: Sequence[str] | None = None,
    filter: pc.Expression | None = None,
    filesystem: fsspec.AbstractFileSystem | pafs.FileSystem | None = None,
    adaptive: bool = True,
    storage_options: dict[str, Any] | None = None,
    format: str = "parquet",
    partitioning: Any = None,
    check_interval_s: float = DEFAULT_CHECK_INTERVAL_S,
) -> ChunkStream:
    """Stream ``dataset`` as ``pa.Table`` chunks of at most ``chunk_size_rows`` rows.

    ``dataset`` is a path or URL (``filesystem`` / ``storage_options`` resolve it), a list of
    paths, a ``pyarrow.dataset.Dataset``, a ``pa.Table``/``RecordBatch``, a
    ``RecordBatchReader``, a ``ChunkStream`` (passed through) or an iterable of batches.
    ``columns`` and ``filter`` are pushed down into the scan where there is one, else applied
    batch by batch. Without ``memory_monitor`` a container-aware ``MemoryMonitor`` with
    ``max_memory_mb`` of PyArrow budget watches the stream; ``adaptive`` lets it resize chunks
    (EMERGENCY raises ``MemoryPressureError`` either way). ``progress_callback(rows_done,
    total_rows)`` runs after every chunk; ``enable_progress`` draws a bar when stderr is a
    terminal. ``stream.total_rows`` is set when progress is asked for: from Parquet metadata
    without a filter, by a bounded counting pass over the filter's columns with one (always
    for a ``pa.Table`` without a filter); otherwise it is None.
    """
    chunk_size_rows = positive_int("chunk_size_rows", chunk_size_rows)
    positive_number("max_memory_mb", max_memory_mb)
    columns = _validate_columns(columns)
    if filter is not None and not isinstance(filter, pc.Expression):
        raise ValueError(
            f"filter must be a pyarrow.compute.Expression (e.g. pc.field('x') > 0), "
            f"got {type(filter).__name__}"
        )
    if progress_callback is not None and not callable(progress_callback):
        raise ValueError("progress_callback must be callable(rows_done, total_rows)")
    non_negative_seconds("check_interval_s", check_interval_s)

    show_bar = bool(enable_progress) and _stderr_is_terminal()
    want_total = show_bar or progress_callback is not None
    source = tabular_source(
        dataset,
        filesystem=filesystem,
        storage_options=storage_options,
        format=format,
        partitioning=partitioning,
        scan_paths=True,
        chunk_rows=chunk_size_rows,
        what="dataset",
    )
    monitor = memory_monitor if memory_monitor is not None else default_monitor(max_memory_mb)
    # Bytes bound the chunk: wide rows come in fewer rows than asked (chunk_size_rows is the
    # maximum), both as the files are read and as the stream cuts its chunks.
    source.chunk_bytes = chunk_budget_bytes(monitor_budget_bytes(monitor))
    width = source.row_bytes(columns)
    chunk_rows = rows_for_bytes(source.chunk_bytes, width, chunk_size_rows, min_rows=1_000)
    stream = source.stream(chunk_rows if width else chunk_size_rows, columns=columns, filter=filter)
    if want_total:
        # Counting reads every footer once more (a GET per file on object stores).
        stream.total_rows = source.count_rows(filter, batch_rows=chunk_size_rows)
    attach_monitor(stream, monitor, adaptive=adaptive, min_check_interval_s=check_interval_s)
    if want_total:
        _attach_progress(stream, show_bar, progress_callback)
    return stream


def default_monitor(max_memory_mb: float) -> MemoryMonitor:
    """The monitor used when none is given: ``max_memory_mb`` for PyArrow, no process budget,
    and 10 % of the detected (container) limit kept free, at most 512 MB."""
    from memsafe_dagster.memory import detect_memory_limits

    limits = detect_memory_limits()
    reserve = min(512.0, limits.limit_mb * DEFAULT_RESERVE_FRACTION)
    return MemoryMonitor(
        max_pyarrow_mb=max_memory_mb, min_system_available_mb=reserve, limits=limits
    )


def _validate_columns(columns: Sequence[str] | None) -> list[str] | None:
    if columns is None:
        return None
    if isinstance(columns, str) or not all(isinstance(c, str) for c in columns):
        raise ValueError(f"columns must be a list of column names, got {columns!r}")
    columns = list(columns)
    if not columns:
        raise ValueError("columns must name at least one column (None reads them all)")
    return columns


# -- progress ---------------------------------------------------------------------------------


def _stderr_is_terminal() -> bool:
    stream = sys.stderr
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError):
        return False


def _attach_progress(
    stream: ChunkStream, show_bar: bool, callback: ProgressCallback | None
) -> None:
    bar: list[Any] = []

    def after(s: ChunkStream, chunk: pa.Table) -> None:
        if show_bar:
            if not bar:
                from tqdm import tqdm

                bar.append(
                    tqdm(
                        total=s.total_rows,
                        unit="rows",
                        unit_scale=True,
                        file=sys.stderr,
                        desc="memsafe",
                        dynamic_ncols=True,
                    )
                )
            bar[0].update(chunk.num_rows)
        if callback is not None:
            callback(s.stats.rows, s.total_rows)

    def close() -> None:
        if bar:
            bar[0].close()

    stream.add_hooks(after_chunk=after, on_close=close)
