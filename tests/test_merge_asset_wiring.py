"""Merge assets wired to the inbox sensor, the failure sensor and a schedule from their
partitioned job, evaluated and run against real instances.

No ``from __future__ import annotations`` here: this module defines assets.
"""

import datetime as dt
import time
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from dagster_helpers import failure_context

from memsafe_dagster import build_merge_asset
from memsafe_dagster.datasets import ChunkStream
from memsafe_dagster.io_managers import ChunkedParquetIOManager
from memsafe_dagster.merge_asset import inbox_storage_options
from memsafe_dagster.resources import MemoryMonitorResource
from memsafe_dagster.schedules import build_merge_job, build_merge_schedule
from memsafe_dagster.sensors import (
    DIAGNOSIS_TAG,
    build_inbox_sensor,
    build_memsafe_failure_sensor,
    diagnose_step_failure,
)


def resources(tmp_path: Path, **memory: object) -> dict[str, object]:
    return {
        "io_manager": ChunkedParquetIOManager(base_path=str(tmp_path / "io")),
        "memory": MemoryMonitorResource(**memory),
    }


def drop(inbox: Path, name: str, ids: range) -> Path:
    inbox.mkdir(parents=True, exist_ok=True)
    table = pa.table({"id": pa.array(ids, pa.int64()), "v": pa.array([name] * len(ids))})
    pq.write_table(table, inbox / name)
    return inbox / name


def test_the_inbox_sensor_reads_its_inbox_from_the_merge_asset_and_feeds_it(
    tmp_path: Path,
) -> None:
    inbox, target = tmp_path / "inbox", tmp_path / "customers"
    merged = build_merge_asset(
        "customers", source=str(inbox), target_path=str(target), key_columns="id"
    )
    sensor = build_inbox_sensor(name="customers_inbox", target=merged)
    defs = dg.Definitions(assets=[merged], sensors=[sensor], resources=resources(tmp_path))
    with dg.instance_for_test() as instance:

        def tick(cursor: str | None) -> dg.SensorResult:
            # As a context manager: a context left open re-enters the instance when collected.
            with dg.build_sensor_context(
                instance=instance, cursor=cursor, definitions=defs
            ) as context:
                return sensor.evaluate_tick(context)

        first_file = drop(inbox, "a.parquet", range(0, 10))
        first = tick(None)
        [request] = first.run_requests
        assert request.run_config == {
            "ops": {"customers": {"config": {"files": [str(first_file)]}}}
        }
        # While that run is in flight, a second file lands: it waits for the next batch.
        time.sleep(0.01)
        second_file = drop(inbox, "b.parquet", range(5, 15))
        result = dg.materialize(
            [merged],
            resources=resources(tmp_path),
            instance=instance,
            run_config=request.run_config,
            tags=request.tags,
        )
        assert result.success
        assert ds.dataset(str(target)).to_table().num_rows == 10
        assert not first_file.exists() and second_file.exists()

        second = tick(first.cursor)
        [request2] = second.run_requests
        assert request2.run_config["ops"]["customers"]["config"]["files"] == [str(second_file)]
        assert dg.materialize(
            [merged],
            resources=resources(tmp_path),
            instance=instance,
            run_config=request2.run_config,
        ).success
        table = ds.dataset(str(target)).to_table()
        assert sorted(table["id"].to_pylist()) == list(range(15))
        assert table.num_rows == 15

        done = tick(second.cursor)
        assert done.run_requests == [] and done.cursor in (None, "{}")


def test_inbox_sensor_needs_an_inbox_and_an_unpartitioned_target(tmp_path: Path) -> None:
    @dg.asset
    def not_a_merge() -> None:
        return None

    with pytest.raises(ValueError, match="pass inbox="):
        build_inbox_sensor(name="s", target=not_a_merge)
    days = dg.DailyPartitionsDefinition(start_date="2024-01-01")
    partitioned = build_merge_asset(
        "p",
        source=str(tmp_path / "in" / "{partition_key}"),
        target_path=str(tmp_path / "t"),
        key_columns="id",
        partitions_def=days,
    )
    with pytest.raises(ValueError, match="is partitioned"):
        build_inbox_sensor(name="s", target=partitioned)


def test_storage_options_stay_out_of_the_metadata() -> None:
    merged = build_merge_asset(
        "remote",
        source="memory://inbox-options",
        target_path="memory://target-options",
        key_columns="id",
        storage_options={"skip_instance_cache": True},
    )
    assert inbox_storage_options(merged) == {"skip_instance_cache": True}
    metadata = merged.specs_by_key[merged.key].metadata
    assert "skip_instance_cache" not in repr(metadata)


def test_the_failure_sensor_explains_a_merge_stopped_at_emergency(tmp_path: Path) -> None:
    drop(tmp_path / "inbox", "a.parquet", range(3))
    merged = build_merge_asset(
        "doomed", source=str(tmp_path / "inbox"), target_path=str(tmp_path / "t"), key_columns="id"
    )
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [merged],
            resources=resources(tmp_path, max_process_memory_mb=1),
            instance=instance,
            raise_on_error=False,
        )
        assert not result.success
        context = failure_context(instance, result.run_id)
        [event] = context.get_step_failure_events()
        diagnosis = diagnose_step_failure(event)
        assert diagnosis is not None and diagnosis.kind == "memsafe-emergency"
        assert diagnosis.peak_rss_mb > 20 and diagnosis.limit_mb > diagnosis.peak_rss_mb
        build_memsafe_failure_sensor()(context)
        tag = instance.get_run_by_id(result.run_id).tags[DIAGNOSIS_TAG]
        # The short tag names the budget that bound (the full advice is in the sensor's log).
        assert tag.startswith("memsafe EMERGENCY in doomed: max_process_memory_mb 1 MB bound")
    assert (tmp_path / "inbox" / "a.parquet").exists() and not (tmp_path / "t").exists()


# -- a schedule from the partitioned merge job -----------------------------------------------------

DAYS = dg.DailyPartitionsDefinition(start_date="2024-01-01", end_date="2024-01-10")


@dg.asset(partitions_def=DAYS)
def day_rows(context: dg.AssetExecutionContext) -> ChunkStream:
    day = DAYS.get_partition_keys().index(context.partition_key)
    table = pa.table({"id": pa.array(range(day * 10, day * 10 + 15), pa.int64())})
    return ChunkStream.from_batches(table.to_batches(4))


def test_a_schedule_from_the_partitioned_merge_job_merges_the_window_that_closed(
    tmp_path: Path,
) -> None:
    merged = build_merge_asset(
        "all_days", source=day_rows, target_path=str(tmp_path / "wh"), key_columns="id"
    )
    schedule = build_merge_schedule(
        merged, hour_of_day=1, default_status=dg.DefaultScheduleStatus.RUNNING
    )
    assert schedule.name == "all_days_job_schedule"
    defs = dg.Definitions(
        assets=[day_rows, merged], schedules=[schedule], resources=resources(tmp_path)
    )
    job = defs.resolve_job_def("all_days_job")
    assert {k.to_user_string() for k in job.asset_layer.executable_asset_keys} == {
        "day_rows",
        "all_days",
    }
    resolved = defs.resolve_schedule_def("all_days_job_schedule")
    assert resolved.cron_schedule == "0 1 * * *"
    with dg.instance_for_test() as instance:
        with dg.build_schedule_context(
            instance=instance,
            scheduled_execution_time=dt.datetime(2024, 1, 3, 1, 0, tzinfo=dt.timezone.utc),
        ) as context:
            [request] = resolved.evaluate_tick(context).run_requests
        assert request.partition_key == "2024-01-02"
        result = job.execute_in_process(instance=instance, partition_key=request.partition_key)
        assert result.success
        assert sorted(ds.dataset(str(tmp_path / "wh")).to_table()["id"].to_pylist()) == list(
            range(10, 25)
        )


def test_schedules_need_time_partitions(tmp_path: Path) -> None:
    unpartitioned = build_merge_asset(
        "flat", source=str(tmp_path / "in"), target_path=str(tmp_path / "t"), key_columns="id"
    )
    with pytest.raises(ValueError, match="is not partitioned"):
        build_merge_job(unpartitioned)
    regions = dg.StaticPartitionsDefinition(["eu", "us"])
    by_region = build_merge_asset(
        "regional",
        source=str(tmp_path / "in" / "{partition_key}"),
        target_path=str(tmp_path / "t" / "{partition_key}"),
        key_columns="id",
        partitions_def=regions,
    )
    with pytest.raises(ValueError, match="needs time-window partitions"):
        build_merge_schedule(by_region)
