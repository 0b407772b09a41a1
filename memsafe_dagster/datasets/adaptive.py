"""Adaptive chunk sizing: shrink under pressure, grow back when calm, stop before the kernel."""

from __future__ import annotations

import gc

from memsafe_dagster.datasets.stream import ChunkStream
from memsafe_dagster.memory import MemoryMonitor, MemoryPressureError, MemoryPressureLevel

NORMAL = MemoryPressureLevel.NORMAL
WARNING = MemoryPressureLevel.WARNING
CRITICAL = MemoryPressureLevel.CRITICAL
EMERGENCY = MemoryPressureLevel.EMERGENCY


class AdaptiveChunkSizer:
    """A ``before_chunk`` hook that sizes the next chunk from the monitor's pressure level.

    WARNING shrinks the chunk x0.8, CRITICAL x0.5 and collects garbage, ``grow_after``
    consecutive NORMAL checks grow it x1.25 back toward ``requested_rows``. EMERGENCY collects
    once and rechecks; if it persists, ``MemoryPressureError`` carries the level and status.
    Chunks never shrink below ``min_rows`` (tiny chunks only add overhead). With
    ``adaptive=False`` the size stays fixed but EMERGENCY still stops the stream.
    """

    def __init__(
        self,
        monitor: MemoryMonitor,
        requested_rows: int,
        *,
        adaptive: bool = True,
        grow_after: int = 3,
        min_rows: int = 1_000,
        what: str = "streaming",
    ) -> None:
        self.monitor = monitor
        self.requested_rows = requested_rows
        self.adaptive = adaptive
        self.grow_after = grow_after
        self.min_rows = min(min_rows, requested_rows)
        self.what = what
        self._calm_checks = 0

    def __call__(self, stream: ChunkStream) -> None:
        level = self.monitor.check_memory_pressure()
        if level is EMERGENCY:
            gc.collect()
            level = self.monitor.check_memory_pressure()
            if level is EMERGENCY:
                status = self.monitor.get_memory_status()
                stream.stats.max_pressure = max(stream.stats.max_pressure, level)
                raise MemoryPressureError(
                    f"memory pressure EMERGENCY while {self.what} (chunk {stream.stats.chunks + 1},"
                    f" {stream.stats.rows:,} rows done): {self.monitor.get_detailed_status()}",
                    level=level,
                    status=status,
                )
            level = CRITICAL  # the collection helped, but only just: act as CRITICAL
        stream.stats.max_pressure = max(stream.stats.max_pressure, level)
        if not self.adaptive:
            return
        size = stream.chunk_size_rows
        if level is CRITICAL:
            self._calm_checks = 0
            gc.collect()
            stream.chunk_size_rows = max(self.min_rows, int(size * 0.5))
        elif level is WARNING:
            self._calm_checks = 0
            stream.chunk_size_rows = max(self.min_rows, int(size * 0.8))
        else:
            self._calm_checks += 1
            if self._calm_checks >= self.grow_after and size < self.requested_rows:
                stream.chunk_size_rows = min(self.requested_rows, int(size * 1.25) + 1)
                self._calm_checks = 0


def attach_monitor(
    stream: ChunkStream,
    monitor: MemoryMonitor,
    *,
    adaptive: bool = True,
    what: str = "streaming",
) -> ChunkStream:
    """Make ``stream`` pressure-aware and record the monitor's peaks in its stats on close."""
    sizer = AdaptiveChunkSizer(monitor, stream.chunk_size_rows, adaptive=adaptive, what=what)

    def record_peaks(_stream: ChunkStream = stream) -> None:
        _stream.stats.peak_rss_mb = max(_stream.stats.peak_rss_mb, monitor.peak_rss_bytes / 2**20)
        _stream.stats.peak_pyarrow_mb = max(
            _stream.stats.peak_pyarrow_mb, monitor.peak_pyarrow_bytes / 2**20
        )

    def after(stream_: ChunkStream, _chunk: object) -> None:
        record_peaks(stream_)

    return stream.add_hooks(before_chunk=sizer, after_chunk=after, on_close=record_peaks)
