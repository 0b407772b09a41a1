"""PeakWindow: the peaks and the worst pressure level of one stretch of work, from its own start.

This is the package's one notion of "memory seen during X". Every sample a ``MemoryMonitor``
takes (explicit checks and its background sampler alike) is fed to every window open on it,
so windows overlap and nest freely: a Dagster step, the merge inside it and a stream inside
that each keep their own figures from one set of readings, and an enclosing window always
holds at least what the windows inside it saw.

Between samples a window also folds in the kernel's RSS high-water mark and the PyArrow pool's
maximum, but only when they rose after the window opened: both are lifetime maxima of the
process, so before that they describe earlier work. A pool that becomes the default while a
window is open (a merge switches pools) is counted from the moment a window first opens on it.
"""

from __future__ import annotations

import threading
import time
import weakref
from typing import TYPE_CHECKING

import pyarrow as pa

from memsafe_dagster.memory.pressure import MemoryPressureLevel
from memsafe_dagster.memory.process import current_rss_bytes, peak_rss_bytes
from memsafe_dagster.memory.sizes import MiB

if TYPE_CHECKING:
    from memsafe_dagster.memory.monitor import MemoryMonitor, MemoryReading

NORMAL = MemoryPressureLevel.NORMAL


class PeaksInMB:
    """``peak_rss_mb`` and ``peak_pyarrow_mb`` for anything that has the peaks in bytes."""

    peak_rss_bytes: int
    peak_pyarrow_bytes: int

    @property
    def peak_rss_mb(self) -> float:
        return self.peak_rss_bytes / MiB

    @property
    def peak_pyarrow_mb(self) -> float:
        return self.peak_pyarrow_bytes / MiB


class WindowPeaks:
    """The peaks in MB of the ``window`` an object holds (0 while it holds none)."""

    window: PeakWindow | None

    @property
    def peak_rss_mb(self) -> float:
        return self.window.peak_rss_mb if self.window is not None else 0.0

    @property
    def peak_pyarrow_mb(self) -> float:
        return self.window.peak_pyarrow_mb if self.window is not None else 0.0


class OpenWindows:
    """The windows open on one monitor. Held weakly: a window nobody keeps (a stream dropped
    half-read) leaves by itself."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._refs: tuple[weakref.ReferenceType[PeakWindow], ...] = ()

    def add(self, window: PeakWindow) -> None:
        """Register ``window``; its default pool baseline is shared with the windows around it."""
        with self.lock:
            live = self._alive()
            for name, entry in window._pools.items():
                for other in live:
                    other._pools.setdefault(name, entry)
            self._refs = (*(weakref.ref(w) for w in live), weakref.ref(window))

    def remove(self, window: PeakWindow) -> None:
        with self.lock:
            self._refs = tuple(weakref.ref(w) for w in self._alive() if w is not window)

    def observe(self, reading: MemoryReading, level: MemoryPressureLevel) -> None:
        """Feed one sample to every open window."""
        rss = reading.rss_bytes
        arrow = reading.pyarrow_bytes
        with self.lock:
            for ref in self._refs:
                window = ref()
                if window is None:
                    continue
                if rss > window._peak_rss:
                    window._peak_rss = rss
                if arrow > window._peak_pyarrow:
                    window._peak_pyarrow = arrow
                if level > window._max_level:
                    window._max_level = level
                window.last_level = level
                window.samples += 1

    def __len__(self) -> int:
        with self.lock:
            return sum(1 for _ in self._alive())

    def _alive(self) -> list[PeakWindow]:
        return [w for w in (ref() for ref in self._refs) if w is not None]


class PeakWindow(PeaksInMB):
    """Peak RSS, peak PyArrow allocation and the worst level seen on ``monitor`` since it opened.

    Opens on construction, closes with ``close()`` or on leaving a ``with`` block; a closed
    window keeps its final figures. Read the peaks at any time (live while open).
    """

    def __init__(self, monitor: MemoryMonitor) -> None:
        self.monitor = monitor
        self.start_rss_bytes = current_rss_bytes()
        self.start_pyarrow_bytes = pa.total_allocated_bytes()
        self.opened_at = time.monotonic()
        self.closed_at: float | None = None
        self.samples = 0
        self.last_level = NORMAL  # the level of the window's latest sample
        self._peak_rss = self.start_rss_bytes
        self._peak_pyarrow = self.start_pyarrow_bytes
        self._max_level = NORMAL
        self._hwm_baseline = peak_rss_bytes() or 0
        pool = pa.default_memory_pool()
        self._pools: dict[str, tuple[pa.MemoryPool, int]] = {
            pool.backend_name: (pool, pool_max_bytes(pool))
        }
        self._final: tuple[int, int] | None = None
        self._registry: OpenWindows = monitor.windows
        self._registry.add(self)

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._final is not None

    def close(self) -> PeakWindow:
        """Stop taking samples and keep the figures as they stand (idempotent)."""
        if self._final is None:
            self._registry.remove(self)
            self._final = (self._rss_now(), self._pyarrow_now())
            self.closed_at = time.monotonic()
        return self

    def __enter__(self) -> PeakWindow:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- figures ----------------------------------------------------------------------------

    @property
    def peak_rss_bytes(self) -> int:
        """Peak RSS in the window: exact when the kernel's high-water mark rose in it."""
        return self._final[0] if self._final is not None else self._rss_now()

    @property
    def peak_pyarrow_bytes(self) -> int:
        """Peak PyArrow allocation in the window (the pool's own maximum when it rose in it)."""
        return self._final[1] if self._final is not None else self._pyarrow_now()

    @property
    def max_pressure(self) -> MemoryPressureLevel:
        """The worst level any sample of the monitor saw in the window."""
        with self._registry.lock:
            return self._max_level

    @property
    def duration_s(self) -> float:
        return (self.closed_at or time.monotonic()) - self.opened_at

    def _rss_now(self) -> int:
        hwm = peak_rss_bytes() or 0
        with self._registry.lock:
            sampled = self._peak_rss
        return max(sampled, hwm) if hwm > self._hwm_baseline else sampled

    def _pyarrow_now(self) -> int:
        with self._registry.lock:
            peak = self._peak_pyarrow
            pools = list(self._pools.values())
        for pool, baseline in pools:
            pool_max = pool_max_bytes(pool)
            if pool_max > baseline:
                peak = max(peak, pool_max)
        return peak

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return (
            f"PeakWindow(peak_rss_mb={self.peak_rss_mb:.1f}, "
            f"peak_pyarrow_mb={self.peak_pyarrow_mb:.1f}, "
            f"max_pressure={self.max_pressure.value}, samples={self.samples}, {state})"
        )


def pool_max_bytes(pool: pa.MemoryPool) -> int:
    """The pool's lifetime maximum allocation, 0 when the backend does not track it."""
    try:
        value = pool.max_memory()
    except (AttributeError, NotImplementedError):
        return 0
    return int(value) if value and value > 0 else 0
