"""Failures that say the right thing: no useless retries, one binding budget named everywhere,
advice that fits the cause, no EMERGENCY from a sample nothing acted on, the step's increment."""

import logging

import dagster as dg
import pyarrow as pa

from memsafe_dagster import (
    ChunkedParquetIOManager,
    MemoryMonitorResource,
    build_memsafe_failure_sensor,
)
from memsafe_dagster import metadata as md
from memsafe_dagster.memory.process import current_rss_bytes
from memsafe_dagster.memory.sizes import MiB
from memsafe_dagster.sensors import DIAGNOSIS_TAG, diagnose_step_failure


def _failure(result: dg.ExecuteInProcessResult):
    [event] = result.get_step_failure_events()
    return event, event.step_failure_data.user_failure_data


def _retries(instance: dg.DagsterInstance, run_id: str) -> int:
    return len(
        [
            e
            for e in instance.all_logs(run_id)
            if e.dagster_event
            and e.dagster_event.event_type == dg.DagsterEventType.STEP_UP_FOR_RETRY
        ]
    )


@dg.asset(retry_policy=dg.RetryPolicy(max_retries=2))
def table_out() -> pa.Table:
    return pa.table({"id": list(range(5_000))})


def _run(memory: MemoryMonitorResource, tmp_path, instance):
    return dg.materialize(
        [table_out],
        instance=instance,
        resources={
            "io_manager": ChunkedParquetIOManager(
                base_path=str(tmp_path), chunk_size_rows=1_000, memory=memory
            )
        },
        raise_on_error=False,
    )


def test_a_budget_below_the_baseline_is_not_retried_and_says_what_would_fit(tmp_path) -> None:
    instance = dg.DagsterInstance.ephemeral()
    result = _run(MemoryMonitorResource(max_process_memory_mb=1), tmp_path, instance)
    assert not result.success
    assert _retries(instance, result.run_id) == 0  # halving the chunk cannot help
    event, failure = _failure(result)
    text = failure.description
    assert text.startswith(md.FAILURE_PREFIX)
    assert "process RSS" in text and "max_process_memory_mb 1" in text
    assert "before the step began, so no chunk size fits" in text
    assert "lower chunk_size_rows" not in text
    meta = {k: v.value for k, v in failure.metadata.items()}
    assert meta[md.BINDING] == "max_process_memory_mb" and meta[md.BINDING_MB] == 1
    assert meta[md.CHUNKS_HELP] is False
    fits = float(text.split("a budget of about ")[1].split(" MB")[0])
    assert fits >= meta[md.PEAK_RSS_MB] * 1.25 - 1
    # The sensor's diagnosis and its short tag name the same budget.
    diagnosis = diagnose_step_failure(event)
    assert "max_process_memory_mb 1 MB bound" in diagnosis.text
    assert "smaller chunks cannot help" in diagnosis.text
    assert "max_process_memory_mb 1 MB bound" in diagnosis.short
    assert "limit" not in diagnosis.short.split("bound")[0]  # not "of a 24105 MB limit"


def test_where_smaller_chunks_can_help_retries_keep_halving(tmp_path) -> None:
    instance = dg.DagsterInstance.ephemeral()
    result = _run(MemoryMonitorResource(min_system_available_mb=10**9), tmp_path, instance)
    assert not result.success
    assert _retries(instance, result.run_id) == 2
    _event, failure = _failure(result)
    meta = {k: v.value for k, v in failure.metadata.items()}
    assert meta[md.BINDING] == "min_system_available_mb" and meta[md.CHUNKS_HELP] is True
    assert meta[md.CHUNK_SIZE_ROWS] == 250
    assert "the container as a whole ran short" in failure.description


def test_the_sensor_tag_is_one_short_line(tmp_path) -> None:
    with dg.instance_for_test() as instance:
        result = _run(MemoryMonitorResource(max_process_memory_mb=1), tmp_path, instance)
        run = instance.get_run_by_id(result.run_id)
        failure = next(
            e.dagster_event
            for e in instance.all_logs(result.run_id)
            if e.dagster_event and e.dagster_event.event_type == dg.DagsterEventType.RUN_FAILURE
        )
        context = dg.build_run_status_sensor_context(
            sensor_name="memsafe_failure_sensor",
            dagster_instance=instance,
            dagster_run=run,
            dagster_event=failure,
        ).for_run_failure()
        build_memsafe_failure_sensor()(context)
        tag = instance.get_run_by_id(result.run_id).tags[DIAGNOSIS_TAG]
        assert "\n" not in tag and len(tag) <= 200
        assert tag.startswith("memsafe EMERGENCY in table_out: max_process_memory_mb 1 MB bound")


SPIKE_MB = 120


@dg.asset
def spiky(context: dg.AssetExecutionContext, memory: MemoryMonitorResource) -> None:
    with memory.track(context) as tracker:
        block = bytearray(SPIKE_MB * MiB)
        for i in range(0, len(block), 4096):
            block[i] = 1
        tracker.monitor.sample()  # a sample over budget that no check acts on
        del block


def test_a_momentary_emergency_sample_is_not_reported_as_an_emergency() -> None:
    budget = int(current_rss_bytes() / MiB) + SPIKE_MB // 2
    instance = dg.DagsterInstance.ephemeral()
    memory = MemoryMonitorResource(max_process_memory_mb=budget, sampling_interval_ms=0)
    assert dg.materialize([spiky], instance=instance, resources={"memory": memory}).success
    meta = {
        k: v.value
        for k, v in instance.get_latest_materialization_event(
            spiky.key
        ).asset_materialization.metadata.items()
    }
    assert meta[md.PRESSURE_WORST_SAMPLE] == "emergency"  # the sample did happen (control)
    assert meta[md.PRESSURE] == "critical"
    assert meta[md.STEP_RSS_MB] >= SPIKE_MB - 5
    assert meta[md.STEP_RSS_MB] < meta[md.PEAK_RSS_MB]
    errors = [
        e.message
        for e in instance.all_logs(instance.get_runs()[0].run_id)
        if e.level >= logging.ERROR and "EMERGENCY" in (e.message or "")
    ]
    assert errors == []
    warned = [
        e.message
        for e in instance.all_logs(instance.get_runs()[0].run_id)
        if "reached EMERGENCY, but it had passed" in (e.message or "")
    ]
    assert len(warned) == 1


@dg.asset
def merge_source() -> pa.Table:
    return pa.table({"id": list(range(20_000)), "v": list(range(20_000))})


def test_a_merge_failure_its_inner_error_and_the_diagnosis_name_one_budget(tmp_path) -> None:
    from memsafe_dagster import build_merge_asset

    merged = build_merge_asset(
        "merged",
        source=merge_source,
        target_path=str(tmp_path / "t"),
        key_columns="id",
        retry_policy=dg.RetryPolicy(max_retries=2),
    )
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize(
        [merge_source, merged],
        instance=instance,
        resources={
            "io_manager": ChunkedParquetIOManager(base_path=str(tmp_path / "io")),
            "memory": MemoryMonitorResource(max_process_memory_mb=1),
        },
        raise_on_error=False,
    )
    assert not result.success
    assert _retries(instance, result.run_id) == 0
    event, failure = _failure(result)
    meta = {k: v.value for k, v in failure.metadata.items()}
    assert "max_process_memory_mb 1" in failure.description
    assert "1 MB budget" in meta[md.DETAIL]  # the merge guard's own error
    assert meta[md.CHUNK_CONFIG] == "merge_chunk_size_rows"
    diagnosis = diagnose_step_failure(event)
    assert diagnosis.binding == "max_process_memory_mb" and diagnosis.binding_mb == 1
    assert "max_process_memory_mb 1 MB bound" in diagnosis.text
