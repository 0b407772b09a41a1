"""MemoryMonitor: PyArrow allocation, process RSS and container headroom, turned into a level.

It reads and classifies; what was seen over time lives in windows (``memory/window.py``), fed
by every sample, and background sampling in its one shared sampler (``memory/sampler.py``).
Its own peaks, "since the last ``reset_peaks()``", are simply the window it keeps open.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from memsafe_dagster.memory.limits import MemoryLimits, detect_memory_limits
from memsafe_dagster.memory.pressure import MemoryPressureLevel
from memsafe_dagster.memory.process import current_rss_bytes
from memsafe_dagster.memory.sampler import MemorySampler, SamplingRequest
from memsafe_dagster.memory.sizes import MiB, format_mb
from memsafe_dagster.memory.window import OpenWindows, PeakWindow

NORMAL = MemoryPressureLevel.NORMAL
WARNING = MemoryPressureLevel.WARNING
CRITICAL = MemoryPressureLevel.CRITICAL
EMERGENCY = MemoryPressureLevel.EMERGENCY


@dataclass(frozen=True)
class MemoryReading:
    """One snapshot of the three signals, in bytes."""

    pyarrow_bytes: int
    rss_bytes: int
    available_bytes: int | None
    working_set_bytes: int | None
    at: float


def _ratio_level(used: float, budget: float | None) -> MemoryPressureLevel:
    if not budget or budget <= 0:
        return NORMAL
    ratio = used / budget
    if ratio >= 1.0:
        return EMERGENCY
    if ratio > 0.9:
        return CRITICAL
    if ratio > 0.7:
        return WARNING
    return NORMAL


def _available_level(available: float | None, minimum: float) -> MemoryPressureLevel:
    if available is None or minimum <= 0:
        return NORMAL
    if available < minimum:
        return EMERGENCY
    if available < 1.5 * minimum:
        return CRITICAL
    if available < 2 * minimum:
        return WARNING
    return NORMAL


def _positive(name: str, value: float | None, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"{name} must be a non-negative number of MB, got {value!r}")
    return value


class MemoryMonitor:
    """Watches PyArrow's allocator, process RSS and what the container may still use.

    ``check_memory_pressure()`` returns the worst of three signals: PyArrow and process usage
    against their budgets (> 70 % WARNING, > 90 % CRITICAL, >= 100 % EMERGENCY) and available
    memory against ``min_system_available_mb`` (< 2x WARNING, < 1.5x CRITICAL, < 1x EMERGENCY).
    Available memory is container-aware: the cgroup or env limit minus the working set.
    Every sample feeds the windows open on the monitor (``PeakWindow(monitor)``), its own
    included; ``sampler`` keeps them fed between checks.
    """

    def __init__(
        self,
        max_pyarrow_mb: float = 2048,
        max_process_memory_mb: float | None = None,
        min_system_available_mb: float = 512,
        *,
        limits: MemoryLimits | None = None,
    ) -> None:
        self.max_pyarrow_mb = _positive("max_pyarrow_mb", max_pyarrow_mb)
        self.max_process_memory_mb = _positive(
            "max_process_memory_mb", max_process_memory_mb, allow_none=True
        )
        self.min_system_available_mb = _positive("min_system_available_mb", min_system_available_mb)
        self.limits = limits if limits is not None else detect_memory_limits()
        self.windows = OpenWindows()
        self.sampler = MemorySampler(self)
        self._standing: SamplingRequest | None = None
        self.window = PeakWindow(self)

    # -- constructors -------------------------------------------------------------------------

    @classmethod
    def for_container(
        cls, env: Mapping[str, str] | None = None, *, limits: MemoryLimits | None = None
    ) -> MemoryMonitor:
        """Budgets from the detected limit: 60 % process, 40 % PyArrow, 20 % kept free."""
        limits = limits if limits is not None else detect_memory_limits(env=env)
        total_mb = limits.limit_bytes / MiB
        return cls(
            max_pyarrow_mb=int(total_mb * 0.4),
            max_process_memory_mb=int(total_mb * 0.6),
            min_system_available_mb=int(total_mb * 0.2),
            limits=limits,
        )

    @classmethod
    def for_development(cls, *, limits: MemoryLimits | None = None) -> MemoryMonitor:
        """The seed's tiers, picked by what this container may still use (< 4 GB, < 8 GB, more)."""
        limits = limits if limits is not None else detect_memory_limits()
        available_mb = limits.available_bytes(current_rss_bytes()) / MiB
        if available_mb < 4096:
            tier = (256, 512, 128)
        elif available_mb < 8192:
            tier = (512, 1024, 256)
        else:
            tier = (1024, 2048, 512)
        return cls(
            max_pyarrow_mb=tier[0],
            max_process_memory_mb=tier[1],
            min_system_available_mb=tier[2],
            limits=limits,
        )

    # -- readings -----------------------------------------------------------------------------

    def read(self) -> MemoryReading:
        """Take one snapshot of the signals without classifying it."""
        rss = current_rss_bytes()
        working_set, available = self.limits.usage(rss)
        return MemoryReading(
            pyarrow_bytes=pa.total_allocated_bytes(),
            rss_bytes=rss,
            available_bytes=available,
            working_set_bytes=working_set,
            at=time.monotonic(),
        )

    def classify(self, reading: MemoryReading) -> MemoryPressureLevel:
        """The pressure level of ``reading`` under this monitor's budgets."""
        return max(
            _ratio_level(reading.pyarrow_bytes / MiB, self.max_pyarrow_mb),
            _ratio_level(reading.rss_bytes / MiB, self.max_process_memory_mb),
            _available_level(
                None if reading.available_bytes is None else reading.available_bytes / MiB,
                self.min_system_available_mb,
            ),
        )

    def sample(self) -> tuple[MemoryReading, MemoryPressureLevel]:
        """Read, classify and feed every open window; what the sampler and every check call."""
        reading = self.read()
        level = self.classify(reading)
        self.windows.observe(reading, level)
        return reading, level

    def check_memory_pressure(self) -> MemoryPressureLevel:
        """The current pressure level (the worst of the three signals)."""
        return self.sample()[1]

    def should_check_memory(self, chunks_processed: int, check_interval: int = 10) -> bool:
        """True every ``check_interval`` chunks, so callers can keep checks off the hot path."""
        if check_interval <= 0:
            raise ValueError(f"check_interval must be positive, got {check_interval!r}")
        return chunks_processed % check_interval == 0

    # -- peaks --------------------------------------------------------------------------------

    def reset_peaks(self) -> None:
        """Start a new window for the monitor's own peaks and worst level."""
        previous, self.window = self.window, PeakWindow(self)
        previous.close()

    @property
    def peak_rss_bytes(self) -> int:
        """Peak RSS since the last reset: exact when the kernel's high-water mark rose in it."""
        return self.window.peak_rss_bytes

    @property
    def peak_pyarrow_bytes(self) -> int:
        """Peak PyArrow allocation since the last reset (the pool's own maximum when it rose)."""
        return self.window.peak_pyarrow_bytes

    @property
    def max_pressure(self) -> MemoryPressureLevel:
        """The worst level any check or sample saw since the last reset."""
        return self.window.max_pressure

    # -- reports ------------------------------------------------------------------------------

    def get_memory_status(self, window: PeakWindow | None = None) -> dict[str, Any]:
        """Current figures in MB, the peaks of ``window`` (default: since the last reset), the
        limit and the level."""
        reading, level = self.sample()
        return self.status_of(reading, level, window)

    def status_of(
        self,
        reading: MemoryReading,
        level: MemoryPressureLevel,
        window: PeakWindow | None = None,
    ) -> dict[str, Any]:
        """The status dict for a reading already taken (peaks of ``window``, default the
        monitor's own)."""
        window = window if window is not None else self.window
        available = reading.available_bytes
        return {
            "pyarrow_allocated_mb": round(reading.pyarrow_bytes / MiB, 2),
            "pyarrow_peak_mb": round(window.peak_pyarrow_bytes / MiB, 2),
            "process_rss_mb": round(reading.rss_bytes / MiB, 2),
            "process_peak_mb": round(window.peak_rss_bytes / MiB, 2),
            "system_available_mb": None if available is None else round(available / MiB, 2),
            "working_set_mb": (
                None
                if reading.working_set_bytes is None
                else round(reading.working_set_bytes / MiB, 2)
            ),
            "limit_mb": round(self.limits.limit_mb, 2),
            "limit_source": self.limits.source,
            "max_pyarrow_mb": self.max_pyarrow_mb,
            "max_process_memory_mb": self.max_process_memory_mb,
            "min_system_available_mb": self.min_system_available_mb,
            "pressure": level.value,
        }

    def get_detailed_status(self, window: PeakWindow | None = None) -> str:
        """One readable line with every figure and the level (peak of ``window``, default
        since the last reset)."""
        window = window if window is not None else self.window
        reading, level = self.sample()
        process_budget = (
            f"/{self.max_process_memory_mb:.0f}MB" if self.max_process_memory_mb else ""
        )
        return (
            f"pressure={level.value.upper()} "
            f"pyarrow={format_mb(reading.pyarrow_bytes)}/{self.max_pyarrow_mb:.0f}MB "
            f"rss={format_mb(reading.rss_bytes)}{process_budget} "
            f"available={format_mb(reading.available_bytes)} "
            f"(min {self.min_system_available_mb:.0f}MB) "
            f"peak_rss={format_mb(window.peak_rss_bytes)} "
            f"limit={self.limits.describe()}"
        )

    # -- background sampling ------------------------------------------------------------------

    def start_sampling(self, interval_s: float = 0.1) -> None:
        """Keep the sampler running every ``interval_s`` (at most) until ``stop_sampling()``.

        A no-op when this was already asked for; other users of the sampler are unaffected.
        """
        if self._standing is None:
            self._standing = self.sampler.request(interval_s)

    def stop_sampling(self) -> None:
        """Withdraw ``start_sampling``'s request; the thread stops unless others still ask."""
        standing, self._standing = self._standing, None
        if standing is not None:
            standing.release()

    @contextlib.contextmanager
    def sampling(self, interval_s: float = 0.1) -> Iterator[MemoryMonitor]:
        """Sample in the background (at least every ``interval_s``) for the block."""
        with self.sampler.request(interval_s):
            yield self

    @property
    def _sampler(self) -> MemorySampler | None:
        """The sampler while its thread runs, else None (benchmarks read its cpu_seconds)."""
        return self.sampler if self.sampler.running else None

    def __repr__(self) -> str:
        return (
            f"MemoryMonitor(max_pyarrow_mb={self.max_pyarrow_mb}, "
            f"max_process_memory_mb={self.max_process_memory_mb}, "
            f"min_system_available_mb={self.min_system_available_mb}, "
            f"limit={self.limits.describe()})"
        )
