"""PeakWindow: each window has its own start, sees every sample of its monitor while open,
keeps its figures once closed, and never reports what happened outside it."""

import subprocess
import sys
import time

import pyarrow as pa
from memory_helpers import MiB, fixed_limits

from memsafe_dagster.memory import MemoryMonitor, MemoryPressureLevel, PeakWindow
from memsafe_dagster.memory.process import current_rss_bytes, peak_rss_bytes

NORMAL = MemoryPressureLevel.NORMAL
WARNING = MemoryPressureLevel.WARNING
EMERGENCY = MemoryPressureLevel.EMERGENCY


class LevelMonitor(MemoryMonitor):
    """Real readings, the level set by the test."""

    def __init__(self) -> None:
        super().__init__(max_pyarrow_mb=4096, min_system_available_mb=0, limits=fixed_limits())
        self.level = NORMAL

    def classify(self, reading) -> MemoryPressureLevel:
        return self.level


def test_a_level_seen_before_a_window_opened_is_not_in_it() -> None:
    monitor = LevelMonitor()
    first = PeakWindow(monitor)
    monitor.level = EMERGENCY
    monitor.sample()
    monitor.level = NORMAL
    second = PeakWindow(monitor)
    monitor.sample()
    assert first.max_pressure is EMERGENCY
    assert second.max_pressure is NORMAL


def test_a_closed_window_takes_no_more_samples() -> None:
    monitor = LevelMonitor()
    window = PeakWindow(monitor)
    monitor.sample()
    window.close()
    samples, rss, arrow = window.samples, window.peak_rss_bytes, window.peak_pyarrow_bytes
    monitor.level = EMERGENCY
    held = pa.allocate_buffer(32 * MiB)
    monitor.sample()
    del held
    assert window.max_pressure is NORMAL
    assert (window.samples, window.peak_rss_bytes, window.peak_pyarrow_bytes) == (
        samples,
        rss,
        arrow,
    )
    assert window.closed and window.close() is window  # closing twice is harmless


def test_nested_windows_each_count_from_their_own_start() -> None:
    monitor = LevelMonitor()
    outer = PeakWindow(monitor)
    big = pa.allocate_buffer(64 * MiB)
    monitor.level = WARNING
    monitor.sample()
    del big
    pa.default_memory_pool().release_unused()
    monitor.level = NORMAL
    with PeakWindow(monitor) as inner:
        small = pa.allocate_buffer(4 * MiB)
        monitor.sample()
        del small
    monitor.sample()
    outer.close()
    assert outer.opened_at < inner.opened_at
    assert outer.peak_pyarrow_bytes >= 64 * MiB
    assert 4 * MiB <= inner.peak_pyarrow_bytes < 32 * MiB
    assert (outer.max_pressure, inner.max_pressure) == (WARNING, NORMAL)
    assert (inner.samples, outer.samples) == (1, 3)
    assert len(monitor.windows) == 1  # only the monitor's own is still open


def test_a_peak_before_the_window_does_not_leak_in_through_the_kernel_mark() -> None:
    """VmHWM is a lifetime maximum: a window opened after a spike must not report it."""
    spike = b"\x01" * (200 * MiB)  # written pages: RSS and VmHWM really rise
    del spike
    window = PeakWindow(MemoryMonitor(limits=fixed_limits()))
    assert (peak_rss_bytes() or 0) - current_rss_bytes() > 100 * MiB, "the spike was returned"
    assert window.peak_rss_bytes < (peak_rss_bytes() or 0) - 100 * MiB


def test_a_window_sees_a_spike_between_explicit_checks_only_through_the_sampler() -> None:
    """The same 150 MB allocation under a 100 MB budget, held 0.2 s with no explicit check:
    with the sampler running the window saw EMERGENCY, without it nothing sampled at all."""
    levels = {}
    for sampled in (True, False):
        monitor = MemoryMonitor(
            max_pyarrow_mb=100, min_system_available_mb=0, limits=fixed_limits()
        )
        window = PeakWindow(monitor)
        request = monitor.sampler.request(0.01) if sampled else None
        buf = pa.allocate_buffer(150 * MiB)
        time.sleep(0.2)
        del buf
        time.sleep(0.05)
        if request is not None:
            request.release()
        window.close()
        levels[sampled] = (window.max_pressure, window.samples)
        if sampled:
            assert window.peak_pyarrow_bytes >= 150 * MiB
    assert levels[True][0] is EMERGENCY and levels[True][1] >= 5
    assert levels[False] == (NORMAL, 0)


def test_the_monitors_own_peaks_are_a_window_reset_by_reset_peaks() -> None:
    monitor = LevelMonitor()
    monitor.level = EMERGENCY
    monitor.sample()
    before = monitor.window
    monitor.reset_peaks()
    assert before.closed and before.max_pressure is EMERGENCY
    assert monitor.window is not before and monitor.max_pressure is NORMAL
    assert len(monitor.windows) == 1


def test_a_window_nobody_keeps_leaves_the_monitor() -> None:
    monitor = LevelMonitor()
    PeakWindow(monitor)  # e.g. a stream dropped half-read: never closed
    monitor.sample()
    assert len(monitor.windows) == 1


def test_a_pool_made_default_inside_a_window_counts_for_the_windows_around_it() -> None:
    """A merge switches the default pool and opens its window there: the step's window
    around it must count that pool's peak too (in a fresh process, so the pool is unused)."""
    code = (
        "import pyarrow as pa\n"
        "from memsafe_dagster.memory import MemoryMonitor, PeakWindow\n"
        "MiB = 1024 * 1024\n"
        "monitor = MemoryMonitor(max_pyarrow_mb=4096)\n"
        "outer = PeakWindow(monitor)\n"
        "previous = pa.default_memory_pool()\n"
        "other = pa.system_memory_pool()\n"
        "assert other.backend_name != previous.backend_name\n"
        "pa.set_memory_pool(other)\n"
        "inner = PeakWindow(monitor)\n"
        "buf = pa.allocate_buffer(100 * MiB)\n"
        "del buf\n"
        "pa.set_memory_pool(previous)\n"
        "inner.close(); outer.close()\n"
        "print(inner.peak_pyarrow_bytes // MiB, outer.peak_pyarrow_bytes // MiB)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    inner_mb, outer_mb = map(int, out.stdout.split())
    assert inner_mb >= 100
    assert outer_mb >= inner_mb
