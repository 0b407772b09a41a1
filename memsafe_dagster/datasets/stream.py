"""ChunkStream: the package's one streaming type, a single-pass iterator of ``pa.Table`` chunks.

It re-chunks whatever it wraps (batches or tables of any size) into chunks of at most
``chunk_size_rows`` rows, a size that may change between chunks (adaptive sizing, or a caller).
It is also how a stream crosses a Dagster asset boundary: an asset returns a ChunkStream and
the IO manager writes it chunk by chunk.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, fields
from typing import Any, NoReturn

import pyarrow as pa

from memsafe_dagster.datasets.schema import conform_batch, record_batches
from memsafe_dagster.memory import MemoryPressureLevel, PeakWindow
from memsafe_dagster.memory.window import WindowPeaks

Hook = Callable[["ChunkStream"], None]
ChunkHook = Callable[["ChunkStream", pa.Table], None]
ErrorHook = Callable[[BaseException], "BaseException | None"]


@dataclass
class ChunkStats(WindowPeaks):
    """What a stream did so far: chunks, rows, resizes and the memory seen while streaming.

    The peaks are those of ``window``, the ``PeakWindow`` a monitor attached to the stream
    opened (0 without one); ``max_pressure`` is the worst level the stream's sizer acted on.
    """

    chunks: int = 0
    rows: int = 0
    resizes: int = 0
    min_chunk_size_rows: int | None = None
    max_chunk_size_rows: int | None = None
    largest_chunk_rows: int = 0
    max_pressure: MemoryPressureLevel = MemoryPressureLevel.NORMAL
    started_at: float | None = None
    finished_at: float | None = None
    sizes: list[int] = field(default_factory=list, repr=False)
    window: PeakWindow | None = field(default=None, repr=False, compare=False)

    @property
    def duration_s(self) -> float:
        if self.started_at is None:
            return 0.0
        return (self.finished_at or time.perf_counter()) - self.started_at

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "max_pressure":
                out["peak_rss_mb"] = self.peak_rss_mb
                out["peak_pyarrow_mb"] = self.peak_pyarrow_mb
                out["max_pressure"] = self.max_pressure.value
            elif f.name not in ("sizes", "window"):
                out[f.name] = getattr(self, f.name)
        out["duration_s"] = round(self.duration_s, 4)
        return out


def _positive_rows(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"chunk_size_rows must be a positive integer, got {value!r}")
    return value


class ChunkStream(Iterator[pa.Table]):
    """Single-pass stream of ``pa.Table`` chunks of at most ``chunk_size_rows`` rows.

    ``chunk_size_rows`` is settable at any time and applies from the next chunk. ``schema`` is
    the declared schema, else the first item's (peeked lazily). Every item must match the
    schema or cast to it losslessly; otherwise iteration raises ``ValueError`` naming the
    column. Hooks run before each chunk is cut (adaptive sizing) and after it is emitted
    (progress); a hook may raise to stop the stream.
    """

    def __init__(
        self,
        source: Iterable[pa.RecordBatch | pa.Table],
        schema: pa.Schema | None = None,
        *,
        chunk_size_rows: int = 100_000,
        total_rows: int | None = None,
        before_chunk: Hook | None = None,
        after_chunk: ChunkHook | None = None,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self._source: Iterator[pa.RecordBatch | pa.Table] | None = iter(source)
        self._schema = schema
        self._chunk_size_rows = _positive_rows(chunk_size_rows)
        self.total_rows = total_rows
        self.stats = ChunkStats()
        self._before_chunk: list[Hook] = [before_chunk] if before_chunk else []
        self._after_chunk: list[ChunkHook] = [after_chunk] if after_chunk else []
        self._on_close: list[Callable[[], None]] = [on_close] if on_close else []
        self._on_error: list[ErrorHook] = []
        self._pending: deque[pa.RecordBatch] = deque()
        self._pending_rows = 0
        self._exhausted = False
        self._closed = False

    @classmethod
    def from_batches(
        cls,
        batches: Iterable[pa.RecordBatch | pa.Table] | pa.RecordBatchReader | pa.Table,
        schema: pa.Schema | None = None,
        *,
        chunk_size_rows: int = 100_000,
        total_rows: int | None = None,
    ) -> ChunkStream:
        """Wrap any iterable or generator of batches or tables lazily, re-chunked.

        Anything else ``datasets.source`` accepts works too (a ``pa.Table`` or
        ``RecordBatchReader`` brings its schema and a table its row count). Nothing is pulled
        from an iterable until the stream is iterated or its schema is asked for. A
        ChunkStream of the same schema is returned itself, at ``chunk_size_rows``.
        """
        if isinstance(batches, ChunkStream) and (schema is None or schema.equals(batches.schema)):
            batches.chunk_size_rows = chunk_size_rows
            return batches
        # datasets.source builds on this module, so it is imported when first needed.
        from memsafe_dagster.datasets.source import tabular_source

        source = tabular_source(batches, chunk_rows=chunk_size_rows, what="from_batches()")
        return cls(
            source.chunks(),
            schema or source.known_schema,
            chunk_size_rows=chunk_size_rows,
            total_rows=source.total_rows if total_rows is None else total_rows,
            on_close=source.close,
        )

    # -- properties -----------------------------------------------------------------------

    @property
    def chunk_size_rows(self) -> int:
        return self._chunk_size_rows

    @chunk_size_rows.setter
    def chunk_size_rows(self, value: int) -> None:
        value = _positive_rows(value)
        if value != self._chunk_size_rows and self.stats.chunks:
            self.stats.resizes += 1
        self._chunk_size_rows = value

    @property
    def schema(self) -> pa.Schema:
        """The stream's schema; peeks at the first item when none was declared."""
        if self._schema is None:
            self._fill(1)
            if self._schema is None:  # an empty source with no declared schema
                self._schema = pa.schema([])
        return self._schema

    @property
    def consumed(self) -> bool:
        """True once iteration has started: the stream cannot be read twice."""
        return self.stats.started_at is not None or self._closed

    def add_hooks(
        self,
        before_chunk: Hook | None = None,
        after_chunk: ChunkHook | None = None,
        on_close: Callable[[], None] | None = None,
        on_error: ErrorHook | None = None,
    ) -> ChunkStream:
        """Attach more hooks (a wrapper such as the IO manager adds its pressure checks).

        ``on_error(exc)`` may return an exception to raise instead of ``exc`` (chained to it):
        the Dagster layer turns a ``MemoryPressureError`` into its ``dagster.Failure``.
        """
        if on_error:
            self._on_error.append(on_error)
        if before_chunk:
            self._before_chunk.append(before_chunk)
        if after_chunk:
            self._after_chunk.append(after_chunk)
        if on_close:
            self._on_close.append(on_close)
        return self

    # -- iteration ------------------------------------------------------------------------

    def __iter__(self) -> ChunkStream:
        return self

    def __next__(self) -> pa.Table:
        if self._closed:
            raise StopIteration
        if self.stats.started_at is None:
            self.stats.started_at = time.perf_counter()
        try:
            for hook in self._before_chunk:
                hook(self)
            size = self._chunk_size_rows
            self._fill(size)
            if self._pending_rows == 0:
                self._finish()
                raise StopIteration
            chunk = self._cut(size)
        except StopIteration:
            raise
        except BaseException as exc:
            self._raise_failure(exc)
        stats = self.stats
        stats.chunks += 1
        stats.rows += chunk.num_rows
        stats.largest_chunk_rows = max(stats.largest_chunk_rows, chunk.num_rows)
        stats.min_chunk_size_rows = min(stats.min_chunk_size_rows or size, size)
        stats.max_chunk_size_rows = max(stats.max_chunk_size_rows or size, size)
        stats.sizes.append(size)
        try:
            for after in self._after_chunk:
                after(self, chunk)
        except BaseException as exc:
            self._raise_failure(exc)
        return chunk

    def _raise_failure(self, exc: BaseException) -> NoReturn:
        """Close, then raise ``exc`` or what an ``on_error`` hook turns it into."""
        self.close()
        for translate in self._on_error:
            replacement = translate(exc)
            if replacement is not None and replacement is not exc:
                raise replacement from exc
        raise exc

    def _fill(self, rows: int) -> None:
        """Pull from the source until ``rows`` rows are pending or it is exhausted."""
        while self._pending_rows < rows and not self._exhausted and self._source is not None:
            try:
                item = next(self._source)
            except StopIteration:
                self._exhausted = True
                break
            for batch in self._batches_of(item):
                if batch.num_rows:
                    self._pending.append(batch)
                    self._pending_rows += batch.num_rows

    def _batches_of(self, item: pa.RecordBatch | pa.Table) -> list[pa.RecordBatch]:
        batches = record_batches(item)
        if batches is None:
            raise TypeError(
                f"ChunkStream items must be pyarrow RecordBatch or Table, got {type(item).__name__}"
            )
        item_schema = item.schema
        if self._schema is None:
            self._schema = item_schema
        elif not item_schema.equals(self._schema):
            batches = [conform_batch(b, self._schema) for b in batches]
        return batches

    def _cut(self, size: int) -> pa.Table:
        taken: list[pa.RecordBatch] = []
        need = size
        while need and self._pending:
            batch = self._pending[0]
            if batch.num_rows <= need:
                taken.append(self._pending.popleft())
                need -= batch.num_rows
            else:
                taken.append(batch.slice(0, need))
                self._pending[0] = batch.slice(need)
                need = 0
        rows = size - need
        self._pending_rows -= rows
        return pa.Table.from_batches(taken, schema=self._schema)

    # -- conversions ----------------------------------------------------------------------

    def to_reader(self) -> pa.RecordBatchReader:
        """This stream as a ``RecordBatchReader`` (consumes it), for PyArrow writers and peers."""
        schema = self.schema
        return pa.RecordBatchReader.from_batches(
            schema, (batch for chunk in self for batch in chunk.to_batches())
        )

    def read_all(self) -> pa.Table:
        """Concatenate every remaining chunk into one table: only for streams known to be small."""
        schema = self.schema
        return pa.Table.from_batches(
            [batch for chunk in self for batch in chunk.to_batches()], schema=schema
        )

    # -- lifecycle ------------------------------------------------------------------------

    def _finish(self) -> None:
        if self.stats.finished_at is None:
            self.stats.finished_at = time.perf_counter()
        self.close()

    def close(self) -> None:
        """Release the source (closes a generator) and run the close hooks once."""
        if self._closed:
            return
        self._closed = True
        self._pending.clear()
        self._pending_rows = 0
        source, self._source = self._source, None
        close = getattr(source, "close", None)
        if callable(close):
            close()
        for hook in self._on_close:
            hook()

    def __enter__(self) -> ChunkStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (
            f"ChunkStream(chunk_size_rows={self._chunk_size_rows}, "
            f"chunks={self.stats.chunks}, rows={self.stats.rows}, {state})"
        )
