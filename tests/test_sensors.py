"""Sensors against a real Dagster instance: memory gate, inbox batches, failure diagnoses."""

import time
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from dagster_helpers import failure_context

from memsafe_dagster.memory import MemoryMonitor, MemoryPressureLevel
from memsafe_dagster.sensors import (
    DIAGNOSIS_TAG,
    build_inbox_sensor,
    build_memsafe_failure_sensor,
    diagnose_step_failure,
    memory_gate,
)


class InboxBatch(dg.Config):
    files: list[str] = []


@dg.asset
def inbox_consumer(config: InboxBatch) -> None:
    """A stand-in for an inbox merge asset: takes the batch's files as config."""


# -- memory gate ------------------------------------------------------------------------------


def starved_monitor() -> MemoryMonitor:
    return MemoryMonitor(max_process_memory_mb=1)


def test_gate_skips_with_the_reason_under_pressure() -> None:
    calls = []

    @dg.sensor(target=[inbox_consumer])
    @memory_gate(monitor_factory=starved_monitor)
    def gated(context: dg.SensorEvaluationContext) -> dg.RunRequest:
        calls.append(context)
        return dg.RunRequest(run_key="x")

    with dg.instance_for_test() as instance, dg.build_sensor_context(instance=instance) as context:
        result = gated.evaluate_tick(context)
    assert calls == []
    assert result.run_requests == []
    assert result.skip_message.startswith("memsafe: memory pressure EMERGENCY")
    assert "rss=" in result.skip_message and "limit=" in result.skip_message


def test_gate_passes_through_when_calm_for_plain_and_generator_sensors() -> None:
    @dg.sensor(target=[inbox_consumer])
    @memory_gate()
    def plain(context: dg.SensorEvaluationContext) -> dg.RunRequest:
        return dg.RunRequest(run_key="plain")

    @dg.sensor(target=[inbox_consumer])
    @memory_gate(threshold=MemoryPressureLevel.EMERGENCY)
    def generator(context: dg.SensorEvaluationContext):
        yield dg.RunRequest(run_key="gen-1")
        yield dg.RunRequest(run_key="gen-2")

    with dg.instance_for_test() as instance, dg.build_sensor_context(instance=instance) as ctx:
        assert [r.run_key for r in plain.evaluate_tick(ctx).run_requests] == ["plain"]
        assert [r.run_key for r in generator.evaluate_tick(ctx).run_requests] == [
            "gen-1",
            "gen-2",
        ]


# -- inbox sensor -----------------------------------------------------------------------------


def sensor_defs(sensor: dg.SensorDefinition) -> dg.Definitions:
    return dg.Definitions(assets=[inbox_consumer], sensors=[sensor])


def drop(inbox: Path, name: str, rows: int) -> Path:
    inbox.mkdir(parents=True, exist_ok=True)
    path = inbox / name
    pq.write_table(pa.table({"id": list(range(rows))}), path)
    return path


def test_inbox_sensor_requests_each_new_batch_once(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    sensor = build_inbox_sensor(name="orders_inbox", inbox=str(inbox), target=inbox_consumer)
    with dg.instance_for_test() as instance:

        def tick(cursor: str | None) -> dg.SensorResult:
            with dg.build_sensor_context(
                instance=instance, cursor=cursor, definitions=sensor_defs(sensor)
            ) as context:
                return sensor.evaluate_tick(context)

        empty = tick(None)
        assert empty.run_requests == [] and "no new files" in empty.skip_message

        a, b = drop(inbox, "a.parquet", 3), drop(inbox, "b.parquet", 4)
        (inbox / "notes.txt").write_text("not parquet")
        first = tick(None)
        [request] = first.run_requests
        assert request.run_key.startswith("inbox-")
        files = request.run_config["ops"]["inbox_consumer"]["config"]["files"]
        assert sorted(files) == [str(a), str(b)]
        assert request.tags["memsafe/inbox_files"] == "2"

        # Same files, same cursor: nothing new. A fresh evaluation without the cursor would
        # produce the same run key, which Dagster deduplicates.
        assert tick(first.cursor).run_requests == []
        assert tick(None).run_requests[0].run_key == request.run_key

        c = drop(inbox, "c.parquet", 1)
        second = tick(first.cursor)
        [request2] = second.run_requests
        assert request2.run_config["ops"]["inbox_consumer"]["config"]["files"] == [str(c)]
        assert request2.run_key != request.run_key

        # A file rewritten under the same name is a new file.
        time.sleep(0.01)
        drop(inbox, "a.parquet", 30)
        third = tick(second.cursor)
        assert third.run_requests[0].run_config["ops"]["inbox_consumer"]["config"]["files"] == [
            str(a)
        ]

        # Processed files leave the inbox: the cursor forgets them.
        for f in (a, b, c):
            f.unlink()
        final = tick(third.cursor)
        assert final.run_requests == [] and final.cursor in (None, "{}")


def test_inbox_sensor_skips_hidden_and_processed_files(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    drop(inbox / "_processed" / "k", "old.parquet", 2)
    drop(inbox, ".uploading.parquet", 2)
    sensor = build_inbox_sensor(name="s", inbox=str(inbox), target=inbox_consumer)
    with (
        dg.instance_for_test() as instance,
        dg.build_sensor_context(instance=instance, definitions=sensor_defs(sensor)) as context,
    ):
        result = sensor.evaluate_tick(context)
    assert result.run_requests == []


def test_inbox_sensor_is_memory_gated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    drop(tmp_path, "a.parquet", 2)
    monkeypatch.setattr(MemoryMonitor, "for_container", staticmethod(starved_monitor))
    sensor = build_inbox_sensor(name="s", inbox=str(tmp_path), target=inbox_consumer)
    with (
        dg.instance_for_test() as instance,
        dg.build_sensor_context(instance=instance, definitions=sensor_defs(sensor)) as context,
    ):
        result = sensor.evaluate_tick(context)
    assert result.run_requests == []
    assert result.skip_message.startswith("memsafe: memory pressure")


# -- failure diagnosis ------------------------------------------------------------------------


@dg.asset
def stopped_by_memsafe() -> None:
    raise dg.Failure(
        description="memsafe: memory pressure EMERGENCY in stage 'write' (peak 410 MB, limit 512)",
        metadata={
            "memsafe/pressure": "emergency",
            "memsafe/peak_rss_mb": 410.5,
            "memsafe/limit_mb": 512.0,
            "memsafe/limit_source": "cgroup-v2",
        },
    )


@dg.asset
def ordinary_bug() -> None:
    raise KeyError("not a memory problem")


def test_memsafe_failure_is_diagnosed_and_the_run_tagged() -> None:
    sensor = build_memsafe_failure_sensor()
    with dg.instance_for_test() as instance:
        result = dg.materialize([stopped_by_memsafe], instance=instance, raise_on_error=False)
        assert not result.success
        with failure_context(instance, result.run_id) as context:
            [event] = context.get_step_failure_events()
            diagnosis = diagnose_step_failure(event)
            assert diagnosis.kind == "memsafe-emergency"
            assert (diagnosis.peak_rss_mb, diagnosis.limit_mb) == (410.5, 512.0)
            assert "peak RSS 410 MB of a 512 MB limit (cgroup-v2)" in diagnosis.text
            sensor(context)
            tags = instance.get_run_by_id(result.run_id).tags
            # The tag is one short line (the UI cuts long tags); the detail is in the log.
            assert tags[DIAGNOSIS_TAG].startswith("memsafe EMERGENCY in stopped_by_memsafe: ")
            assert "peak RSS 410 MB" in tags[DIAGNOSIS_TAG] and len(tags[DIAGNOSIS_TAG]) <= 200


def test_a_kernel_kill_of_a_step_process_is_diagnosed() -> None:
    """A real SIGKILL of the step's own process under the multiprocess executor."""
    with dg.instance_for_test() as instance:
        job = dg.build_reconstructable_job("tests.dagster_defs_killed", "killed_job")
        result = dg.execute_job(job, instance=instance, raise_on_error=False)
        assert not result.success
        with failure_context(instance, result.run_id) as context:
            [event] = context.get_step_failure_events()
            diagnosis = diagnose_step_failure(event)
            assert diagnosis is not None and diagnosis.kind == "oom-killed"
            assert "SIGKILL" in diagnosis.text
            build_memsafe_failure_sensor()(context)
            assert (
                "OOM-killed: step killed_by_the_kernel"
                in instance.get_run_by_id(result.run_id).tags[DIAGNOSIS_TAG]
            )


def test_other_failures_get_no_diagnosis() -> None:
    with dg.instance_for_test() as instance:
        result = dg.materialize([ordinary_bug], instance=instance, raise_on_error=False)
        with failure_context(instance, result.run_id) as context:
            assert [diagnose_step_failure(e) for e in context.get_step_failure_events()] == [None]
            build_memsafe_failure_sensor()(context)
            assert DIAGNOSIS_TAG not in instance.get_run_by_id(result.run_id).tags
