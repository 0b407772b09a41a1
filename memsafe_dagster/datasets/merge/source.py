"""The merge's source, whatever it was given as: a schema, a row count when known, and chunks.

Tables and Parquet paths can be read twice; readers, streams and iterables only once, so when a
merge needs a second pass over those it spools them (see ``spill.Spool``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from memsafe_dagster.datasets.filesystem import (
    arrow_filesystem,
    list_data_files,
    resolve_filesystem,
)
from memsafe_dagster.datasets.merge.target import aligned_batch_rows
from memsafe_dagster.datasets.stream import ChunkStream


@dataclass
class MergeSource:
    """A source normalized for the merge: ``schema``, ``total_rows`` (None when unknown), and
    ``chunks(rows)`` yielding tables of at most about ``rows`` rows; ``rereadable`` tells whether
    ``chunks`` may be called again."""

    schema: pa.Schema
    total_rows: int | None
    rereadable: bool
    description: str
    _table: pa.Table | None = None
    _files: tuple[str, ...] = ()
    _fs: fsspec.AbstractFileSystem | None = None
    _iter: Iterator[pa.Table | pa.RecordBatch] | None = None
    _reads: int = 0

    def chunks(
        self, rows: Callable[[], int], columns: list[str] | None = None
    ) -> Iterator[pa.Table]:
        """The source's rows in order, in tables of at most ``rows()`` rows (asked per chunk,
        so the size can adapt to memory pressure)."""
        self._reads += 1
        if self._table is not None:
            table = self._table if columns is None else self._table.select(columns)
            start = 0
            while start < table.num_rows:
                size = rows()
                yield table.slice(start, size)
                start += size
            return
        if self._files:
            yield from self._file_chunks(rows, columns)
            return
        if self._reads > 1:
            raise RuntimeError(f"{self.description} can be read only once")
        assert self._iter is not None
        for item in self._iter:
            table = item if isinstance(item, pa.Table) else pa.Table.from_batches([item])
            if columns is not None:
                table = table.select([c for c in columns if c in table.column_names])
            start = 0
            while start < table.num_rows:
                size = rows()
                yield table.slice(start, size)
                start += size

    def _file_chunks(
        self, rows: Callable[[], int], columns: list[str] | None
    ) -> Iterator[pa.Table]:
        afs = arrow_filesystem(self._fs)
        for path in self._files:
            with afs.open_input_file(path) as fh:
                pf = pq.ParquetFile(fh, pre_buffer=False)
                cols = None
                if columns is not None:
                    cols = [c for c in columns if c in pf.schema_arrow.names]
                size = aligned_batch_rows(pf.metadata, rows())
                for batch in pf.iter_batches(batch_size=size, columns=cols, use_threads=True):
                    yield pa.Table.from_batches([batch])

    def close(self) -> None:
        close = getattr(self._iter, "close", None)
        if callable(close):
            close()


def _is_arrow_dataset(data: object) -> bool:
    # Importing pyarrow.dataset maps ~50 MB of libraries; a Dataset exists only if it was.
    pads = sys.modules.get("pyarrow.dataset")
    return pads is not None and isinstance(data, pads.Dataset)


def open_source(
    data: object,
    *,
    chunk_rows: int,
    filesystem: fsspec.AbstractFileSystem | None = None,
    storage_options: dict | None = None,
) -> MergeSource:
    """Normalize ``data`` (Table, RecordBatch, RecordBatchReader, Dataset, ChunkStream, path or
    URL of Parquet files, iterable of batches) into a ``MergeSource``.

    A URL picks its own filesystem (``storage_options`` passed through); a plain path is on
    ``filesystem`` (the target's) when given.
    """
    if isinstance(data, pa.RecordBatch):
        data = pa.Table.from_batches([data])
    if isinstance(data, pa.Table):
        return MergeSource(data.schema, data.num_rows, True, "table", _table=data)
    if isinstance(data, (str, os.PathLike)):
        if filesystem is not None and "://" not in os.fspath(data):
            fs, path = filesystem, filesystem._strip_protocol(os.fspath(data))
        else:
            fs, path = resolve_filesystem(data, storage_options=storage_options)
        files = tuple(list_data_files(fs, path))
        if not files:
            what = "holds no Parquet files" if fs.exists(path) else "does not exist"
            raise ValueError(f"source {os.fspath(data)!r} {what}")
        afs = arrow_filesystem(fs)
        total = 0
        schema = None
        for f in files:
            try:
                with afs.open_input_file(f) as fh:
                    pf = pq.ParquetFile(fh, pre_buffer=False)
                    total += pf.metadata.num_rows
                    schema = schema or pf.schema_arrow
            except (pa.ArrowInvalid, OSError) as exc:
                raise ValueError(
                    f"source file {f!r} is not a readable Parquet file: {exc}"
                ) from exc
        return MergeSource(schema, total, True, f"source {os.fspath(data)}", _files=files, _fs=fs)
    if _is_arrow_dataset(data):
        scanner = data.scanner(batch_size=chunk_rows, batch_readahead=1, fragment_readahead=1)
        total = data.count_rows()
        return MergeSource(data.schema, total, False, "dataset", _iter=iter(scanner.to_batches()))
    if isinstance(data, pa.RecordBatchReader):
        return MergeSource(data.schema, None, False, "RecordBatchReader", _iter=iter(data))
    if isinstance(data, ChunkStream):
        return MergeSource(data.schema, data.total_rows, False, "ChunkStream", _iter=iter(data))
    if isinstance(data, Iterable) and not isinstance(data, (bytes, dict)):
        stream = ChunkStream.from_batches(data, chunk_size_rows=chunk_rows)
        return MergeSource(stream.schema, None, False, "iterable", _iter=iter(stream))
    raise TypeError(
        "merge source must be a pyarrow Table, RecordBatch, RecordBatchReader, Dataset, "
        f"ChunkStream, a path or URL of Parquet files, or an iterable of batches; got "
        f"{type(data).__name__}"
    )
