"""Adaptive chunk sizing: shrink under pressure, grow back when calm, stop before the kernel."""

from __future__ import annotations

import gc
import time

from memsafe_dagster.datasets.stream import ChunkStream
from memsafe_dagster.memory import (
    MemoryMonitor,
    MemoryPressureError,
    MemoryPressureLevel,
    PeakWindow,
)

NORMAL = MemoryPressureLevel.NORMAL
WARNING = MemoryPressureLevel.WARNING
CRITICAL = MemoryPressureLevel.CRITICAL
EMERGENCY = MemoryPressureLevel.EMERGENCY


class AdaptiveChunkSizer:
    """A ``before_chunk`` hook that sizes the next chunk from the monitor's pressure level.

    WARNING shrinks the chunk x0.8, CRITICAL x0.5 and collects garbage (at most every
    ``min_gc_interval_s`` while CRITICAL persists), ``grow_after``
    consecutive NORMAL checks grow it x1.25 back toward ``requested_rows``. EMERGENCY collects
    once and rechecks; if it persists, ``MemoryPressureError`` carries the level and status.
    Chunks never shrink below ``min_rows`` (tiny chunks only add overhead). With
    ``adaptive=False`` the size stays fixed but EMERGENCY still stops the stream.

    ``min_check_interval_s`` keeps checks off the hot path of fast streams: after a NORMAL
    check the next one waits at least that long (a check costs tens of microseconds, a small
    chunk of a fast scan not much more); after any other level every chunk is checked. A size
    set on the stream by someone else (a caller, a retry) becomes the new requested size.
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
        min_check_interval_s: float = 0.0,
        min_gc_interval_s: float = 1.0,
    ) -> None:
        if min_check_interval_s < 0:
            raise ValueError(
                f"min_check_interval_s must not be negative, got {min_check_interval_s!r}"
            )
        self.monitor = monitor
        self.requested_rows = requested_rows
        self.adaptive = adaptive
        self.grow_after = grow_after
        self._min_rows_setting = min_rows
        self.min_rows = min(min_rows, requested_rows)
        self.what = what
        self.min_check_interval_s = min_check_interval_s
        self.min_gc_interval_s = min_gc_interval_s
        self._last_gc: float | None = None
        self.checks = 0
        self._calm_checks = 0
        self._last_check: float | None = None
        self._last_level = NORMAL
        self._size_set = requested_rows

    def __call__(self, stream: ChunkStream) -> None:
        size = stream.chunk_size_rows
        if size != self._size_set:
            # Someone else resized the stream: that is the size they want from now on.
            self.requested_rows = size
            self.min_rows = min(self._min_rows_setting, size)
            self._calm_checks = 0
        self._size_set = size
        if self._skip_check():
            return
        level = self._check()
        if level is EMERGENCY:
            gc.collect()
            self._last_gc = time.monotonic()
            level = self._check()
            if level is EMERGENCY:
                window = stream.stats.window
                status = self.monitor.get_memory_status(window)
                detail = self.monitor.get_detailed_status(window)
                stream.stats.max_pressure = max(stream.stats.max_pressure, level)
                raise MemoryPressureError(
                    f"memory pressure EMERGENCY while {self.what} (chunk {stream.stats.chunks + 1},"
                    f" {stream.stats.rows:,} rows done): {detail}",
                    level=level,
                    status=status,
                )
            level = CRITICAL  # the collection helped, but only just: act as CRITICAL
        self._last_level = level
        stream.stats.max_pressure = max(stream.stats.max_pressure, level)
        if not self.adaptive:
            return
        if level is CRITICAL:
            self._calm_checks = 0
            self._collect()
            stream.chunk_size_rows = max(self.min_rows, int(size * 0.5))
        elif level is WARNING:
            self._calm_checks = 0
            stream.chunk_size_rows = max(self.min_rows, int(size * 0.8))
        else:
            self._calm_checks += 1
            if self._calm_checks >= self.grow_after and size < self.requested_rows:
                stream.chunk_size_rows = min(self.requested_rows, int(size * 1.25) + 1)
                self._calm_checks = 0
        self._size_set = stream.chunk_size_rows

    def _collect(self) -> None:
        # A full collection can take 100+ ms in a big process: under sustained CRITICAL
        # pressure collect at most every ``min_gc_interval_s``, not before every tiny chunk.
        now = time.monotonic()
        if self._last_gc is None or now - self._last_gc >= self.min_gc_interval_s:
            gc.collect()
            self._last_gc = time.monotonic()

    def _skip_check(self) -> bool:
        if self.min_check_interval_s <= 0 or self._last_check is None:
            return False
        if self._last_level is not NORMAL:
            return False
        return time.monotonic() - self._last_check < self.min_check_interval_s

    def _check(self) -> MemoryPressureLevel:
        level = self.monitor.check_memory_pressure()
        self.checks += 1
        self._last_check = time.monotonic()
        return level


def attach_monitor(
    stream: ChunkStream,
    monitor: MemoryMonitor,
    *,
    adaptive: bool = True,
    what: str = "streaming",
    min_check_interval_s: float = 0.0,
) -> ChunkStream:
    """Make ``stream`` pressure-aware and give its stats a window on ``monitor``.

    The window opens now and closes with the stream; a stream that already has one (attached
    earlier, so it has seen more) keeps it.
    """
    sizer = AdaptiveChunkSizer(
        monitor,
        stream.chunk_size_rows,
        adaptive=adaptive,
        what=what,
        min_check_interval_s=min_check_interval_s,
    )
    if stream.stats.window is None:
        stream.stats.window = PeakWindow(monitor)
        stream.add_hooks(on_close=stream.stats.window.close)
    return stream.add_hooks(before_chunk=sizer)
