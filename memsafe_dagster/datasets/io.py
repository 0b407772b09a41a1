"""PyarrowDatasetIO: read, stream, write, recover and merge Parquet datasets on any filesystem.

Paths are URLs (``s3://bucket/x``, ``memory://x``, ``/local/x``) resolved against the
filesystem given to the constructor, if any. Writes go through the commit protocol of
``commit.DatasetTransaction`` (recovery of an earlier crashed writer runs first, under the
dataset's lock). Reads are snapshot reads (``snapshot``): exactly the state before or after a
commit running meanwhile, a half-applied commit of a crashed writer reading as after, with no
lock and no write access needed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from memsafe_dagster.datasets import commit
from memsafe_dagster.datasets.chunks import process_in_chunks
from memsafe_dagster.datasets.filesystem import resolve_filesystem
from memsafe_dagster.datasets.source import (
    PATHS,
    STREAM,
    TABLE,
    bounded_scanner,
    open_dataset,
    require_tabular,
)
from memsafe_dagster.datasets.stream import ChunkStream
from memsafe_dagster.datasets.writer import WRITE_MODES, ChunkedParquetWriter, WriteResult
from memsafe_dagster.memory import MemoryMonitor

if TYPE_CHECKING:
    from collections.abc import Iterable

    import pyarrow.dataset as ds  # imported where used: it loads pandas when installed

    from memsafe_dagster.datasets.merge import MergeResult

PathLike = str | os.PathLike[str]
WriteSource: TypeAlias = (
    "pa.Table | pa.RecordBatch | pa.RecordBatchReader | ds.Dataset | ChunkStream | PathLike"
    " | Iterable[pa.RecordBatch | pa.Table]"
)


class PyarrowDatasetIO:
    """Parquet dataset reads, streams and crash-safe writes and merges on one filesystem.

    ``filesystem`` (fsspec or PyArrow) is used for every path when given; otherwise each URL's
    protocol picks one, with ``storage_options`` (credentials, endpoints; ``dg.EnvVar`` values
    are read each time a filesystem is resolved) passed through. A merge reads a URL source of
    the target's protocol through the target's filesystem.
    """

    def __init__(
        self,
        filesystem: fsspec.AbstractFileSystem | pafs.FileSystem | None = None,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.filesystem = filesystem
        self.storage_options = dict(storage_options or {})

    def resolve(self, path: PathLike) -> tuple[fsspec.AbstractFileSystem, str]:
        """The fsspec filesystem for ``path`` and the path without its protocol."""
        fs, stripped = resolve_filesystem(path, self.filesystem, self.storage_options)
        return fs, stripped.rstrip("/") or stripped

    # -- reading ----------------------------------------------------------------------------

    def dataset(
        self,
        path: PathLike | Sequence[PathLike],
        *,
        format: str = "parquet",
        partitioning: Any = None,
    ) -> ds.Dataset:
        """A lazy ``pyarrow.dataset.Dataset`` over ``path`` (a file, a directory or a list).

        Hidden paths (``_memsafe/`` state, ``.``-temp files) are skipped. A directory is read
        as a snapshot: one committed version, whatever a concurrent commit does.
        """
        if isinstance(path, (str, os.PathLike)):
            fs, stripped = self.resolve(path)
            return open_dataset(stripped, filesystem=fs, format=format, partitioning=partitioning)
        return open_dataset(
            list(path),
            filesystem=self.filesystem,
            storage_options=self.storage_options,
            format=format,
            partitioning=partitioning,
        )

    def read(
        self,
        path: PathLike | Sequence[PathLike],
        *,
        columns: Sequence[str] | None = None,
        filter: pc.Expression | None = None,
        as_stream: bool = False,
        chunk_size_rows: int = 100_000,
        max_memory_mb: float = 2048,
        memory_monitor: MemoryMonitor | None = None,
        progress_callback: Callable[[int, int | None], Any] | None = None,
        adaptive: bool = True,
        format: str = "parquet",
        partitioning: Any = None,
    ) -> pa.Table | ChunkStream:
        """The dataset at ``path`` as one table (small data), or with ``as_stream=True`` as
        a ``ChunkStream`` of adaptive, bounded-memory chunks (see ``stream``)."""
        if as_stream:
            return self.stream(
                path,
                columns=columns,
                filter=filter,
                chunk_size_rows=chunk_size_rows,
                max_memory_mb=max_memory_mb,
                memory_monitor=memory_monitor,
                progress_callback=progress_callback,
                adaptive=adaptive,
                format=format,
                partitioning=partitioning,
            )
        dataset = self.dataset(path, format=format, partitioning=partitioning)
        if columns is not None:
            missing = [c for c in columns if dataset.schema.get_field_index(c) < 0]
            if missing:
                raise ValueError(
                    f"columns: {missing} not in the dataset (it has {dataset.schema.names})"
                )
        scanner = bounded_scanner(dataset, columns=columns, filter=filter)
        return scanner.to_table()

    def stream(
        self,
        path: PathLike | Sequence[PathLike],
        *,
        columns: Sequence[str] | None = None,
        filter: pc.Expression | None = None,
        chunk_size_rows: int = 100_000,
        max_memory_mb: float = 2048,
        memory_monitor: MemoryMonitor | None = None,
        enable_progress: bool = False,
        progress_callback: Callable[[int, int | None], Any] | None = None,
        adaptive: bool = True,
        format: str = "parquet",
        partitioning: Any = None,
    ) -> ChunkStream:
        """``process_in_chunks`` over the dataset at ``path``."""
        return process_in_chunks(
            self.dataset(path, format=format, partitioning=partitioning),
            chunk_size_rows,
            max_memory_mb,
            memory_monitor,
            enable_progress,
            progress_callback,
            columns=columns,
            filter=filter,
            adaptive=adaptive,
        )

    # -- writing ----------------------------------------------------------------------------

    def write_dataset(
        self,
        data: WriteSource,
        path: PathLike,
        mode: str = "append",
        *,
        compression: str | None = "zstd",
        compression_level: int | None = None,
        row_group_size: int | None = None,
        max_rows_per_file: int | None = None,
        schema: pa.Schema | None = None,
        chunk_size_rows: int = 100_000,
        max_memory_mb: float = 2048,
        memory_monitor: MemoryMonitor | None = None,
        parquet_options: Mapping[str, Any] | None = None,
        lock_timeout_s: float = 30.0,
    ) -> WriteResult:
        """Write ``data`` into the dataset directory ``path`` in one atomic commit.

        ``data``: a Table or RecordBatch, a RecordBatchReader, a ``pyarrow.dataset.Dataset``,
        a ``ChunkStream``, a path or URL of Parquet data, or an iterable of batches; anything
        but an in-memory table is streamed chunk by chunk (``chunk_size_rows``, adaptive to
        ``memory_monitor``; EMERGENCY pressure aborts the write and leaves the target as it
        was). ``mode="append"`` adds files (the rows must match the existing schema, cast
        losslessly, else ``ValueError`` naming the column); ``mode="overwrite"`` adds the new
        files and removes every existing data file in the same commit. Returns rows, files
        and bytes written.
        """
        if mode not in WRITE_MODES:
            raise ValueError(f"mode must be one of {WRITE_MODES}, got {mode!r}")
        kind = require_tabular(data, "data")
        fs, target = self.resolve(path)
        writer = ChunkedParquetWriter.to_dataset(
            target,
            mode,
            filesystem=fs,
            schema=schema,
            compression=compression,
            compression_level=compression_level,
            row_group_size=row_group_size,
            max_rows_per_file=max_rows_per_file,
            parquet_options=parquet_options,
            lock_timeout_s=lock_timeout_s,
        )
        with writer:
            if kind == TABLE:
                writer.write(data)  # type: ignore[arg-type]
            elif kind == STREAM and memory_monitor is None:
                writer.write_stream(data)  # type: ignore[arg-type]
            else:
                if kind == PATHS:
                    data = self.dataset(data)  # type: ignore[arg-type]
                writer.write_stream(
                    process_in_chunks(
                        data,
                        chunk_size_rows,
                        max_memory_mb,
                        memory_monitor,
                        filesystem=self.filesystem,
                        storage_options=self.storage_options,
                    )
                )
        result = writer.result
        assert result is not None
        return result

    def recover(
        self, path: PathLike, *, break_lock: bool = False, lock_timeout_s: float = 30.0
    ) -> commit.RecoveryReport:
        """Roll a crashed writer's commit forward, delete orphaned staging (``commit.recover``)."""
        fs, target = self.resolve(path)
        return commit.recover(fs, target, break_lock=break_lock, lock_timeout_s=lock_timeout_s)

    # -- merging ----------------------------------------------------------------------------

    def merge(
        self,
        data: Any,
        path: PathLike,
        strategy: str = "upsert",
        key_columns: str | Sequence[str] | None = None,
        *,
        merge_max_memory_mb: float = 1024,
        merge_max_process_memory_mb: float | None = None,
        merge_min_system_available_mb: float = 512,
        merge_chunk_size_rows: int = 100_000,
        enable_streaming_merge: bool = True,
        merge_progress_callback: Callable[[int, int], Any] | None = None,
        memory_monitor: MemoryMonitor | None = None,
        on_duplicate_keys: str = "error",
        **options: Any,
    ) -> MergeResult:
        """Merge ``data`` into the dataset at ``path`` by ``key_columns`` with bounded memory.

        Resolves the target's filesystem and hands everything to
        ``memsafe_dagster.datasets.merge.merge_dataset`` (strategies, validation and the
        crash-safe commit are documented there).
        """
        from memsafe_dagster.datasets.merge import merge_dataset

        fs, target = self.resolve(path)
        return merge_dataset(
            data,
            target,
            fs=fs,
            storage_options=self.storage_options,
            strategy=strategy,
            key_columns=key_columns,
            merge_max_memory_mb=merge_max_memory_mb,
            merge_max_process_memory_mb=merge_max_process_memory_mb,
            merge_min_system_available_mb=merge_min_system_available_mb,
            merge_chunk_size_rows=merge_chunk_size_rows,
            enable_streaming_merge=enable_streaming_merge,
            merge_progress_callback=merge_progress_callback,
            memory_monitor=memory_monitor,
            on_duplicate_keys=on_duplicate_keys,
            **options,
        )

    def __repr__(self) -> str:
        fs = type(self.filesystem).__name__ if self.filesystem is not None else "by URL"
        return f"PyarrowDatasetIO(filesystem={fs})"
