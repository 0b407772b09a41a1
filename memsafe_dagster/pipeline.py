"""MemoryAwarePipeline: the seed's staged pipeline, with pressure checks around every stage.

Stages are plain callables, and a stage gets the whole data unless it is marked
``row_local``: only a stage whose output for a chunk does not depend on the other chunks (a
filter, a projection, a computed column) may run chunk by chunk; an aggregation, a sort or a
join run per chunk would return per-chunk results. So on a ``ChunkStream`` (or a path, dataset
or reader, which are streamed) the leading ``row_local`` stages run chunk by chunk, lazily;
the first other stage gathers the stream into one table (checking pressure per chunk, and
refusing with ``MemoryPressureError`` naming the stage at EMERGENCY) and it and the rest run
on that table. Before and after every stage (every chunk, when streaming) the monitor is
checked: WARNING is logged, CRITICAL (or the budget ratio above ``gc_threshold``) collects
garbage, and EMERGENCY, if one collection does not relieve it, raises ``MemoryPressureError``
naming the stage.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds

from memsafe_dagster.datasets.chunks import DEFAULT_CHECK_INTERVAL_S, process_in_chunks
from memsafe_dagster.datasets.stream import ChunkStream
from memsafe_dagster.memory import MemoryMonitor, MemoryPressureError, MemoryPressureLevel
from memsafe_dagster.memory.sizes import MiB

log = logging.getLogger(__name__)

NORMAL = MemoryPressureLevel.NORMAL
WARNING = MemoryPressureLevel.WARNING
CRITICAL = MemoryPressureLevel.CRITICAL
EMERGENCY = MemoryPressureLevel.EMERGENCY

Stage = Callable[[Any], Any]
MIN_GC_INTERVAL_S = 1.0
_ROW_LOCAL = "__memsafe_row_local__"


def row_local(stage: Stage) -> Stage:
    """Mark ``stage`` as row-local: its result for a chunk depends on that chunk alone, so a
    streamed pipeline may run it chunk by chunk. Use as a decorator or around a callable."""
    if not callable(stage):
        raise TypeError(f"row_local needs a callable stage, got {stage!r}")
    try:
        setattr(stage, _ROW_LOCAL, True)
        return stage
    except (AttributeError, TypeError):  # builtins and other objects without a __dict__

        def wrapped(data: Any) -> Any:
            return stage(data)

        wrapped.__name__ = _stage_name(stage)
        setattr(wrapped, _ROW_LOCAL, True)
        return wrapped


def is_row_local(stage: Stage) -> bool:
    """Whether ``stage`` was marked with ``row_local``."""
    return getattr(stage, _ROW_LOCAL, False) is True


@dataclass
class StageReport:
    """What one stage did: rows in and out, time, pressure and memory around it."""

    index: int
    name: str
    streaming: bool
    rows_in: int | None = None
    rows_out: int | None = None
    chunks: int = 0
    duration_s: float = 0.0
    pressure_before: MemoryPressureLevel = NORMAL
    pressure_after: MemoryPressureLevel = NORMAL
    max_pressure: MemoryPressureLevel = NORMAL
    gc_collections: int = 0
    rss_before_mb: float | None = None
    rss_after_mb: float | None = None
    peak_rss_mb: float | None = None
    pyarrow_before_mb: float | None = None
    pyarrow_after_mb: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        for key in ("pressure_before", "pressure_after", "max_pressure"):
            out[key] = out[key].value
        out["duration_s"] = round(self.duration_s, 4)
        return out


def _rows(data: Any) -> int | None:
    rows = getattr(data, "num_rows", None)
    return rows if isinstance(rows, int) else None


def _stage_name(stage: Stage) -> str:
    return getattr(stage, "__name__", None) or type(stage).__name__


class MemoryAwarePipeline:
    """Run data through stages with memory-pressure checks before and after each one.

    ``memory_limit_mb`` is the PyArrow budget of the monitor it builds (the seed's
    ``MemoryMonitor(max_pyarrow_mb=memory_limit_mb)``), unless ``monitor`` is given. Initial
    data comes from ``process_pipeline(stages, data=...)``, else the constructor's ``data``,
    else ``load_initial_data()``, which subclasses may override. ``stage_reports`` holds one
    ``StageReport`` per stage of the last run.
    """

    def __init__(
        self,
        memory_limit_mb: float = 1024,
        *,
        data: Any = None,
        monitor: MemoryMonitor | None = None,
        max_process_memory_mb: float | None = None,
        min_system_available_mb: float = 512,
        gc_threshold: float = 0.8,
        chunk_size_rows: int = 100_000,
        check_interval_s: float = DEFAULT_CHECK_INTERVAL_S,
    ) -> None:
        self.monitor = monitor or MemoryMonitor(
            max_pyarrow_mb=memory_limit_mb,
            max_process_memory_mb=max_process_memory_mb,
            min_system_available_mb=min_system_available_mb,
        )
        self.gc_threshold = gc_threshold  # trigger GC at this fraction of the budget
        self.initial_data = data
        self.chunk_size_rows = chunk_size_rows
        self.check_interval_s = check_interval_s
        self.stage_reports: list[StageReport] = []
        self._last_gc = float("-inf")

    def load_initial_data(self) -> Any:
        """The data the pipeline starts from when ``process_pipeline`` is given none."""
        if self.initial_data is None:
            raise ValueError(
                "MemoryAwarePipeline has no initial data: pass process_pipeline(stages, "
                "data=...), MemoryAwarePipeline(..., data=...), or override load_initial_data()"
            )
        return self.initial_data

    def process_pipeline(self, stages: Sequence[Stage], data: Any = None) -> Any:
        """Run ``data`` through ``stages`` in order; returns the last stage's result.

        A ``pa.Table`` (or any object) goes through each stage whole. A ``ChunkStream``, a
        path or URL, a ``pyarrow.dataset.Dataset`` or a ``RecordBatchReader`` is streamed: the
        leading stages marked ``row_local`` run per chunk (when all are, a ``ChunkStream`` is
        returned at once, to be consumed by the caller); the first unmarked stage gets the
        whole data, gathered from the stream within the memory budget, and so do the stages
        after it.
        """
        stages = list(stages)
        if not stages:
            raise ValueError("stages must contain at least one callable")
        for i, stage in enumerate(stages, 1):
            if not callable(stage):
                raise ValueError(f"stages[{i - 1}] is not callable: {stage!r}")
        if not isinstance(self.gc_threshold, (int, float)) or not 0 < self.gc_threshold <= 1:
            raise ValueError(f"gc_threshold must be in (0, 1], got {self.gc_threshold!r}")
        if data is None:
            data = self.load_initial_data()
        self.stage_reports = []
        if isinstance(data, (str, os.PathLike, ds.Dataset, pa.RecordBatchReader)):
            data = process_in_chunks(
                data, self.chunk_size_rows, memory_monitor=self.monitor, adaptive=True
            )
        for i, stage in enumerate(stages, 1):
            if isinstance(data, ChunkStream):
                if is_row_local(stage):
                    data = self._stream_stage(data, stage, i, len(stages))
                    continue
                data = self._gather(data, stage, i, len(stages))
            data = self._table_stage(data, stage, i, len(stages))
        return data

    def _gather(self, stream: ChunkStream, stage: Stage, index: int, total: int) -> pa.Table:
        """The whole stream as one table for a stage that is not row-local; pressure is
        checked per chunk and EMERGENCY (after one collection) refuses, naming the stage."""
        name = _stage_name(stage)
        tables: list[pa.Table] = []
        rows = 0
        for chunk in stream:
            tables.append(chunk if isinstance(chunk, pa.Table) else pa.Table.from_batches([chunk]))
            rows += chunk.num_rows
            level = self.monitor.check_memory_pressure()
            if level is EMERGENCY:
                gc.collect()
                level = self.monitor.check_memory_pressure()
            if level is EMERGENCY:
                stream.close()
                raise MemoryPressureError(
                    f"pipeline stage {index}/{total} {name!r} is not row-local, so it needs "
                    f"the whole data, and gathering it reached memory pressure EMERGENCY after "
                    f"{rows:,} rows ({self.monitor.get_detailed_status()}). If the stage works "
                    "chunk by chunk (a filter, a projection), mark it with "
                    "memsafe_dagster.pipeline.row_local; otherwise raise the budget",
                    level=level,
                    status=self.monitor.get_memory_status(),
                )
        if not tables:
            return stream.schema.empty_table()
        return pa.concat_tables(tables)

    # -- whole data -------------------------------------------------------------------------

    def _table_stage(self, data: Any, stage: Stage, index: int, total: int) -> Any:
        name = _stage_name(stage)
        log.info("Processing stage %d/%d: %s", index, total, name)
        report = StageReport(index=index, name=name, streaming=False, rows_in=_rows(data))
        self.stage_reports.append(report)
        before = self.monitor.read()
        report.rss_before_mb = before.rss_bytes / MiB
        report.pyarrow_before_mb = before.pyarrow_bytes / MiB
        report.pressure_before = self._gate(report, "before", total)
        started = time.perf_counter()
        try:
            data = stage(data)
        except Exception as exc:
            _note(exc, index, total, name)
            raise
        report.duration_s = time.perf_counter() - started
        report.chunks = 1
        report.rows_out = _rows(data)
        report.pressure_after = self._gate(report, "after", total)
        after = self.monitor.read()
        report.rss_after_mb = after.rss_bytes / MiB
        report.pyarrow_after_mb = after.pyarrow_bytes / MiB
        report.peak_rss_mb = self.monitor.peak_rss_bytes / MiB
        return data

    # -- streams ----------------------------------------------------------------------------

    def _stream_stage(
        self, upstream: ChunkStream, stage: Stage, index: int, total: int
    ) -> ChunkStream:
        name = _stage_name(stage)
        report = StageReport(index=index, name=name, streaming=True, rows_in=0, rows_out=0)
        self.stage_reports.append(report)
        last_check = [0.0]

        def gated(when: str) -> MemoryPressureLevel | None:
            now = time.monotonic()
            calm = report.max_pressure is NORMAL and report.chunks > 0
            if calm and now - last_check[0] < self.check_interval_s:
                return None
            last_check[0] = now
            return self._gate(report, when, total)

        def chunks() -> Any:
            for chunk in upstream:
                level = gated("before")
                if report.chunks == 0 and level is not None:
                    report.pressure_before = level
                started = time.perf_counter()
                try:
                    out = stage(chunk)
                except Exception as exc:
                    _note(exc, index, total, name)
                    raise
                report.duration_s += time.perf_counter() - started
                if not isinstance(out, (pa.Table, pa.RecordBatch)):
                    raise TypeError(
                        f"pipeline stage {index}/{total} {name!r} returned "
                        f"{type(out).__name__} for a chunk; per-chunk stages must return a "
                        "pyarrow Table or RecordBatch"
                    )
                report.chunks += 1
                report.rows_in = (report.rows_in or 0) + chunk.num_rows
                report.rows_out = (report.rows_out or 0) + out.num_rows
                level = gated("after")
                if level is not None:
                    report.pressure_after = level
                report.peak_rss_mb = self.monitor.peak_rss_bytes / MiB
                yield out

        downstream = ChunkStream(
            chunks(), chunk_size_rows=upstream.chunk_size_rows, on_close=upstream.close
        )

        def follow_upstream(stream: ChunkStream) -> None:
            # Adaptive sizing shrinks the upstream; output chunks follow it.
            if stream.chunk_size_rows != upstream.chunk_size_rows:
                stream.chunk_size_rows = upstream.chunk_size_rows

        return downstream.add_hooks(before_chunk=follow_upstream)

    # -- pressure ---------------------------------------------------------------------------

    def _gate(self, report: StageReport, when: str, total: int) -> MemoryPressureLevel:
        """Check pressure; collect at CRITICAL or above ``gc_threshold``; raise at EMERGENCY.

        Streaming stages collect at most every ``MIN_GC_INTERVAL_S`` while pressure persists
        (a full collection can cost 100+ ms), except at EMERGENCY, which always collects.
        """
        level = self.monitor.check_memory_pressure()
        due = (
            not report.streaming
            or level is EMERGENCY
            or time.monotonic() - self._last_gc >= MIN_GC_INTERVAL_S
        )
        if due and (level >= CRITICAL or self._over_gc_threshold(level)):
            log.info(
                "memory pressure %s %s stage %s: collecting garbage", level.value, when, report.name
            )
            gc.collect()
            self._last_gc = time.monotonic()
            report.gc_collections += 1
            if level >= CRITICAL:
                level = self.monitor.check_memory_pressure()
        report.max_pressure = max(report.max_pressure, level)
        if level is EMERGENCY:
            raise MemoryPressureError(
                f"memory pressure EMERGENCY {when} pipeline stage {report.index}/{total} "
                f"{report.name!r}: {self.monitor.get_detailed_status()}",
                level=level,
                status=self.monitor.get_memory_status(),
            )
        if level >= WARNING:
            log.warning("memory pressure %s %s stage %s", level.value, when, report.name)
        return level

    def _over_gc_threshold(self, level: MemoryPressureLevel) -> bool:
        if level is NORMAL and self.gc_threshold > 0.7:
            return False  # NORMAL means both budgets are under 70 % used
        reading = self.monitor.read()
        ratios = [0.0]
        if self.monitor.max_pyarrow_mb:
            ratios.append(reading.pyarrow_bytes / MiB / self.monitor.max_pyarrow_mb)
        if self.monitor.max_process_memory_mb:
            ratios.append(reading.rss_bytes / MiB / self.monitor.max_process_memory_mb)
        return max(ratios) >= self.gc_threshold


def _note(exc: BaseException, index: int, total: int, name: str) -> None:
    add_note = getattr(exc, "add_note", None)  # Python 3.11+
    if add_note is not None:
        add_note(f"in MemoryAwarePipeline stage {index}/{total} {name!r}")
