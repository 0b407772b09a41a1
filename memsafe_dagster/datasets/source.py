"""TabularSource: every kind of tabular input the package accepts, classified in one place.

A path or URL (or a list of them), a ``pyarrow.dataset.Dataset``, a ``pa.Table`` or
``RecordBatch``, a ``RecordBatchReader``, a ``ChunkStream``, or any other iterable of batches
or tables: ``tabular_source`` turns each into one object that knows its schema, its row count
when that costs no data read, whether it can be read again, and the Parquet files behind it,
and that reads it in chunks whose size is asked for chunk by chunk (so adaptive sizing
applies). ``tabular_kind`` and ``is_tabular`` are the same classification for callers that
must decide without reading anything (the Dagster layer's type checks).

Paths are read one of two ways, chosen by the caller. As Parquet files (the default): every
footer is read up front (row count, schema, unreadable files refused) and each file is read
by its row groups, without ``pyarrow.dataset`` (importing it loads pandas when that is
installed: tens of MB a merge budget cannot spare). With ``scan_paths=True``, as a pyarrow
dataset: any format, partitioning, filter pushdown. A dataset of Parquet files is pulled file
by file (``reader.parquet_batches``: a scanner decodes ahead of a slow consumer); any other
scan reads ahead at most ``BATCH_READAHEAD`` batches in each of ``FRAGMENT_READAHEAD`` files,
caches no per-file metadata, and does not pre-buffer whole row groups on local disk. Parquet
files are opened by ``reader.open_parquet`` (bounded read buffer), and ``chunk_bytes`` caps
the rows read at once from a file of wide rows.
"""

from __future__ import annotations

import os
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from memsafe_dagster.checks import positive_int
from memsafe_dagster.datasets.filesystem import (
    arrow_filesystem,
    resolve_filesystem,
)
from memsafe_dagster.datasets.parquet import aligned_batch_rows
from memsafe_dagster.datasets.reader import (
    is_plain_parquet_dataset,
    iter_file_batches,
    open_parquet,
    parquet_batches,
    row_bytes,
    rows_for_bytes,
)
from memsafe_dagster.datasets.snapshot import (
    as_dataset,
    is_local_arrow,
    snapshot,
    snapshot_filesystem,
)
from memsafe_dagster.datasets.stream import ChunkStream

if TYPE_CHECKING:
    # Imported where used: pyarrow.dataset loads pandas when it is installed.
    import pyarrow.dataset as ds

BATCH_READAHEAD = 2
FRAGMENT_READAHEAD = 2
DEFAULT_CHUNK_ROWS = 100_000

Kind = Literal["paths", "dataset", "table", "reader", "stream", "batches"]
PATHS: Kind = "paths"
DATASET: Kind = "dataset"
TABLE: Kind = "table"
READER: Kind = "reader"
STREAM: Kind = "stream"
BATCHES: Kind = "batches"

ACCEPTED = (
    "a path or URL, a list of paths, a pyarrow.dataset.Dataset, a pa.Table or RecordBatch, "
    "a RecordBatchReader, a ChunkStream or an iterable of batches"
)

#: Rows per chunk: a number, a function asked before every chunk, or None (as the data comes).
Rows: TypeAlias = "int | Callable[[], int] | None"
RowsFn: TypeAlias = "Callable[[], int] | None"
Columns: TypeAlias = "Sequence[str] | None"
Filter: TypeAlias = "pc.Expression | None"
PathLike = str | os.PathLike[str]


class NotTabularError(TypeError, ValueError):
    """An object that is no kind of tabular data. A ``TypeError`` (the wrong kind of object)
    and a ``ValueError`` (a bad argument, like every other refused parameter)."""


# -- classification -------------------------------------------------------------------------------


def is_dataset(obj: object) -> bool:
    """True for a ``pyarrow.dataset.Dataset``, without importing pyarrow.dataset."""
    module = sys.modules.get("pyarrow._dataset")
    return module is not None and isinstance(obj, module.Dataset)


def _is_path_list(obj: object) -> bool:
    return (
        isinstance(obj, (list, tuple))
        and bool(obj)
        and all(isinstance(p, (str, os.PathLike)) for p in obj)
    )


def tabular_kind(obj: object) -> Kind | None:
    """Which kind of tabular input ``obj`` is, or None; nothing is read or consumed."""
    if isinstance(obj, ChunkStream):
        return STREAM
    if isinstance(obj, (pa.Table, pa.RecordBatch)):
        return TABLE
    if isinstance(obj, pa.RecordBatchReader):
        return READER
    if is_dataset(obj):
        return DATASET
    if isinstance(obj, (str, os.PathLike)) or _is_path_list(obj):
        return PATHS
    if isinstance(obj, Iterable) and not isinstance(obj, (bytes, bytearray, dict)):
        return BATCHES
    return None


def is_tabular(obj: object) -> bool:
    """True for data that is tabular without running or reading anything to find out: a Table,
    RecordBatch, RecordBatchReader, Dataset, ChunkStream, or a list or tuple of Tables and
    RecordBatches. Not for paths (a string is data only to a reader) nor for other iterables
    (a generator's items are unknown until it runs); ``tabular_source`` accepts those too."""
    kind = tabular_kind(obj)
    if kind in (DATASET, TABLE, READER, STREAM):
        return True
    return (
        kind == BATCHES
        and isinstance(obj, (list, tuple))
        and all(isinstance(item, (pa.Table, pa.RecordBatch)) for item in obj)
    )


def require_tabular(obj: object, what: str = "data") -> Kind:
    """``tabular_kind(obj)``, or a ``NotTabularError`` naming ``what`` and the accepted kinds."""
    kind = tabular_kind(obj)
    if kind is None:
        raise NotTabularError(f"{what} must be {ACCEPTED}; got {type(obj).__name__}")
    return kind


def tabular_source(
    data: object,
    *,
    filesystem: fsspec.AbstractFileSystem | pafs.FileSystem | None = None,
    storage_options: dict[str, Any] | None = None,
    format: str = "parquet",
    partitioning: Any = None,
    scan_paths: bool = False,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    what: str = "data",
) -> TabularSource:
    """``data`` as a ``TabularSource`` (see the module docstring for the kinds).

    Paths are resolved with ``filesystem`` / ``storage_options`` and read as Parquet files,
    or scanned as a pyarrow dataset with ``scan_paths`` (always for another ``format`` or a
    ``partitioning``). An iterable of batches is re-chunked to ``chunk_rows`` before any
    chunk size asked of ``chunks``. ``what`` names the argument in errors. A ChunkStream
    already iterated is refused (streams are single-pass).
    """
    kind = require_tabular(data, what)
    if kind == STREAM:
        assert isinstance(data, ChunkStream)
        if data.consumed:
            raise ValueError(
                f"{what}: this ChunkStream was already iterated (streams are single-pass)"
            )
        return _StreamSource(data)
    if kind == TABLE:
        table = pa.Table.from_batches([data]) if isinstance(data, pa.RecordBatch) else data
        return _TableSource(table)  # type: ignore[arg-type]
    if kind == READER:
        return _ReaderSource(data)  # type: ignore[arg-type]
    if kind == DATASET:
        return _ScanSource(data, "dataset")  # type: ignore[arg-type]
    if kind == PATHS:
        if scan_paths or format != "parquet" or partitioning is not None:
            dataset = open_dataset(
                data,  # type: ignore[arg-type]
                filesystem=filesystem,
                storage_options=storage_options,
                format=format,
                partitioning=partitioning,
            )
            return _ScanSource(dataset, "dataset")
        return _open_parquet_files(data, filesystem, storage_options)  # type: ignore[arg-type]
    return _BatchesSource(data, positive_int("chunk_rows", chunk_rows))  # type: ignore[arg-type]


# -- the normalized source ----------------------------------------------------------------------


class TabularSource(ABC):
    """Tabular data of any kind, read in chunks.

    ``schema``; ``total_rows`` (None unless known without reading data; ``count_rows`` may
    read footers or metadata to learn it); ``rereadable`` (may ``chunks`` be called again:
    tables, paths and datasets, not readers, streams and iterables); ``files`` (the Parquet
    files behind it, when there are files). Use it as a context manager, or ``close`` it:
    closing releases the data (a stream made by ``stream`` closes its source when it ends).
    """

    kind: Kind
    #: ``_read`` cuts the chunks itself (a table's slices; a file's row groups, see ``chunks``).
    _sized = False

    def __init__(
        self,
        kind: Kind,
        description: str,
        schema: pa.Schema | None,
        *,
        rereadable: bool,
        total_rows: int | None = None,
        files: tuple[str, ...] = (),
    ) -> None:
        self.kind = kind
        self.description = description
        self.rereadable = rereadable
        self.total_rows = total_rows
        self.files = files
        self._schema = schema
        self._reads = 0
        self._closed = False
        #: Bytes one chunk may take (set by the caller from its memory budget): Parquet files
        #: of wide rows are read in fewer rows than asked. None: rows only.
        self.chunk_bytes: float | None = None

    @property
    def schema(self) -> pa.Schema:
        """The schema (an iterable's is its first item's, read when first asked for)."""
        assert self._schema is not None
        return self._schema

    @property
    def known_schema(self) -> pa.Schema | None:
        """The schema when it is known without reading a row (an iterable's is not)."""
        return self.schema

    def row_bytes(self, columns: Sequence[str] | None = None) -> float | None:
        """Bytes per row of ``columns`` (all when None) when footers or memory tell without
        reading data (Parquet: uncompressed column-chunk sizes over rows); else None."""
        return None

    def count_rows(
        self, filter: pc.Expression | None = None, *, batch_rows: int | None = None
    ) -> int | None:
        """Rows (matching ``filter``) when counting them reads no data but footers or metadata
        (with a filter: a counting pass over its columns, where the kind allows); else None.
        ``batch_rows`` sizes a counting scan's batches."""
        return self.total_rows if filter is None else None

    def chunks(
        self,
        rows: Rows = None,
        *,
        columns: Sequence[str] | None = None,
        filter: pc.Expression | None = None,
    ) -> Iterator[pa.Table]:
        """The rows in order, as tables of at most ``rows`` rows (``rows()`` is asked before
        every chunk, so the size may adapt; None: as the data comes). Parquet files are read
        at the size asked when each file is opened, and a file's whole row group comes as one
        table when it is at most twice that size: a batch across row groups costs the reader
        a concatenation. ``filter`` keeps matching rows (pushed
        into a scan); ``columns`` keeps those of them each table has. A second call on a
        source that cannot be read again raises ``RuntimeError``."""
        size = _size_function(rows)
        self._begin_read()
        _schema, items = self._read(size, columns, filter)
        if size is None or self._sized:
            return items
        return _sliced(items, size)

    def stream(
        self,
        chunk_size_rows: int,
        *,
        columns: Sequence[str] | None = None,
        filter: pc.Expression | None = None,
    ) -> ChunkStream:
        """The rows as a ``ChunkStream`` of ``chunk_size_rows``-row chunks, projected to
        ``columns`` and filtered, which are checked against the schema first (a ValueError
        naming the column or the filter's problem)."""
        schema = _checked_schema(self.schema, columns, filter)
        self._begin_read()
        read_schema, items = self._read(lambda: chunk_size_rows, columns, filter)
        return ChunkStream(
            items,
            read_schema or schema,
            chunk_size_rows=chunk_size_rows,
            total_rows=self.total_rows if filter is None else None,
            on_close=self.close,
        )

    def close(self) -> None:
        """Release the data and what it holds open (a reader, a stream, a generator); the
        source cannot be read afterwards."""
        if not self._closed:
            self._closed = True
            self._release()

    def __enter__(self) -> TabularSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TabularSource({self.kind}: {self.description}, rows={self.total_rows})"

    def _begin_read(self) -> None:
        if self._closed:
            raise RuntimeError(f"{self.description} is closed")
        if self._reads and not self.rereadable:
            raise RuntimeError(f"{self.description} can be read only once")
        self._reads += 1

    @abstractmethod
    def _read(
        self, rows: RowsFn, columns: Columns, filter: Filter
    ) -> tuple[pa.Schema | None, Iterator[pa.Table]]:
        """The schema read with (None: the projected schema) and the tables, read at about
        ``rows()`` rows each; anything a scan refuses is raised here, before iteration."""

    @abstractmethod
    def _release(self) -> None:
        """Drop the references to the data (a ChunkStream keeps its ``on_close`` hooks, and
        so this source, as long as it lives) and close what is open."""


class _TableSource(TabularSource):
    _sized = True

    def __init__(self, table: pa.Table) -> None:
        super().__init__(TABLE, "table", table.schema, rereadable=True, total_rows=table.num_rows)
        self._table: pa.Table | None = table

    def count_rows(
        self, filter: pc.Expression | None = None, *, batch_rows: int | None = None
    ) -> int | None:
        if filter is None or self._table is None:
            return self.total_rows if filter is None else None
        import pyarrow.dataset as ds

        return ds.dataset(self._table).count_rows(filter=filter)

    def _read(
        self, rows: RowsFn, columns: Columns, filter: Filter
    ) -> tuple[pa.Schema | None, Iterator[pa.Table]]:
        return None, self._slices(rows, columns, filter)

    def _slices(
        self,
        rows: RowsFn,
        columns: Columns,
        filter: Filter,
    ) -> Iterator[pa.Table]:
        table = self._table
        assert table is not None
        if rows is None:
            yield _project(table, columns, filter)
            return
        start = 0
        while start < table.num_rows:
            size = rows()
            yield _project(table.slice(start, size), columns, filter)
            start += size

    def row_bytes(self, columns: Sequence[str] | None = None) -> float | None:
        table = self._table
        if table is None or not table.num_rows:
            return None
        if columns is not None:
            table = table.select([c for c in columns if c in table.column_names])
        return table.nbytes / table.num_rows

    def _release(self) -> None:
        self._table = None


class _ReaderSource(TabularSource):
    def __init__(self, reader: pa.RecordBatchReader) -> None:
        super().__init__(READER, "RecordBatchReader", reader.schema, rereadable=False)
        self._reader: pa.RecordBatchReader | None = reader

    def _read(
        self, rows: RowsFn, columns: Columns, filter: Filter
    ) -> tuple[pa.Schema | None, Iterator[pa.Table]]:
        return None, self._batches(columns, filter)

    def _batches(
        self, columns: Sequence[str] | None, filter: pc.Expression | None
    ) -> Iterator[pa.Table]:
        reader = self._reader
        assert reader is not None
        try:
            for batch in reader:
                yield _project(batch, columns, filter)
        finally:
            reader.close()

    def _release(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.close()


class _StreamSource(TabularSource):
    """A ChunkStream: read once, in its own chunks."""

    def __init__(self, stream: ChunkStream | None, kind: Kind = STREAM) -> None:
        description = "ChunkStream" if kind == STREAM else "iterable"
        total = stream.total_rows if stream is not None else None
        super().__init__(kind, description, None, rereadable=False, total_rows=total)
        self._stream_ = stream

    @property
    def _stream(self) -> ChunkStream:
        assert self._stream_ is not None
        return self._stream_

    @property
    def schema(self) -> pa.Schema:
        if self._schema is None:
            if self._closed:
                raise RuntimeError(f"{self.description} is closed")
            self._schema = self._stream.schema
        return self._schema

    def stream(
        self,
        chunk_size_rows: int,
        *,
        columns: Sequence[str] | None = None,
        filter: pc.Expression | None = None,
    ) -> ChunkStream:
        """Without ``columns`` and ``filter``: the stream itself, at ``chunk_size_rows``."""
        self._stream.chunk_size_rows = chunk_size_rows
        if columns is None and filter is None:
            self._begin_read()
            return self._stream
        return super().stream(chunk_size_rows, columns=columns, filter=filter)

    def _read(
        self, rows: RowsFn, columns: Columns, filter: Filter
    ) -> tuple[pa.Schema | None, Iterator[pa.Table]]:
        return None, (_project(chunk, columns, filter) for chunk in self._stream)

    def _release(self) -> None:
        stream, self._stream_ = self._stream_, None
        if stream is not None:
            stream.close()


class _BatchesSource(_StreamSource):
    """An iterable of batches or tables. Its items are conformed to the first one's schema
    and re-chunked by a ChunkStream, made when the schema or sized chunks are asked for;
    until then nothing is pulled, and ``chunks()`` passes the items on as they come."""

    def __init__(self, items: Iterable[Any], chunk_rows: int) -> None:
        super().__init__(None, BATCHES)
        self._items = items
        self._chunk_rows = chunk_rows

    @property
    def _stream(self) -> ChunkStream:
        if self._stream_ is None:
            self._stream_ = ChunkStream(self._items, chunk_size_rows=self._chunk_rows)
        return self._stream_

    @property
    def known_schema(self) -> pa.Schema | None:
        return self._schema  # None until the first item was read

    def _read(
        self, rows: RowsFn, columns: Columns, filter: Filter
    ) -> tuple[pa.Schema | None, Iterator[pa.Table]]:
        if rows is None and self._stream_ is None:
            return None, (_project(_as_table(item), columns, filter) for item in self._items)
        return super()._read(rows, columns, filter)

    def _release(self) -> None:
        stream, self._stream_ = self._stream_, None
        items, self._items = self._items, ()
        if stream is not None:
            stream.close()  # closes the items too
            return
        close = getattr(items, "close", None)
        if callable(close):
            close()


class _ScanSource(TabularSource):
    """A pyarrow dataset, scanned with bounded readahead."""

    def __init__(self, dataset: ds.Dataset, description: str) -> None:
        files = tuple(getattr(dataset, "files", None) or ())
        super().__init__(DATASET, description, dataset.schema, rereadable=True, files=files)
        self.dataset: ds.Dataset | None = dataset

    def count_rows(
        self, filter: pc.Expression | None = None, *, batch_rows: int | None = None
    ) -> int | None:
        import pyarrow.dataset as ds

        dataset = self.dataset
        if dataset is None:
            return self.total_rows if filter is None else None
        metadata_only = isinstance(dataset, ds.InMemoryDataset) or isinstance(
            getattr(dataset, "format", None), ds.ParquetFileFormat
        )
        if filter is None and not metadata_only:
            return None  # CSV, JSON: counting is a full scan
        options: dict[str, Any] = {} if batch_rows is None else {"batch_size": batch_rows}
        count = dataset.count_rows(
            filter=filter,
            batch_readahead=BATCH_READAHEAD,
            fragment_readahead=FRAGMENT_READAHEAD,
            fragment_scan_options=fragment_scan_options(dataset),
            cache_metadata=False,
            **options,
        )
        if filter is None:
            self.total_rows = count
        return count

    def _read(
        self, rows: RowsFn, columns: Columns, filter: Filter
    ) -> tuple[pa.Schema | None, Iterator[pa.Table]]:
        assert self.dataset is not None
        batch_rows = None if rows is None else rows()
        scanner = bounded_scanner(
            self.dataset, columns=columns, filter=filter, batch_rows=batch_rows
        )
        if is_plain_parquet_dataset(self.dataset):
            # Pulled file by file: a scanner decodes ahead of a slow consumer (see reader).
            dataset = self.dataset

            def one_file(fragment: ds.Fragment) -> Iterator[pa.Table]:
                return _scan(
                    bounded_scanner(
                        dataset,
                        columns=columns,
                        filter=filter,
                        batch_rows=batch_rows,
                        fragment=fragment,
                    )
                )

            items = parquet_batches(
                dataset,
                rows,
                columns=columns,
                filter=filter,
                budget_bytes=self.chunk_bytes,
                fallback=one_file,
            )
            return scanner.projected_schema, items
        return scanner.projected_schema, _scan(scanner)

    def row_bytes(self, columns: Sequence[str] | None = None) -> float | None:
        """The first Parquet file's (one footer read)."""
        if self.dataset is None or not is_plain_parquet_dataset(self.dataset):
            return None
        for fragment in self.dataset.get_fragments():
            with fragment.filesystem.open_input_file(fragment.path) as fh:
                width = row_bytes(pq.ParquetFile(fh, pre_buffer=False).metadata, columns)
            if width is not None:
                return width
        return None

    def _release(self) -> None:
        self.dataset = None  # an in-memory dataset holds its table


class _ParquetFilesSource(TabularSource):
    """Parquet files read by their footers and row groups, without pyarrow.dataset."""

    _sized = True

    def __init__(
        self,
        fs: fsspec.AbstractFileSystem,
        files: tuple[str, ...],
        schema: pa.Schema,
        total_rows: int,
        description: str,
        arrow_fs: pafs.FileSystem | None = None,
    ) -> None:
        super().__init__(
            PATHS, description, schema, rereadable=True, total_rows=total_rows, files=files
        )
        self.filesystem = fs
        self.arrow_fs = arrow_fs if arrow_fs is not None else arrow_filesystem(fs)
        self.footers: tuple[pq.FileMetaData, ...] = ()

    def row_bytes(self, columns: Sequence[str] | None = None) -> float | None:
        widths = [(md.num_rows, row_bytes(md, columns)) for md in self.footers]
        rows = sum(n for n, w in widths if w is not None)
        if not rows:
            return None
        return sum(n * w for n, w in widths if w is not None) / rows

    def _read(
        self, rows: RowsFn, columns: Columns, filter: Filter
    ) -> tuple[pa.Schema | None, Iterator[pa.Table]]:
        return None, self._file_chunks(rows, columns, filter)

    def _file_chunks(
        self,
        rows: RowsFn,
        columns: Columns,
        filter: Filter,
    ) -> Iterator[pa.Table]:
        afs = self.arrow_fs  # a snapshot's: the files as listed, even once a commit moved them
        for path in self.files:
            with afs.open_input_file(path) as fh:
                pf = open_parquet(fh)
                cols = None
                if columns is not None:
                    cols = [c for c in columns if c in pf.schema_arrow.names]
                md = pf.metadata
                if rows is None:
                    # As the data comes: a row group at a time, unless it is wider than a chunk.
                    size = max(
                        (md.row_group(i).num_rows for i in range(md.num_row_groups)), default=1
                    )
                else:
                    size = aligned_batch_rows(md, rows())
                if self.chunk_bytes is not None:
                    size = rows_for_bytes(self.chunk_bytes, row_bytes(md, cols), size)
                for batch in iter_file_batches(pf, size, columns=cols):
                    yield _project(batch, None, filter)

    def _release(self) -> None:
        """Nothing stays open between reads: each read opens and closes its files."""


# -- opening paths ------------------------------------------------------------------------------


def open_dataset(
    source: PathLike | Sequence[PathLike] | ds.Dataset,
    *,
    filesystem: fsspec.AbstractFileSystem | pafs.FileSystem | None = None,
    storage_options: dict[str, Any] | None = None,
    format: str = "parquet",
    partitioning: Any = None,
) -> ds.Dataset:
    """A ``pyarrow.dataset.Dataset`` for a path, URL or list of them (hidden paths skipped)."""
    import pyarrow.dataset as ds

    if is_dataset(source):
        return source  # type: ignore[return-value]
    if isinstance(source, (str, os.PathLike)):
        fs, path = resolve_filesystem(source, filesystem, storage_options)
        # A snapshot, not pyarrow's own listing: exactly the before or the after state of a
        # commit running meanwhile (see ``snapshot``).
        snap = snapshot(fs, path)
        if snap.kind == "missing":
            raise FileNotFoundError(f"no dataset at {os.fspath(source)!r}")
        if snap.kind == "directory":
            return as_dataset([snap], format=format, partitioning=partitioning)
        target: str | list[str] = path
    else:
        paths = list(source)  # type: ignore[arg-type]
        if not paths or not all(isinstance(p, (str, os.PathLike)) for p in paths):
            raise ValueError("dataset: a list source must be a non-empty list of paths")
        fs, first = resolve_filesystem(paths[0], filesystem, storage_options)
        target = [first] + [fs._strip_protocol(os.fspath(p)) for p in paths[1:]]
    return ds.dataset(
        target, filesystem=arrow_filesystem(fs), format=format, partitioning=partitioning
    )


def _open_parquet_files(
    data: PathLike | Sequence[PathLike],
    filesystem: fsspec.AbstractFileSystem | pafs.FileSystem | None,
    storage_options: dict[str, Any] | None,
) -> _ParquetFilesSource:
    """Every Parquet file under the path(s), with their footers' row counts and first schema.

    Each directory is read as a snapshot: the files of one committed version, opened where
    they are even once a later commit moved them (see ``snapshot``).
    """
    paths = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    fs, _ = resolve_filesystem(paths[0], filesystem, storage_options)
    files: list[str] = []
    snapshots = []
    for raw in paths:
        path = fs._strip_protocol(os.fspath(raw))
        snap = snapshot(fs, path)
        if not snap.files:
            what = "holds no Parquet files" if fs.exists(path) else "does not exist"
            raise ValueError(f"source {os.fspath(raw)!r} {what}")
        snapshots.append(snap)
        files += snap.files
    afs = snapshot_filesystem(fs, snapshots)
    total = 0
    schema = None
    footers = []
    for f in files:
        try:
            with afs.open_input_file(f) as fh:
                pf = pq.ParquetFile(fh, pre_buffer=False)
                total += pf.metadata.num_rows
                schema = schema or pf.schema_arrow
                footers.append(pf.metadata)
        except (pa.ArrowInvalid, OSError) as exc:
            raise ValueError(f"source file {f!r} is not a readable Parquet file: {exc}") from exc
    assert schema is not None
    description = f"source {os.fspath(paths[0])}"
    if len(paths) > 1:
        description += f" and {len(paths) - 1} more path(s)"
    source = _ParquetFilesSource(fs, tuple(files), schema, total, description, afs)
    source.footers = tuple(footers)
    return source


def bounded_scanner(
    dataset: ds.Dataset,
    *,
    columns: Sequence[str] | None = None,
    filter: pc.Expression | None = None,
    batch_rows: int | None = None,
    fragment: ds.Fragment | None = None,
) -> ds.Scanner:
    """A scanner over ``dataset`` within the readahead bounds of the module docstring.

    Building it binds ``columns`` and ``filter`` to the schema (no I/O yet): what they get
    wrong is a ValueError naming them.
    """
    options: dict[str, Any] = {} if batch_rows is None else {"batch_size": batch_rows}
    try:
        if fragment is not None:
            return fragment.scanner(
                schema=dataset.schema,
                columns=None if columns is None else list(columns),
                filter=filter,
                batch_readahead=BATCH_READAHEAD,
                fragment_scan_options=fragment_scan_options(dataset),
                use_threads=True,
                cache_metadata=False,
                **options,
            )
        return dataset.scanner(
            columns=None if columns is None else list(columns),
            filter=filter,
            batch_readahead=BATCH_READAHEAD,
            fragment_readahead=FRAGMENT_READAHEAD,
            fragment_scan_options=fragment_scan_options(dataset),
            use_threads=True,
            cache_metadata=False,
            **options,
        )
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
        what = "filter" if filter is not None else "columns"
        raise ValueError(f"{what}: {exc}") from None


def fragment_scan_options(dataset: ds.Dataset) -> ds.FragmentScanOptions | None:
    """Local Parquet: no pre-buffering (it only pays off on high-latency stores, and it holds
    whole row groups of column chunks; measured on local disk: less memory, same speed)."""
    import pyarrow.dataset as ds

    fmt = getattr(dataset, "format", None)
    local = is_local_arrow(getattr(dataset, "filesystem", None))
    if isinstance(fmt, ds.ParquetFileFormat) and local:
        return ds.ParquetFragmentScanOptions(pre_buffer=False)
    return None


# -- helpers --------------------------------------------------------------------------------------


def _size_function(rows: Rows) -> Callable[[], int] | None:
    if rows is None or callable(rows):
        return rows
    size = positive_int("rows", rows)
    return lambda: size


def _as_table(item: object) -> pa.Table:
    if isinstance(item, pa.Table):
        return item
    if isinstance(item, pa.RecordBatch):
        return pa.Table.from_batches([item])
    raise TypeError(f"items must be pyarrow RecordBatch or Table, got {type(item).__name__}")


def _project(
    item: pa.Table | pa.RecordBatch,
    columns: Sequence[str] | None,
    filter: pc.Expression | None,
) -> pa.Table:
    """Filter, then keep ``columns`` (those the item has; the filter may use others)."""
    table = item if isinstance(item, pa.Table) else pa.Table.from_batches([item])
    if filter is not None:
        table = table.filter(filter)
    if columns is not None:
        names = set(table.column_names)
        table = table.select([c for c in columns if c in names])
    return table


def _sliced(items: Iterator[pa.Table], rows: Callable[[], int]) -> Iterator[pa.Table]:
    for table in items:
        start = 0
        while start < table.num_rows:
            size = rows()
            yield table.slice(start, size)
            start += size


def _scan(scanner: ds.Scanner) -> Iterator[pa.Table]:
    reader = scanner.to_reader()
    try:
        for batch in reader:
            yield pa.Table.from_batches([batch])
    finally:
        reader.close()


def _checked_schema(
    schema: pa.Schema,
    columns: Sequence[str] | None,
    filter: pc.Expression | None,
) -> pa.Schema:
    """The projected schema; a ValueError naming the column or the filter's problem."""
    if columns is not None:
        missing = [c for c in columns if schema.get_field_index(c) < 0]
        if missing:
            raise ValueError(f"columns: {missing} not in the data (it has {schema.names})")
    if filter is not None:
        try:
            schema.empty_table().filter(filter)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
            raise ValueError(f"filter: {exc}") from None
    if columns is None:
        return schema
    return pa.schema([schema.field(c) for c in columns], metadata=schema.metadata)
