"""MemoryMonitor: PyArrow allocation, process RSS and container headroom, turned into a level."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from memsafe_dagster.memory.limits import MemoryLimits, detect_memory_limits
from memsafe_dagster.memory.pressure import MemoryPressureLevel
from memsafe_dagster.memory.process import current_rss_bytes, peak_rss_bytes
from memsafe_dagster.memory.sizes import MiB, format_mb

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
    Every reading also updates peaks; a background sampler keeps them between checks.
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
        self._lock = threading.Lock()
        self._sampler: Any = None
        self.reset_peaks()

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
        """Read, classify and record peaks; what the sampler and every check call."""
        reading = self.read()
        level = self.classify(reading)
        with self._lock:
            self._peak_pyarrow = max(self._peak_pyarrow, reading.pyarrow_bytes)
            self._peak_rss = max(self._peak_rss, reading.rss_bytes)
            self._max_level = max(self._max_level, level)
            self._samples += 1
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
        """Start a new window for peaks and the worst level seen."""
        with self._lock:
            self._peak_pyarrow = pa.total_allocated_bytes()
            self._peak_rss = current_rss_bytes()
            self._max_level = NORMAL
            self._samples = 0
            self._hwm_baseline = peak_rss_bytes() or 0
            self._pool_baseline = _pool_max_memory()

    @property
    def peak_rss_bytes(self) -> int:
        """Peak RSS since the last reset: exact when the kernel's high-water mark rose in it."""
        hwm = peak_rss_bytes() or 0
        with self._lock:
            sampled = self._peak_rss
            baseline = self._hwm_baseline
        return max(sampled, hwm) if hwm > baseline else sampled

    @property
    def peak_pyarrow_bytes(self) -> int:
        """Peak PyArrow allocation since the last reset (the pool's own maximum when it rose)."""
        pool_max = _pool_max_memory()
        with self._lock:
            sampled = self._peak_pyarrow
            baseline = self._pool_baseline
        return max(sampled, pool_max) if pool_max > baseline else sampled

    @property
    def max_pressure(self) -> MemoryPressureLevel:
        """The worst level any check or sample saw since the last reset."""
        with self._lock:
            return self._max_level

    # -- reports ------------------------------------------------------------------------------

    def get_memory_status(self) -> dict[str, Any]:
        """Current figures in MB, peaks since the last reset, the limit and the level."""
        reading, level = self.sample()
        return self.status_of(reading, level)

    def status_of(self, reading: MemoryReading, level: MemoryPressureLevel) -> dict[str, Any]:
        """The status dict for a reading already taken."""
        available = reading.available_bytes
        return {
            "pyarrow_allocated_mb": round(reading.pyarrow_bytes / MiB, 2),
            "pyarrow_peak_mb": round(self.peak_pyarrow_bytes / MiB, 2),
            "process_rss_mb": round(reading.rss_bytes / MiB, 2),
            "process_peak_mb": round(self.peak_rss_bytes / MiB, 2),
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

    def get_detailed_status(self) -> str:
        """One readable line with every figure and the level."""
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
            f"peak_rss={format_mb(self.peak_rss_bytes)} "
            f"limit={self.limits.describe()}"
        )

    # -- background sampling ------------------------------------------------------------------

    def start_sampling(self, interval_s: float = 0.1) -> None:
        """Sample in a daemon thread every ``interval_s`` so peaks between checks are kept."""
        from memsafe_dagster.memory.sampler import MemorySampler

        if self._sampler is not None and self._sampler.running:
            return
        self._sampler = MemorySampler(self, interval_s=interval_s)
        self._sampler.start()

    def stop_sampling(self) -> None:
        """Stop the background sampler (no-op when none runs)."""
        if self._sampler is not None:
            self._sampler.stop()
            self._sampler = None

    @contextlib.contextmanager
    def sampling(self, interval_s: float = 0.1) -> Iterator[MemoryMonitor]:
        """Sample in the background for the duration of the block."""
        already = self._sampler is not None and self._sampler.running
        if not already:
            self.start_sampling(interval_s)
        try:
            yield self
        finally:
            if not already:
                self.stop_sampling()

    def __repr__(self) -> str:
        return (
            f"MemoryMonitor(max_pyarrow_mb={self.max_pyarrow_mb}, "
            f"max_process_memory_mb={self.max_process_memory_mb}, "
            f"min_system_available_mb={self.min_system_available_mb}, "
            f"limit={self.limits.describe()})"
        )


def _pool_max_memory() -> int:
    try:
        value = pa.default_memory_pool().max_memory()
    except (AttributeError, NotImplementedError):
        return 0
    return int(value) if value and value > 0 else 0
