"""MemoryMonitorResource: profiles, EnvVar config, check() levels and Failure, track() metadata."""

import logging
import threading
import time
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from dagster_helpers import (
    MiB,
    failure_data,
    fixed_limits,
    latest_metadata,
    run_logs,
    step_failures,
)

from memsafe_dagster import metadata as md
from memsafe_dagster.datasets.merge import merge_dataset
from memsafe_dagster.memory import MemoryMonitor, MemoryPressureError, MemoryPressureLevel
from memsafe_dagster.memory.sampler import THREAD_NAME
from memsafe_dagster.resources import MemoryMonitorResource, MemoryTracker

LIMIT_SOURCES = {
    "env:MEMSAFE_MEMORY_LIMIT",
    "env:CONTAINER_MEMORY_LIMIT",
    "cgroup-v1",
    "cgroup-v2",
    "physical",
}


def budgets(monitor: MemoryMonitor) -> tuple:
    return (monitor.max_pyarrow_mb, monitor.max_process_memory_mb, monitor.min_system_available_mb)


# -- profiles and config -------------------------------------------------------------------------


def test_container_profile_splits_the_limit_and_keeps_set_budgets() -> None:
    limits = fixed_limits(4096)
    assert budgets(MemoryMonitorResource().build_monitor(limits)) == (1638, 2457, 819)
    monitor = MemoryMonitorResource(max_pyarrow_mb=100).build_monitor(limits)
    assert budgets(monitor) == (100, 2457, 819)
    assert monitor.limits is limits


def test_development_profile_uses_the_seed_tiers() -> None:
    limits = fixed_limits(4096)
    tier = budgets(MemoryMonitor.for_development(limits=limits))
    assert tier in {(256, 512, 128), (512, 1024, 256), (1024, 2048, 512)}
    resource = MemoryMonitorResource(profile="development", min_system_available_mb=64)
    assert budgets(resource.build_monitor(limits)) == (tier[0], tier[1], 64)


def test_explicit_profile_needs_all_three_budgets() -> None:
    with pytest.raises(ValueError, match="missing: max_process_memory_mb, min_system_available_mb"):
        MemoryMonitorResource(profile="explicit", max_pyarrow_mb=100)
    resource = MemoryMonitorResource(
        profile="explicit", max_pyarrow_mb=100, max_process_memory_mb=200, min_system_available_mb=0
    )
    assert budgets(resource.build_monitor(fixed_limits())) == (100, 200, 0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"profile": "laptop"}, "profile must be one of container, development, explicit"),
        ({"max_pyarrow_mb": -1}, "max_pyarrow_mb must be >= 0"),
        ({"sampling_interval_ms": -5}, "sampling_interval_ms must be >= 0"),
    ],
)
def test_bad_config_is_rejected_by_name(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MemoryMonitorResource(**kwargs)


def test_get_monitor_is_built_once_with_the_detected_limit() -> None:
    resource = MemoryMonitorResource()
    monitor = resource.get_monitor()
    assert resource.get_monitor() is monitor
    assert monitor.limits.source in LIMIT_SOURCES
    assert monitor.max_process_memory_mb == int(monitor.limits.limit_mb * 0.6)


def test_budgets_and_profile_come_from_env_vars_at_run_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TEST_MEMSAFE_PYARROW_MB", "300")
    monkeypatch.setenv("TEST_MEMSAFE_PROCESS_MB", "900")
    monkeypatch.setenv("TEST_MEMSAFE_MIN_AVAILABLE_MB", "50")
    monkeypatch.setenv("TEST_MEMSAFE_PROFILE", "explicit")
    seen: list[tuple] = []

    @dg.asset
    def probe(memory: MemoryMonitorResource) -> None:
        seen.append(budgets(memory.get_monitor()))

    resource = MemoryMonitorResource(
        max_pyarrow_mb=dg.EnvVar.int("TEST_MEMSAFE_PYARROW_MB"),
        max_process_memory_mb=dg.EnvVar.int("TEST_MEMSAFE_PROCESS_MB"),
        min_system_available_mb=dg.EnvVar.int("TEST_MEMSAFE_MIN_AVAILABLE_MB"),
        profile=dg.EnvVar("TEST_MEMSAFE_PROFILE"),
    )
    assert dg.materialize([probe], resources={"memory": resource}).success
    assert seen == [(300, 900, 50)]


# -- check() -------------------------------------------------------------------------------------


def _check_run(max_pyarrow_mb: int, allocate_mb: int, stage: str):
    """Materialize an asset that holds ``allocate_mb`` of PyArrow memory and checks."""
    levels: list[MemoryPressureLevel] = []

    @dg.asset
    def checked(context: dg.AssetExecutionContext, memory: MemoryMonitorResource) -> None:
        held = pa.allocate_buffer(allocate_mb * MiB) if allocate_mb else None
        try:
            levels.append(memory.check(context, stage))
        finally:
            del held  # the failure's traceback must not keep the buffer alive

    instance = dg.DagsterInstance.ephemeral()
    resource = MemoryMonitorResource(max_pyarrow_mb=max_pyarrow_mb)
    result = dg.materialize(
        [checked], resources={"memory": resource}, instance=instance, raise_on_error=False
    )
    return result, levels, instance


def test_check_is_silent_when_normal_and_logs_warning_and_critical() -> None:
    pa.default_memory_pool().release_unused()
    baseline_mb = pa.total_allocated_bytes() / MiB
    assert baseline_mb < 5, "other tests left PyArrow memory allocated"

    result, levels, instance = _check_run(1000, 0, "calm stage")
    assert result.success and levels == [MemoryPressureLevel.NORMAL]
    assert not [m for _, m in run_logs(instance, result.run_id) if "memsafe" in m]

    result, levels, instance = _check_run(100, 80, "warm stage")
    assert result.success and levels == [MemoryPressureLevel.WARNING]
    logged = [(lvl, m) for lvl, m in run_logs(instance, result.run_id) if "memsafe" in m]
    assert len(logged) == 1
    assert logged[0][0] == logging.WARNING
    assert "memory pressure WARNING during warm stage" in logged[0][1]

    result, levels, instance = _check_run(100, 95, "hot stage")
    assert result.success and levels == [MemoryPressureLevel.CRITICAL]
    logged = [(lvl, m) for lvl, m in run_logs(instance, result.run_id) if "memsafe" in m]
    assert [lvl for lvl, _ in logged] == [logging.ERROR]
    assert "memory pressure CRITICAL during hot stage" in logged[0][1]


def test_check_at_emergency_fails_the_step_with_the_memsafe_failure() -> None:
    result, levels, _ = _check_run(100, 150, "the big join")
    assert not result.success and levels == []
    [failure] = step_failures(result)
    description, metadata = failure_data(failure)
    assert description.startswith("memsafe: memory pressure EMERGENCY")
    assert "during the big join" in description
    assert "PyArrow allocation" in description and ">= max_pyarrow_mb 100" in description
    assert "Peak RSS" in description and "limit" in description
    for key in md.MEMORY_KEYS:
        assert key in metadata, key
    assert metadata[md.PRESSURE] == "emergency"
    assert metadata[md.PEAK_PYARROW_MB] >= 150
    assert metadata[md.LIMIT_SOURCE] in LIMIT_SOURCES
    assert metadata[md.STAGE] == "the big join"
    assert metadata[md.BUDGETS]["max_pyarrow_mb"] == 100


# -- track() -------------------------------------------------------------------------------------


def test_track_records_memory_metadata_on_the_materialization() -> None:
    @dg.asset
    def tracked(context: dg.AssetExecutionContext, memory: MemoryMonitorResource) -> None:
        with memory.track(context) as tracker:
            data = pc.random(16 * MiB // 8)  # 16 MiB of float64, really written
            tracker.add_chunks(3)
            # Held for several sampling intervals: the pool's own maximum only helps when this
            # is the process's largest allocation yet, which earlier tests in the suite defeat.
            time.sleep(0.35)
            del data

    instance = dg.DagsterInstance.ephemeral()
    resource = MemoryMonitorResource(max_pyarrow_mb=4096)
    assert dg.materialize([tracked], resources={"memory": resource}, instance=instance).success
    meta = latest_metadata(instance, "tracked")
    limits = resource.get_monitor().limits
    assert meta[md.PRESSURE] == "normal"
    assert meta[md.PEAK_PYARROW_MB] >= 16
    assert meta[md.PEAK_RSS_MB] >= 16
    assert meta[md.LIMIT_MB] == pytest.approx(limits.limit_mb, abs=0.01)
    assert meta[md.LIMIT_SOURCE] == limits.source
    assert meta[md.HEADROOM_MB] == pytest.approx(meta[md.LIMIT_MB] - meta[md.PEAK_RSS_MB], abs=0.02)
    assert meta[md.CHUNKS] == 3


@pytest.mark.parametrize(("interval_ms", "expected"), [(20, "warning"), (0, "normal")])
def test_track_samples_in_the_background_between_checks(interval_ms: int, expected: str) -> None:
    """A transient WARNING (80 of 100 MB, held 0.3 s, freed) is seen only by the sampler."""

    @dg.asset
    def spiky(context: dg.AssetExecutionContext, memory: MemoryMonitorResource):
        with memory.track(context, record=False) as tracker:
            held = pa.allocate_buffer(80 * MiB)
            time.sleep(0.3)
            del held
        return dg.MaterializeResult(metadata={**tracker.metadata, "extra": 1})

    instance = dg.DagsterInstance.ephemeral()
    resource = MemoryMonitorResource(max_pyarrow_mb=100, sampling_interval_ms=interval_ms)
    assert dg.materialize([spiky], resources={"memory": resource}, instance=instance).success
    meta = latest_metadata(instance, "spiky")
    assert meta[md.PRESSURE] == expected
    assert meta["extra"] == 1
    assert md.CHUNKS not in meta


def test_track_turns_memory_pressure_error_into_the_memsafe_failure() -> None:
    @dg.asset
    def streaming(context: dg.AssetExecutionContext, memory: MemoryMonitorResource) -> None:
        with memory.track(context, stage="streaming the inbox"):
            raise MemoryPressureError("memory pressure EMERGENCY while streaming (chunk 4)")

    result = dg.materialize(
        [streaming], resources={"memory": MemoryMonitorResource()}, raise_on_error=False
    )
    [failure] = step_failures(result)
    description, metadata = failure_data(failure)
    assert description.startswith("memsafe: memory pressure EMERGENCY during streaming the inbox")
    assert metadata[md.PRESSURE] == "emergency"
    assert metadata[md.DETAIL] == "memory pressure EMERGENCY while streaming (chunk 4)"
    assert {*md.MEMORY_KEYS} <= set(metadata)


def test_nested_tracks_keep_their_own_peaks() -> None:
    resource = MemoryMonitorResource(max_pyarrow_mb=4096, sampling_interval_ms=10)
    with resource.track(stage="outer") as outer:
        big = pa.allocate_buffer(64 * MiB)
        time.sleep(0.05)
        del big
        pa.default_memory_pool().release_unused()
        with resource.track(stage="inner") as inner:
            small = pa.allocate_buffer(4 * MiB)
            time.sleep(0.05)
            del small
    assert outer.figures.peak_pyarrow_mb >= 64
    assert 4 <= inner.figures.peak_pyarrow_mb < 32
    assert inner.stage == "inner"


def test_track_outside_dagster_yields_figures_and_records_nothing() -> None:
    resource = MemoryMonitorResource(max_pyarrow_mb=4096)
    with resource.track() as tracker:
        pass
    assert set(md.MEMORY_KEYS) <= set(tracker.metadata)
    assert tracker.stage == "this block"


def test_track_records_on_an_io_managers_output_context() -> None:
    resource = MemoryMonitorResource(max_pyarrow_mb=4096)
    context = dg.build_output_context(asset_key=dg.AssetKey("written"))
    with resource.track(context) as tracker:
        tracker.add_chunks(2)
    logged = {k: v.value for k, v in context.get_logged_metadata().items()}
    assert logged[md.CHUNKS] == 2
    assert set(md.MEMORY_KEYS) <= set(logged)
    assert tracker.stage == "asset written"


def test_track_watches_the_resources_own_monitor() -> None:
    resource = MemoryMonitorResource(max_pyarrow_mb=4096, sampling_interval_ms=10)
    monitor = resource.get_monitor()
    with resource.track() as tracker:
        assert tracker.monitor is monitor
        assert monitor.sampler.running and monitor.sampler.interval_s == 0.01
        time.sleep(0.05)
    assert not monitor.sampler.running
    assert tracker.window is not None and tracker.window.closed
    assert tracker.window.samples >= 3


def test_a_track_around_a_merge_already_holds_what_the_merge_guard_saw(tmp_path: Path) -> None:
    """The step's window and the merge guard's window watch one monitor with one sampler: the
    tracker's figures are never below the merge result's, so nothing needs reconciling."""

    class WarmMonitor(MemoryMonitor):
        def classify(self, reading) -> MemoryPressureLevel:
            return MemoryPressureLevel.WARNING

    target = tmp_path / "t"
    target.mkdir()
    pq.write_table(pa.table({"id": pa.array(range(20_000), pa.int64())}), target / "a.parquet")
    source = pa.table({"id": pa.array(range(10_000, 30_000), pa.int64())})
    monitor = WarmMonitor(max_pyarrow_mb=4096, min_system_available_mb=0, limits=fixed_limits())
    during: list[tuple[int, float | None]] = []

    def progress(done: int, total: int) -> None:
        threads = [t for t in threading.enumerate() if t.name == THREAD_NAME]
        during.append((len(threads), monitor.sampler.interval_s))

    with MemoryTracker(monitor, sampling_interval_s=0.1) as tracker:
        result = merge_dataset(
            source,
            str(target),
            key_columns=["id"],
            memory_monitor=monitor,
            merge_chunk_size_rows=2_000,
            merge_progress_callback=progress,
        )
    figures = tracker.figures
    assert result.max_pressure is MemoryPressureLevel.WARNING
    assert figures.pressure >= result.max_pressure
    assert figures.peak_rss_bytes >= int(result.peak_rss_mb * MiB)
    assert figures.peak_pyarrow_bytes >= int(result.peak_pyarrow_mb * MiB)
    assert during and {count for count, _ in during} == {1}  # the guard has no thread of its own
    # the guard's faster interval wins while it runs, the tracker's when the merge wraps up
    assert {interval for _, interval in during} <= {0.05, 0.1}
    assert min(interval for _, interval in during) == 0.05
    assert not monitor.sampler.running
    entries = md.merge_metadata(result, monitor, figures=figures)
    expected = md.memory_metadata(figures)
    assert md.STEP_RSS_MB in expected  # the tracker knows the baseline
    assert {k: entries[k] for k in expected} == expected
