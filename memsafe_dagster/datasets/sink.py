"""The one Parquet sink: exact row groups, rolling files, optionally encoded in its own thread.

``ChunkedParquetWriter`` and the merge both write through ``OutputSink``. Rows are buffered up
to one row group, so a row group holds exactly ``row_group_size`` rows whatever the sizes of
the incoming tables (only a file's last one may be smaller), and memory is bounded by a row
group plus one incoming table. Files roll at ``max_rows`` rows and are created lazily from a
path factory (a staging path, a hidden temp file), so a sink that receives no rows leaves
nothing behind. ``abort`` deletes every file the sink opened; once ``close`` has returned, the
files belong to the caller and ``abort`` leaves them alone.

How files are written (codec, dictionary encoding) is decided once per sink family by a
``SettingsProvider``, from the first rows any of its sinks writes.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

# Rows sampled to decide which columns to dictionary-encode.
_DICTIONARY_SAMPLE_ROWS = 65_536
# Tables in flight between a producer and a background encoding thread.
_QUEUE_TABLES = 2
# The merge is the one user of background encoding; its tests find its threads by this prefix.
_THREAD_NAME = "memsafe-merge-writer"

NewFile = Callable[[str, str], str]  # (directory, prefix) -> path of the file to create


@dataclass
class WriterSettings:
    """How every file of a sink family is written."""

    schema: pa.Schema
    row_group_size: int | None
    compression: str
    compression_level: int | None = None
    use_dictionary: bool | list[str] = True
    parquet_options: dict[str, Any] = field(default_factory=dict)

    def writer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``pq.ParquetWriter`` (``parquet_options`` win)."""
        kwargs: dict[str, Any] = {
            "compression": self.compression,
            "use_dictionary": self.use_dictionary,
            "write_statistics": True,
        }
        if self.compression_level is not None:
            kwargs["compression_level"] = self.compression_level
        kwargs.update(self.parquet_options)
        return kwargs


class SettingsProvider:
    """Decides the writer settings once, from the first rows any sink writes.

    ``row_group_size=None`` makes every ``write`` one row group (split only where a file
    rolls). With ``use_dictionary=None`` only columns whose values repeat in the first rows
    (fewer than half distinct) are dictionary-encoded: PyArrow would otherwise build a
    dictionary for every column and throw it away for unique ones, which makes writing several
    times slower.
    """

    def __init__(
        self,
        schema: pa.Schema,
        *,
        row_group_size: int | None,
        compression: str,
        compression_level: int | None = None,
        use_dictionary: bool | Sequence[str] | None = True,
        parquet_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.schema = schema
        self.row_group_size = row_group_size
        self.compression = compression
        self.compression_level = compression_level
        self.use_dictionary = use_dictionary
        self.parquet_options = dict(parquet_options or {})
        self._settings: WriterSettings | None = None
        self._lock = threading.Lock()

    def get(self, sample: pa.Table) -> WriterSettings:
        """The settings, decided from ``sample`` on the first call."""
        with self._lock:
            if self._settings is None:
                use = self.use_dictionary
                if use is None:
                    use = _repeating_columns(sample.slice(0, _DICTIONARY_SAMPLE_ROWS))
                elif not isinstance(use, bool):
                    use = list(use)
                self._settings = WriterSettings(
                    schema=self.schema,
                    row_group_size=self.row_group_size,
                    compression=self.compression,
                    compression_level=self.compression_level,
                    use_dictionary=use,
                    parquet_options=self.parquet_options,
                )
            return self._settings


def _repeating_columns(sample: pa.Table) -> list[str]:
    out = []
    rows = max(1, sample.num_rows)
    for column in sample.schema:
        t = column.type
        if pa.types.is_dictionary(t):
            out.append(column.name)
            continue
        if pa.types.is_nested(t) or pa.types.is_boolean(t) or pa.types.is_null(t):
            continue
        try:
            distinct = pc.count_distinct(sample.column(column.name), mode="all").as_py()
        except (pa.ArrowNotImplementedError, pa.ArrowInvalid):
            continue
        if distinct * 2 < rows:
            out.append(column.name)
    return out


@dataclass
class WrittenFile:
    """One file a sink wrote: its path (staged or temporary), rows, bytes and row groups."""

    staged: str
    rows: int = 0
    bytes: int = 0
    row_groups: int = 0


class OutputSink:
    """Rolling Parquet output: files of at most ``max_rows`` rows (None: one file), each from
    ``new_file(directory, prefix)``, row groups of exactly the settings' ``row_group_size``.

    ``write`` may be called from several threads (one lock per sink). With ``background``,
    encoding and writing happen in the sink's own thread, fed through a queue of two tables:
    the caller produces the next table while this one is encoded (two cores on one file), and
    the queue bounds the memory in flight. An error in that thread is raised by the next
    ``write`` or by ``close``.
    """

    def __init__(
        self,
        afs: pafs.FileSystem,
        settings: SettingsProvider,
        new_file: NewFile,
        *,
        directory: str = "",
        prefix: str = "part",
        max_rows: int | None = None,
        background: bool = False,
    ) -> None:
        self.afs = afs
        self.settings = settings
        self.new_file = new_file
        self.directory = directory
        self.prefix = prefix
        self.max_rows = max_rows
        self.background = background
        self.written: list[WrittenFile] = []
        self._pending: deque[pa.Table] = deque()
        self._pending_rows = 0
        self._writer: pq.ParquetWriter | None = None
        self._stream: pa.NativeFile | None = None
        self._file_rows = 0
        self._lock = threading.Lock()
        self._queue: queue.Queue[pa.Table | None] | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._state = "open"

    @property
    def rows(self) -> int:
        """Rows received so far (written or buffered)."""
        return sum(f.rows for f in self.written) + self._pending_rows

    # -- writing ----------------------------------------------------------------------------

    def write(self, table: pa.Table | pa.RecordBatch) -> None:
        """Buffer ``table`` (in the settings' schema) and write every row group it fills."""
        if self._state != "open":
            raise ValueError(f"this Parquet sink is {self._state}; nothing more can be written")
        if isinstance(table, pa.RecordBatch):
            table = pa.Table.from_batches([table])
        if table.num_rows == 0:
            return
        if self.background:
            self._put(table)
        else:
            self._write_now(table)

    def _write_now(self, table: pa.Table) -> None:
        with self._lock:
            self._pending.append(table)
            self._pending_rows += table.num_rows
            self._flush(final=False)

    def _flush(self, *, final: bool) -> None:
        """Write the buffered rows that fill row groups (all of them when ``final``)."""
        while self._pending_rows:
            target = self._next_group_rows()
            if target is not None and self._pending_rows >= target:
                rows = target
            elif final or self.settings.row_group_size is None:
                rows = self._pending_rows
            else:
                return
            self._emit(rows)

    def _next_group_rows(self) -> int | None:
        """Rows of the next row group: the row group size, capped by the room left in the
        file; None when neither bounds it."""
        room = None
        if self.max_rows is not None:
            room = self.max_rows - self._file_rows if self._writer is not None else self.max_rows
        size = self.settings.row_group_size
        if size is None or room is None:
            return room if size is None else size
        return max(1, min(size, room))

    def _emit(self, rows: int) -> None:
        taken: list[pa.Table] = []
        need = rows
        while need:
            head = self._pending[0]
            if head.num_rows <= need:
                taken.append(self._pending.popleft())
                need -= head.num_rows
            else:
                taken.append(head.slice(0, need))
                self._pending[0] = head.slice(need)
                need = 0
        self._pending_rows -= rows
        group = pa.concat_tables(taken) if len(taken) > 1 else taken[0]
        if self._writer is None:
            self._open(group)
        assert self._writer is not None
        # One call, one row group: the table holds exactly the rows the group must hold.
        self._writer.write_table(group, row_group_size=rows)
        self._file_rows += rows
        self.written[-1].rows += rows
        self.written[-1].row_groups += 1
        if self.max_rows is not None and self._file_rows >= self.max_rows:
            self._close_file()

    def _open(self, sample: pa.Table) -> None:
        settings = self.settings.get(sample)
        path = self.new_file(self.directory, self.prefix)
        self.written.append(WrittenFile(path))
        if isinstance(self.afs, pafs.LocalFileSystem):
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self._stream = self.afs.open_output_stream(path)
        self._writer = pq.ParquetWriter(self._stream, settings.schema, **settings.writer_kwargs())
        self._file_rows = 0

    def _close_file(self) -> None:
        if self._writer is None:
            return
        assert self._stream is not None
        self._writer.close()
        self.written[-1].bytes = self._stream.tell()
        self._stream.close()
        self._writer = self._stream = None

    # -- the background thread --------------------------------------------------------------

    def _put(self, item: pa.Table | None) -> None:
        with self._lock:
            if self._thread is None:
                self._queue = queue.Queue(maxsize=_QUEUE_TABLES)
                self._thread = threading.Thread(
                    target=self._consume, name=_THREAD_NAME, daemon=True
                )
                self._thread.start()
        assert self._queue is not None
        while True:
            if self._error is not None:
                raise self._error
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _consume(self) -> None:
        assert self._queue is not None
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is not None or self._state == "aborted":
                continue
            try:
                self._write_now(item)
            except BaseException as exc:  # handed to the producer on its next write/close
                self._error = exc

    def _stop_thread(self) -> None:
        if self._thread is not None:
            assert self._queue is not None
            while True:
                try:
                    self._queue.put(None, timeout=0.1)
                    break
                except queue.Full:
                    if not self._thread.is_alive():
                        break
            self._thread.join()
            self._thread = None

    # -- ending -----------------------------------------------------------------------------

    def close(self, *, ensure_file: bool = False) -> list[WrittenFile]:
        """Flush the last (short) row group and close; returns every file written. With
        ``ensure_file`` a sink that received no rows still writes one empty file (its schema).
        Closing again returns the same list."""
        if self._state == "closed":
            return list(self.written)
        if self._state == "aborted":
            raise ValueError("this Parquet sink was aborted")
        self._stop_thread()
        if self._error is not None:
            raise self._error
        with self._lock:
            self._flush(final=True)
            if ensure_file and not self.written:
                self._open(self.settings.schema.empty_table())
            self._close_file()
            self._state = "closed"
            return list(self.written)

    def abort(self) -> None:
        """Stop without flushing and delete every file this sink opened (unless it was closed:
        then its files are the caller's)."""
        if self._state != "open":
            return
        self._state = "aborted"
        self._stop_thread()
        with self._lock:
            self._pending.clear()
            self._pending_rows = 0
            with contextlib.suppress(Exception):
                if self._writer is not None:
                    self._writer.close()
            with contextlib.suppress(Exception):
                if self._stream is not None:
                    self._stream.close()
            self._writer = self._stream = None
            for f in self.written:
                with contextlib.suppress(OSError, pa.ArrowException):
                    self.afs.delete_file(f.staged)
