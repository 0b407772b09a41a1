"""Helpers for tests against real Dagster instances: metadata, failures and logs read back."""

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow as pa
from memory_helpers import MiB, fixed_limits  # noqa: F401  (re-exported to Dagster-layer tests)


def plain(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """Metadata values unwrapped to Python values (TableSchema stays a TableSchema)."""
    return {k: (v.value if isinstance(v, dg.MetadataValue) else v) for k, v in metadata.items()}


def latest_metadata(
    instance: dg.DagsterInstance, asset: str | Iterable[str], partition: str | None = None
) -> dict[str, Any]:
    """Metadata of the latest materialization of ``asset`` (of one partition when given)."""
    key = dg.AssetKey(asset) if isinstance(asset, str) else dg.AssetKey(list(asset))
    if partition is None:
        event = instance.get_latest_materialization_event(key)
        assert event is not None, f"no materialization of {key.to_user_string()}"
        materialization = event.asset_materialization
    else:
        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition]), limit=1
        ).records
        assert records, f"no materialization of {key.to_user_string()} partition {partition}"
        materialization = records[0].asset_materialization
    assert materialization is not None
    return plain(materialization.metadata)


def step_failures(result: Any) -> list[dg.DagsterEvent]:
    """STEP_FAILURE events of an in-process result."""
    return [e for e in result.all_events if e.is_step_failure]


def failure_data(event: dg.DagsterEvent) -> tuple[str, dict[str, Any]]:
    """(description, plain metadata) of a step failure raised as ``dagster.Failure``."""
    user = event.step_failure_data.user_failure_data
    assert user is not None, f"step failed without a dagster.Failure: {event.step_failure_data}"
    return user.description or "", plain(user.metadata)


def run_logs(instance: dg.DagsterInstance, run_id: str) -> list[tuple[int, str]]:
    """(level, message) of every user log message of a run."""
    return [
        (entry.level, entry.user_message)
        for entry in instance.all_logs(run_id)
        if entry.dagster_event is None
    ]


def events_of_type(
    instance: dg.DagsterInstance, run_id: str, event_type: dg.DagsterEventType
) -> list[dg.DagsterEvent]:
    return [
        entry.dagster_event
        for entry in instance.all_logs(run_id, of_type=event_type)
        if entry.dagster_event is not None
    ]


def data_files(root: str | os.PathLike[str]) -> list[Path]:
    """Every Parquet file under ``root``, hidden/staging directories included."""
    return sorted(p for p in Path(root).rglob("*.parquet") if p.is_file())


def numbers(n: int, *, start: int = 0) -> pa.Table:
    """``n`` rows: ``id`` int64 and ``value`` float64 (= id / 2) and ``name`` string."""
    ids = pa.array(range(start, start + n), pa.int64())
    return pa.table(
        {
            "id": ids,
            "value": pa.array([i / 2 for i in range(start, start + n)], pa.float64()),
            "name": pa.array([f"n{i % 7}" for i in range(start, start + n)]),
        }
    )


def failure_context(instance: dg.DagsterInstance, run_id: str) -> dg.RunFailureSensorContext:
    """The context a run-failure sensor gets for the failed run ``run_id``."""
    run = instance.get_run_by_id(run_id)
    failure = next(
        e.dagster_event
        for e in instance.all_logs(run_id)
        if e.dagster_event and e.dagster_event.event_type == dg.DagsterEventType.RUN_FAILURE
    )
    return dg.build_run_status_sensor_context(
        sensor_name="memsafe_failure_sensor",
        dagster_instance=instance,
        dagster_run=run,
        dagster_event=failure,
    ).for_run_failure()
