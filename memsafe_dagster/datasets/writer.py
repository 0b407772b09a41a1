"""ChunkedParquetWriter: write chunks to Parquet in bounded memory and publish atomically.

Nothing appears at the target until a clean close. A single file is written to a hidden
sibling (``.<name>.memsafe-<id>.tmp``, skipped by every reader) and renamed on close; a
dataset directory is written through ``commit.DatasetTransaction``: files are staged under
``_memsafe/`` and published together by one commit record. An exception (or a writer dropped
without closing) leaves no partial file behind.

Row groups hold exactly ``row_group_size`` rows whatever the sizes of the incoming chunks (the
last one of a file may be smaller): rows are buffered up to one row group, so memory is bounded
by ``row_group_size`` plus one incoming chunk. The files are written by ``sink.OutputSink``,
the sink the merge writes through too.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from memsafe_dagster.checks import optional_positive_int
from memsafe_dagster.datasets.commit import DatasetTransaction
from memsafe_dagster.datasets.filesystem import (
    arrow_filesystem,
    is_local,
    resolve_filesystem,
)
from memsafe_dagster.datasets.parquet import check_compression
from memsafe_dagster.datasets.schema import conform_batch, record_batches
from memsafe_dagster.datasets.sink import OutputSink, SettingsProvider, WrittenFile
from memsafe_dagster.datasets.snapshot import base_files
from memsafe_dagster.datasets.source import (
    BATCHES,
    READER,
    STREAM,
    TABLE,
    tabular_kind,
    tabular_source,
)
from memsafe_dagster.datasets.stream import ChunkStream

WRITE_MODES = ("append", "overwrite")


@dataclass
class WriteResult:
    """What a writer published: rows, files, bytes, row groups (for asset metadata)."""

    path: str
    rows: int = 0
    files: list[str] = field(default_factory=list)
    bytes: int = 0
    row_groups: int = 0
    chunks: int = 0
    schema: pa.Schema | None = None
    duration_s: float = 0.0
    mode: str | None = None
    files_removed: list[str] = field(default_factory=list)
    txn: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; the schema as ``{column: type}``."""
        return {
            "path": self.path,
            "rows": self.rows,
            "files": list(self.files),
            "bytes": self.bytes,
            "row_groups": self.row_groups,
            "chunks": self.chunks,
            "schema": (None if self.schema is None else {f.name: str(f.type) for f in self.schema}),
            "duration_s": round(self.duration_s, 4),
            "mode": self.mode,
            "files_removed": list(self.files_removed),
            "txn": self.txn,
        }


class _Resources:
    """What a writer must release if it is dropped without close (used by its finalizer)."""

    def __init__(self) -> None:
        self.sink: OutputSink | None = None
        self.txn: DatasetTransaction | None = None
        self.temp: str | None = None
        self.fs: fsspec.AbstractFileSystem | None = None

    def release(self) -> None:
        if self.sink is not None:
            self.sink.abort()
            self.sink = None
        if self.temp is not None and self.fs is not None:
            with contextlib.suppress(FileNotFoundError, OSError):
                self.fs.rm_file(self.temp)
            self.temp = None
        if self.txn is not None:
            txn, self.txn = self.txn, None
            txn.__exit__(RuntimeError, None, None)


def _temp_file_factory(
    fs: fsspec.AbstractFileSystem, path: str, res: _Resources
) -> Callable[[str, str], str]:
    """Names the hidden temp sibling of ``path`` that a single-file writer writes to."""

    def temp_file(_directory: str, _prefix: str) -> str:
        if res.temp is not None:
            raise RuntimeError("a single-file writer opens one file")
        parent, name = posixpath.split(path)
        temp = posixpath.join(parent, f".{name}.memsafe-{uuid.uuid4().hex[:12]}.tmp")
        if parent and not is_local(fs):
            fs.makedirs(parent, exist_ok=True)
        res.temp = temp
        return temp

    return temp_file


class ChunkedParquetWriter:
    """Write tables and batches chunk by chunk to Parquet; publish atomically on close.

    Without ``max_rows_per_file`` ``path`` is one Parquet file, written to a hidden temp sibling
    and renamed into place on close (an existing file is replaced). With it, ``path`` is a
    directory of rolled ``part-00000.parquet``, ``part-00001.parquet``, ... files published by
    one ``DatasetTransaction`` (operation ``"write"``) that also removes the data files the
    directory held before; ``ChunkedParquetWriter.to_dataset`` appends to or overwrites a
    dataset instead. Incoming chunks must match ``schema`` (by default the first chunk's) or
    cast to it losslessly, else ``ValueError`` names the column. Use it as a context manager:
    an exception inside the block discards everything written.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        filesystem: fsspec.AbstractFileSystem | pafs.FileSystem | None = None,
        schema: pa.Schema | None = None,
        compression: str | None = "zstd",
        row_group_size: int | None = None,
        max_rows_per_file: int | None = None,
        compression_level: int | None = None,
        storage_options: Mapping[str, Any] | None = None,
        parquet_options: Mapping[str, Any] | None = None,
        lock_timeout_s: float = 30.0,
    ) -> None:
        self._init(
            path,
            filesystem=filesystem,
            schema=schema,
            compression=compression,
            row_group_size=row_group_size,
            max_rows_per_file=max_rows_per_file,
            compression_level=compression_level,
            storage_options=storage_options,
            parquet_options=parquet_options,
            lock_timeout_s=lock_timeout_s,
            dataset_mode="replace" if max_rows_per_file is not None else None,
        )

    @classmethod
    def to_dataset(
        cls,
        path: str | os.PathLike[str],
        mode: str = "append",
        *,
        filesystem: fsspec.AbstractFileSystem | pafs.FileSystem | None = None,
        schema: pa.Schema | None = None,
        compression: str | None = "zstd",
        row_group_size: int | None = None,
        max_rows_per_file: int | None = None,
        compression_level: int | None = None,
        storage_options: Mapping[str, Any] | None = None,
        parquet_options: Mapping[str, Any] | None = None,
        lock_timeout_s: float = 30.0,
    ) -> ChunkedParquetWriter:
        """A writer that adds files to the dataset directory ``path`` in one commit.

        ``mode="append"`` keeps the existing files, and the new rows must match the existing
        dataset's schema (lossless casts are made, anything else is a ``ValueError`` naming
        the column). ``mode="overwrite"`` removes every existing data file in the same commit.
        File names are fresh (``part-<txn>-NNNNN.parquet``). Recovery of an earlier crashed
        writer runs first, under the dataset's lock, which is held until close.
        """
        if mode not in WRITE_MODES:
            raise ValueError(f"mode must be one of {WRITE_MODES}, got {mode!r}")
        self = cls.__new__(cls)
        self._init(
            path,
            filesystem=filesystem,
            schema=schema,
            compression=compression,
            row_group_size=row_group_size,
            max_rows_per_file=max_rows_per_file,
            compression_level=compression_level,
            storage_options=storage_options,
            parquet_options=parquet_options,
            lock_timeout_s=lock_timeout_s,
            dataset_mode=mode,
        )
        return self

    def _init(
        self,
        path: str | os.PathLike[str],
        *,
        filesystem: fsspec.AbstractFileSystem | pafs.FileSystem | None,
        schema: pa.Schema | None,
        compression: str | None,
        row_group_size: int | None,
        max_rows_per_file: int | None,
        compression_level: int | None,
        storage_options: Mapping[str, Any] | None,
        parquet_options: Mapping[str, Any] | None,
        lock_timeout_s: float,
        dataset_mode: str | None,
    ) -> None:
        self.compression = check_compression(compression, compression_level)
        self.compression_level = compression_level
        self.row_group_size = optional_positive_int("row_group_size", row_group_size)
        self.max_rows_per_file = optional_positive_int("max_rows_per_file", max_rows_per_file)
        if schema is not None and not isinstance(schema, pa.Schema):
            raise ValueError(f"schema must be a pyarrow.Schema, got {type(schema).__name__}")
        self.fs, self.path = resolve_filesystem(path, filesystem, storage_options)
        self.path = self.path.rstrip("/") or self.path
        self._dataset_mode = dataset_mode
        self._parquet_options = dict(parquet_options or {})
        self._lock_timeout_s = lock_timeout_s
        if dataset_mode is None:
            if self.fs.isdir(self.path):
                raise ValueError(
                    f"path {self.path!r} is a directory: ChunkedParquetWriter writes one file "
                    "unless max_rows_per_file is set (or use ChunkedParquetWriter.to_dataset)"
                )
        elif self.fs.isfile(self.path):
            raise ValueError(f"path {self.path!r} is a file, not a dataset directory")
        self._schema = schema
        self._res = _Resources()
        self._res.fs = self.fs
        self._finalizer = weakref.finalize(self, _Resources.release, self._res)
        self._state = "open"
        self._rows = 0
        self._chunks = 0
        self._started = time.perf_counter()
        self._existing: list[str] = []
        self._result: WriteResult | None = None

    # -- properties -------------------------------------------------------------------------

    @property
    def schema(self) -> pa.Schema | None:
        """The schema rows are written with (known after the first chunk when not given)."""
        return self._schema

    @property
    def rows_written(self) -> int:
        return self._rows

    @property
    def closed(self) -> bool:
        return self._state != "open"

    @property
    def result(self) -> WriteResult | None:
        """What was published, once closed cleanly."""
        return self._result

    @property
    def files(self) -> list[str]:
        """Published file paths (after close)."""
        return [] if self._result is None else list(self._result.files)

    @property
    def bytes_written(self) -> int:
        return 0 if self._result is None else self._result.bytes

    # -- writing ----------------------------------------------------------------------------

    def write(self, data: pa.Table | pa.RecordBatch) -> None:
        """Write one table or record batch (cast losslessly to the schema, else ValueError)."""
        if self._state != "open":
            raise ValueError(
                f"writer for {self.path!r} is {self._state}; nothing more can be written"
            )
        batches = record_batches(data)
        if batches is None:
            raise TypeError(
                "write() takes a pyarrow Table or RecordBatch; use write_stream() for a "
                f"ChunkStream, RecordBatchReader or iterable, got {type(data).__name__}"
            )
        sink = self._sink_for(data.schema)
        target = sink.settings.schema
        conformed = [
            b if b.schema.equals(target) else conform_batch(b, target, "the writer's")
            for b in batches
        ]
        sink.write(pa.Table.from_batches(conformed, schema=target))
        self._rows += sum(b.num_rows for b in conformed)
        self._chunks += 1

    def write_stream(
        self, source: ChunkStream | pa.RecordBatchReader | pa.Table | Iterable[Any]
    ) -> int:
        """Write every chunk of a ChunkStream, reader, table or iterable of batches as it comes;
        returns rows written. Paths and datasets are read in bounded memory by
        ``process_in_chunks``: pass its stream."""
        before = self._rows
        kind = tabular_kind(source)
        if kind == TABLE:
            self.write(source)  # type: ignore[arg-type]
            return self._rows - before
        if kind not in (STREAM, READER, BATCHES):
            raise TypeError(
                f"write_stream() cannot write a {type(source).__name__}: pass a ChunkStream "
                "(process_in_chunks reads paths and datasets), a RecordBatchReader, a Table or "
                "an iterable of batches"
            )
        data = tabular_source(source, what="write_stream()")
        if kind != BATCHES and self._schema is None and self._dataset_mode != "append":
            self._sink_for(data.schema)  # an empty stream still writes its schema
        try:
            for chunk in data.chunks():
                self.write(chunk)
        finally:
            data.close()
        return self._rows - before

    def _sink_for(self, incoming: pa.Schema) -> OutputSink:
        if self._res.sink is not None:
            return self._res.sink
        if self._dataset_mode is not None:
            self._begin_transaction()
            self._schema = self._dataset_schema(incoming)
            txn = self._res.txn
            assert txn is not None
            if self._dataset_mode == "replace":
                counter = iter(range(1 << 30))

                def new_file(_directory: str, _prefix: str) -> str:
                    return txn.new_file(f"part-{next(counter):05d}.parquet")

            else:

                def new_file(_directory: str, prefix: str) -> str:
                    return txn.new_file(prefix=prefix)

        else:
            if self._schema is None:
                self._schema = incoming
            # No reference back to the writer: its finalizer must be able to collect it.
            new_file = _temp_file_factory(self.fs, self.path, self._res)
        settings = SettingsProvider(
            self._schema,
            row_group_size=self.row_group_size,
            compression=self.compression,
            compression_level=self.compression_level,
            parquet_options=self._parquet_options,
        )
        self._res.sink = OutputSink(
            arrow_filesystem(self.fs), settings, new_file, max_rows=self.max_rows_per_file
        )
        return self._res.sink

    def _begin_transaction(self) -> None:
        if self._res.txn is not None:
            return
        txn = DatasetTransaction(
            self.fs, self.path, operation="write", lock_timeout_s=self._lock_timeout_s
        )
        txn.__enter__()
        self._res.txn = txn
        self._existing = base_files(txn)

    def _dataset_schema(self, incoming: pa.Schema) -> pa.Schema:
        declared = self._schema or incoming
        if self._dataset_mode != "append" or not self._existing:
            return declared
        existing = pq.read_schema(self._existing[0], filesystem=arrow_filesystem(self.fs))
        existing = existing.remove_metadata()
        if self._schema is not None:
            empty = pa.RecordBatch.from_pylist([], schema=self._schema)
            conform_batch(empty, existing, "the existing dataset's")
        return existing

    # -- closing ----------------------------------------------------------------------------

    def close(self) -> WriteResult:
        """Flush, then publish everything atomically; returns what was written."""
        if self._state == "closed":
            assert self._result is not None
            return self._result
        if self._state != "open":
            raise ValueError(f"writer for {self.path!r} is {self._state}")
        try:
            result = self._publish()
        except BaseException:
            self.abort()
            raise
        self._state = "closed"
        self._finalizer.detach()
        self._result = result
        return result

    def abort(self) -> None:
        """Discard everything written so far; the target is left as it was."""
        if self._state == "closed":
            return
        self._state = "aborted"
        self._finalizer.detach()
        self._res.release()

    def _publish(self) -> WriteResult:
        res = self._res
        if self._dataset_mode is not None:
            if res.sink is None and self._schema is not None:
                self._sink_for(self._schema)
            self._begin_transaction()
            files = res.sink.close(ensure_file=self._needs_empty_file()) if res.sink else []
            res.sink = None
            txn = res.txn
            assert txn is not None
            removed: list[str] = []
            if self._dataset_mode in ("replace", "overwrite"):
                for path in self._existing:
                    txn.remove(path)
                    removed.append(path)
            record = txn.commit(
                info={"rows": self._rows, "files": len(files), "writer": "ChunkedParquetWriter"}
            )
            res.txn = None
            txn.__exit__(None, None, None)
            final = [posixpath.join(self.path, p) for _, p in record.add]
            added = set(final)
            return self._make_result(
                files,
                final,
                removed=[p for p in removed if p not in added],
                txn=record.txn,
            )
        if res.sink is None:
            if self._schema is None:
                return self._make_result([], [])
            self._sink_for(self._schema)
        assert res.sink is not None
        files = res.sink.close(ensure_file=True)
        res.sink = None
        temp = res.temp
        assert temp is not None
        if is_local(self.fs):
            os.replace(temp, self.path)
        else:
            self.fs.mv(temp, self.path)
        res.temp = None
        return self._make_result(files, [self.path])

    def _needs_empty_file(self) -> bool:
        # An empty result still records its schema, unless rows already exist to carry it.
        return self._dataset_mode != "append" or not self._existing

    def _make_result(
        self,
        files: list[WrittenFile],
        final: list[str],
        *,
        removed: list[str] | None = None,
        txn: str | None = None,
    ) -> WriteResult:
        mode = self._dataset_mode
        return WriteResult(
            path=self.path,
            rows=self._rows,
            files=final,
            bytes=sum(f.bytes for f in files),
            row_groups=sum(f.row_groups for f in files),
            chunks=self._chunks,
            schema=self._schema,
            duration_s=time.perf_counter() - self._started,
            mode="overwrite" if mode == "replace" else mode,
            files_removed=removed or [],
            txn=txn,
        )

    def __enter__(self) -> ChunkedParquetWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None:
            self.abort()
        elif self._state == "open":
            self.close()

    def __repr__(self) -> str:
        return (
            f"ChunkedParquetWriter({self.path!r}, rows={self._rows}, "
            f"compression={self.compression!r}, {self._state})"
        )
