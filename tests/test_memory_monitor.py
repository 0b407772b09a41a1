"""MemoryMonitor: thresholds, status, peaks, the background sampler, profiles."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest
from memory_helpers import MiB, fixed_limits, reading

from memsafe_dagster.memory import (
    MemoryMonitor,
    MemoryPressureError,
    MemoryPressureLevel,
    detect_memory_limits,
)

NORMAL = MemoryPressureLevel.NORMAL
WARNING = MemoryPressureLevel.WARNING
CRITICAL = MemoryPressureLevel.CRITICAL
EMERGENCY = MemoryPressureLevel.EMERGENCY


def test_levels_are_ordered() -> None:
    assert NORMAL < WARNING < CRITICAL < EMERGENCY
    assert max([WARNING, EMERGENCY, NORMAL]) is EMERGENCY
    assert sorted([CRITICAL, NORMAL, EMERGENCY, WARNING]) == [NORMAL, WARNING, CRITICAL, EMERGENCY]
    assert EMERGENCY.value == "emergency"
    assert MemoryPressureLevel.parse("CRITICAL") is CRITICAL
    with pytest.raises(ValueError, match="'dire'"):
        MemoryPressureLevel.parse("dire")


@pytest.mark.parametrize(
    ("pyarrow_mb", "expected"),
    [(0, NORMAL), (700, NORMAL), (701, WARNING), (900, WARNING), (901, CRITICAL),
     (999, CRITICAL), (1000, EMERGENCY), (5000, EMERGENCY)],
)  # fmt: skip
def test_pyarrow_ratio_thresholds(pyarrow_mb: float, expected: MemoryPressureLevel) -> None:
    monitor = MemoryMonitor(max_pyarrow_mb=1000, min_system_available_mb=0, limits=fixed_limits())
    assert monitor.classify(reading(pyarrow_mb=pyarrow_mb)) is expected


@pytest.mark.parametrize(
    ("rss_mb", "expected"),
    [(350, NORMAL), (351, WARNING), (451, CRITICAL), (500, EMERGENCY)],
)
def test_process_ratio_thresholds(rss_mb: float, expected: MemoryPressureLevel) -> None:
    monitor = MemoryMonitor(
        max_pyarrow_mb=10_000,
        max_process_memory_mb=500,
        min_system_available_mb=0,
        limits=fixed_limits(),
    )
    assert monitor.classify(reading(rss_mb=rss_mb)) is expected


def test_no_process_budget_means_rss_is_not_a_signal() -> None:
    monitor = MemoryMonitor(min_system_available_mb=0, limits=fixed_limits())
    assert monitor.classify(reading(rss_mb=100_000)) is NORMAL


@pytest.mark.parametrize(
    ("available_mb", "expected"),
    [(1024, NORMAL), (1023, WARNING), (768, WARNING), (767, CRITICAL), (512, CRITICAL),
     (511, EMERGENCY), (0, EMERGENCY), (None, NORMAL)],
)  # fmt: skip
def test_available_thresholds(available_mb: float | None, expected: MemoryPressureLevel) -> None:
    monitor = MemoryMonitor(min_system_available_mb=512, limits=fixed_limits())
    assert monitor.classify(reading(available_mb=available_mb)) is expected


def test_the_worst_signal_wins() -> None:
    monitor = MemoryMonitor(
        max_pyarrow_mb=1000,
        max_process_memory_mb=1000,
        min_system_available_mb=100,
        limits=fixed_limits(),
    )
    assert monitor.classify(reading(pyarrow_mb=750, rss_mb=950, available_mb=10_000)) is CRITICAL
    assert monitor.classify(reading(pyarrow_mb=10, rss_mb=10, available_mb=50)) is EMERGENCY


@pytest.mark.parametrize(
    "kwargs",
    [{"max_pyarrow_mb": -1}, {"max_process_memory_mb": "big"}, {"min_system_available_mb": None}],
)
def test_bad_budgets_are_rejected_by_name(kwargs: dict) -> None:
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=name):
        MemoryMonitor(**kwargs, limits=fixed_limits())


def test_status_has_the_contract_keys_and_real_figures() -> None:
    monitor = MemoryMonitor(max_pyarrow_mb=1024, max_process_memory_mb=8192)
    status = monitor.get_memory_status()
    for key in (
        "pyarrow_allocated_mb",
        "process_rss_mb",
        "system_available_mb",
        "pyarrow_peak_mb",
        "process_peak_mb",
        "limit_mb",
        "limit_source",
    ):
        assert key in status, key
    assert 20 < status["process_rss_mb"] < 8192
    assert status["process_peak_mb"] >= status["process_rss_mb"]
    assert 0 < status["system_available_mb"] <= status["limit_mb"]
    assert status["limit_source"] == detect_memory_limits().source
    assert status["pressure"] in {level.value for level in MemoryPressureLevel}
    json.dumps(status)  # JSON-ready, for metadata and `memsafe status --json`


def test_detailed_status_is_one_readable_line() -> None:
    line = MemoryMonitor(max_pyarrow_mb=512, max_process_memory_mb=4096).get_detailed_status()
    assert "\n" not in line
    assert line.startswith("pressure=")
    assert "pyarrow=" in line and "rss=" in line and "limit=" in line and "/4096MB" in line


def test_peaks_track_pyarrow_and_rss_since_reset() -> None:
    """Peaks between checks come from the pool's and the kernel's own high-water marks.

    In a fresh process: those marks only help once they rise past the process's earlier
    maximum, which the rest of the suite would already have pushed up.
    """
    code = (
        "import pyarrow as pa\n"
        "from memsafe_dagster.memory import MemoryMonitor\n"
        "MiB = 1024 * 1024\n"
        "monitor = MemoryMonitor(max_pyarrow_mb=4096)\n"
        "monitor.reset_peaks()\n"
        "before_rss = monitor.peak_rss_bytes\n"
        "arrow_buffer = pa.allocate_buffer(300 * MiB)  # counted by PyArrow's pool at once\n"
        "touched = b'\\x01' * (300 * MiB)  # written pages: RSS really rises\n"
        "del arrow_buffer, touched\n"
        "# Nothing was sampled while they lived.\n"
        "assert pa.total_allocated_bytes() < 300 * MiB\n"
        "print(monitor.peak_pyarrow_bytes // MiB, (monitor.peak_rss_bytes - before_rss) // MiB)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    peak_pyarrow_mb, rss_rise_mb = map(int, out.stdout.split())
    assert peak_pyarrow_mb >= 300
    assert rss_rise_mb >= 250


def test_sampler_sees_pressure_between_explicit_checks() -> None:
    monitor = MemoryMonitor(max_pyarrow_mb=100, min_system_available_mb=0, limits=fixed_limits())
    monitor.reset_peaks()
    with monitor.sampling(interval_s=0.01):
        buf = pa.allocate_buffer(150 * MiB)
        time.sleep(0.2)
        del buf
        time.sleep(0.05)
    # No explicit check ran while the buffer lived; the sampler saw it.
    assert monitor.max_pressure is EMERGENCY
    assert monitor.peak_pyarrow_bytes >= 150 * MiB
    assert monitor.check_memory_pressure() is NORMAL
    assert monitor._sampler is None  # stopped on leaving the block


def test_sampler_start_stop_and_cpu_accounting() -> None:
    monitor = MemoryMonitor(limits=fixed_limits())
    monitor.start_sampling(interval_s=0.01)
    sampler = monitor._sampler
    time.sleep(0.3)
    monitor.stop_sampling()
    assert not sampler.running
    assert sampler.samples >= 10
    assert 0 < sampler.cpu_seconds < 0.3


def test_should_check_memory() -> None:
    monitor = MemoryMonitor(limits=fixed_limits())
    assert [n for n in range(1, 31) if monitor.should_check_memory(n)] == [10, 20, 30]
    assert monitor.should_check_memory(6, check_interval=3)
    with pytest.raises(ValueError, match="check_interval"):
        monitor.should_check_memory(1, check_interval=0)


def test_for_container_splits_the_limit_60_40_20() -> None:
    monitor = MemoryMonitor.for_container(env={"MEMSAFE_MEMORY_LIMIT": "2g"})
    assert monitor.limits.source in {"env:MEMSAFE_MEMORY_LIMIT", "cgroup-v1", "cgroup-v2"}
    if monitor.limits.source == "env:MEMSAFE_MEMORY_LIMIT":
        assert monitor.max_process_memory_mb == 1228
        assert monitor.max_pyarrow_mb == 819
        assert monitor.min_system_available_mb == 409


@pytest.mark.parametrize(
    ("available_mb", "tier"),
    [(3000, (256, 512, 128)), (6000, (512, 1024, 256)), (20_000, (1024, 2048, 512))],
)
def test_for_development_uses_the_seed_tiers(
    tmp_path: Path, available_mb: int, tier: tuple[int, int, int]
) -> None:
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/meminfo").write_text(
        f"MemTotal: {32 * 1024 * 1024} kB\nMemAvailable: {available_mb * 1024} kB\n"
    )
    limits = detect_memory_limits(env={}, root=str(tmp_path))
    monitor = MemoryMonitor.for_development(limits=limits)
    got = (monitor.max_pyarrow_mb, monitor.max_process_memory_mb, monitor.min_system_available_mb)
    assert got == tier


def test_memory_pressure_error_carries_level_and_status() -> None:
    err = MemoryPressureError("stop", MemoryPressureLevel.EMERGENCY, {"process_rss_mb": 1.0})
    assert isinstance(err, MemoryError)
    assert err.level is EMERGENCY
    assert err.status == {"process_rss_mb": 1.0}
    assert str(err) == "stop"


def test_works_without_psutil() -> None:
    """With psutil not importable, `psutil` is None and every reading still works."""
    code = (
        "import sys; sys.modules['psutil'] = None\n"
        "from memsafe_dagster.memory import MemoryMonitor, psutil, detect_memory_limits\n"
        "assert psutil is None\n"
        "m = MemoryMonitor(max_process_memory_mb=4096)\n"
        "s = m.get_memory_status()\n"
        "assert s['process_rss_mb'] > 10, s\n"
        "assert s['system_available_mb'] > 0, s\n"
        "assert detect_memory_limits().physical_bytes > 0\n"
        "print(m.check_memory_pressure().value)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() in {"normal", "warning", "critical", "emergency"}
