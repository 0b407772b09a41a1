"""A partitioned merge asset's checks are recorded for the run's partition, once.

Without ``partitions_def`` on its ``AssetCheckSpec``s, Dagster plans each check for the run's
partition but records the evaluation for no partition: the planned record never resolves and
the UI's check history shows a "Skipped" record for every run. Read from a real instance.

No ``from __future__ import annotations`` here: this module defines assets.
"""

from pathlib import Path

import dagster as dg
import pyarrow as pa
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus

from memsafe_dagster import build_merge_asset
from memsafe_dagster.datasets import ChunkStream
from memsafe_dagster.io_managers import ChunkedParquetIOManager
from memsafe_dagster.merge_asset import MEMORY_HEADROOM, UNIQUE_KEYS
from memsafe_dagster.resources import MemoryMonitorResource

DAYS = dg.DailyPartitionsDefinition(start_date="2024-01-01", end_date="2024-01-05")

SUCCEEDED = AssetCheckExecutionRecordStatus.SUCCEEDED


@dg.asset(partitions_def=DAYS)
def daily_rows(context: dg.AssetExecutionContext) -> ChunkStream:
    day = DAYS.get_partition_keys().index(context.partition_key)
    table = pa.table({"id": pa.array(range(day * 10, day * 10 + 12), pa.int64())})
    return ChunkStream.from_batches(table.to_batches(5))


def check_records(instance: dg.DagsterInstance, asset: dg.AssetKey, name: str) -> list:
    history = instance.event_log_storage.get_asset_check_execution_history(
        dg.AssetCheckKey(asset, name), limit=20
    )
    return sorted((r.partition or "", r.status.value) for r in history)


def test_every_check_record_of_a_partitioned_merge_is_its_partitions_result(
    tmp_path: Path,
) -> None:
    merged = build_merge_asset(
        "merged_days", source=daily_rows, target_path=str(tmp_path / "wh"), key_columns="id"
    )
    assert all(spec.partitions_def == DAYS for spec in merged.check_specs)
    defs = dg.Definitions(
        assets=[daily_rows, merged],
        resources={
            "io_manager": ChunkedParquetIOManager(base_path=str(tmp_path / "io")),
            "memory": MemoryMonitorResource(),
        },
    )
    job = defs.resolve_implicit_global_asset_job_def()
    with dg.instance_for_test() as instance:
        for day in ("2024-01-02", "2024-01-03", "2024-01-02"):
            assert job.execute_in_process(instance=instance, partition_key=day).success
        for name in (UNIQUE_KEYS, MEMORY_HEADROOM):
            records = check_records(instance, merged.key, name)
            # Three runs, three evaluations, each for its run's partition; no planned record
            # left unresolved (what the UI shows as "Skipped").
            assert records == [
                ("2024-01-02", SUCCEEDED.value),
                ("2024-01-02", SUCCEEDED.value),
                ("2024-01-03", SUCCEEDED.value),
            ], records


def test_an_unpartitioned_merge_keeps_unpartitioned_checks(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    merged = build_merge_asset(
        "merged_inbox", source=str(inbox), target_path=str(tmp_path / "t"), key_columns="id"
    )
    assert [s.partitions_def for s in merged.check_specs] == [None, None]
