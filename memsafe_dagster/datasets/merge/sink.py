"""Staged Parquet output: row groups of exactly ``row_group_size`` rows, files of bounded size.

Files are created lazily inside the transaction's staging directory, so a sink that receives no
rows leaves nothing behind, and nothing is visible in the dataset before the commit.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq


@dataclass
class WriterSettings:
    """How every output file is written (the same for all files of one merge)."""

    schema: pa.Schema
    row_group_size: int
    compression: str
    compression_level: int | None = None
    use_dictionary: bool | list[str] = True

    def writer_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "compression": self.compression,
            "use_dictionary": self.use_dictionary,
            "write_statistics": True,
        }
        if self.compression_level is not None:
            kwargs["compression_level"] = self.compression_level
        return kwargs


class SettingsProvider:
    """Decides the writer settings once, from the first rows any sink writes.

    With ``use_dictionary=None`` only columns whose values repeat in that sample (fewer than
    half distinct) are dictionary-encoded: PyArrow would otherwise build a dictionary for
    every column and throw it away for unique ones, which makes writing several times slower.
    """

    def __init__(
        self,
        schema: pa.Schema,
        *,
        row_group_size: int,
        compression: str,
        compression_level: int | None,
        use_dictionary: bool | Sequence[str] | None,
    ) -> None:
        self.schema = schema
        self.row_group_size = row_group_size
        self.compression = compression
        self.compression_level = compression_level
        self.use_dictionary = use_dictionary
        self._settings: WriterSettings | None = None
        self._lock = threading.Lock()

    def get(self, sample: pa.Table) -> WriterSettings:
        with self._lock:
            if self._settings is None:
                use = self.use_dictionary
                if use is None:
                    use = _repeating_columns(sample.slice(0, 65_536))
                elif not isinstance(use, bool):
                    use = list(use)
                self._settings = WriterSettings(
                    schema=self.schema,
                    row_group_size=self.row_group_size,
                    compression=self.compression,
                    compression_level=self.compression_level,
                    use_dictionary=use,
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
    staged: str
    rows: int


NewFile = Callable[[str, str], str]  # (directory relative to the target, prefix) -> staged path


@dataclass
class OutputSink:
    """Rolling output: files of at most ``max_rows`` rows in ``directory`` named ``prefix-*``.

    ``write`` may be called from several threads (one lock per sink). With ``background``,
    encoding and writing happen in the sink's own thread, fed through a queue of two tables:
    the caller decodes the next batch while this one is encoded (two cores on one file), and
    the queue bounds the memory in flight.
    """

    afs: pafs.FileSystem
    settings: SettingsProvider
    new_file: NewFile
    directory: str
    prefix: str
    max_rows: int
    written: list[WrittenFile] = field(default_factory=list)
    _pending: list[pa.Table] = field(default_factory=list)
    _pending_rows: int = 0
    _writer: pq.ParquetWriter | None = None
    _stream: Any = None
    _file_rows: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    background: bool = False
    _queue: queue.Queue | None = None
    _thread: threading.Thread | None = None
    _error: BaseException | None = None
    _aborted: bool = False

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.written) + self._pending_rows

    def write(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        if self.background:
            self._put(table)
            return
        self._write_now(table)

    def _put(self, item: pa.Table | None) -> None:
        with self._lock:
            if self._thread is None:
                self._queue = queue.Queue(maxsize=2)
                self._thread = threading.Thread(
                    target=self._drain, name="memsafe-merge-writer", daemon=True
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

    def _drain(self) -> None:
        assert self._queue is not None
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is not None or self._aborted:
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

    def _write_now(self, table: pa.Table) -> None:
        with self._lock:
            self._pending.append(table)
            self._pending_rows += table.num_rows
            while self._pending_rows >= self._next_group_rows():
                self._emit(self._next_group_rows())

    def _next_group_rows(self) -> int:
        room = self.max_rows - self._file_rows if self._writer is not None else self.max_rows
        return max(1, min(self.settings.row_group_size, room))

    def _emit(self, rows: int) -> None:
        taken: list[pa.Table] = []
        need = rows
        while need:
            head = self._pending[0]
            if head.num_rows <= need:
                taken.append(self._pending.pop(0))
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
        self._writer.write_table(group, row_group_size=rows)
        self._file_rows += rows
        self.written[-1].rows += rows
        if self._file_rows >= self.max_rows:
            self._close_file()

    def _open(self, sample: pa.Table) -> None:
        settings = self.settings.get(sample)
        staged = self.new_file(self.directory, self.prefix)
        self._stream = self.afs.open_output_stream(staged)
        self._writer = pq.ParquetWriter(self._stream, settings.schema, **settings.writer_kwargs())
        self._file_rows = 0
        self.written.append(WrittenFile(staged, 0))

    def _close_file(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._stream.close()
            self._writer = None
            self._stream = None

    def close(self) -> list[WrittenFile]:
        """Flush the last (short) row group and close; returns every file written."""
        self._stop_thread()
        if self._error is not None:
            raise self._error
        with self._lock:
            while self._pending_rows:
                self._emit(min(self._pending_rows, self._next_group_rows()))
            self._close_file()
            return list(self.written)

    def abort(self) -> None:
        """Close without flushing (the staging is about to be discarded)."""
        self._aborted = True
        self._stop_thread()
        with self._lock:
            self._pending.clear()
            self._pending_rows = 0
            try:
                self._close_file()
            except (OSError, pa.ArrowException):
                self._writer = None
