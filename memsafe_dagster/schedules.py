"""Schedules for partitioned merge assets: one run per new partition, built from the asset's job.

``build_merge_schedule(warehouse_orders)`` makes a job of the merge asset and everything
upstream of it (partitioned alike) and a schedule that, after each time window closes, launches
that job for the window's partition (``build_schedule_from_partitioned_job``).
"""

from collections.abc import Mapping
from typing import Any

import dagster as dg
from dagster._core.definitions.unresolved_asset_job_definition import (
    UnresolvedAssetJobDefinition,
)


def build_merge_job(
    merge_asset: dg.AssetsDefinition,
    *,
    name: str | None = None,
    include_upstream: bool = True,
    description: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> UnresolvedAssetJobDefinition:
    """A partitioned job of ``merge_asset`` (and, by default, every asset upstream of it)."""
    partitions_def = merge_asset.partitions_def
    if partitions_def is None:
        raise ValueError(
            f"{merge_asset.key.to_user_string()} is not partitioned: build_merge_job makes "
            "partitioned jobs (use define_asset_job and a cron ScheduleDefinition instead)"
        )
    selection = dg.AssetSelection.assets(merge_asset)
    if include_upstream:
        selection = selection.upstream()
    return dg.define_asset_job(
        name or f"{merge_asset.key.path[-1]}_job",
        selection=selection,
        description=description
        or f"Materializes {merge_asset.key.to_user_string()} one partition per run.",
        tags=dict(tags) if tags else None,
    )


def build_merge_schedule(
    target: dg.AssetsDefinition | UnresolvedAssetJobDefinition | dg.JobDefinition,
    *,
    name: str | None = None,
    job_name: str | None = None,
    include_upstream: bool = True,
    minute_of_hour: int | None = None,
    hour_of_day: int | None = None,
    day_of_week: int | None = None,
    day_of_month: int | None = None,
    default_status: dg.DefaultScheduleStatus = dg.DefaultScheduleStatus.STOPPED,
    tags: Mapping[str, str] | None = None,
    **kwargs: Any,
) -> dg.ScheduleDefinition:
    """A schedule launching the merge for each new time partition, as the window closes.

    ``target`` is a time-partitioned merge asset (its job is built with ``build_merge_job``) or
    a partitioned job. ``minute_of_hour`` etc. offset the run within the window's cadence.
    """
    if isinstance(target, dg.AssetsDefinition):
        partitions_def = target.partitions_def
        job = build_merge_job(target, name=job_name, include_upstream=include_upstream)
    else:
        job = target
        partitions_def = getattr(job, "partitions_def", None)
    if partitions_def is not None and not isinstance(
        partitions_def, dg.TimeWindowPartitionsDefinition
    ):
        raise ValueError(
            f"job {job.name} is partitioned by {type(partitions_def).__name__}: a schedule from "
            "a partitioned job needs time-window partitions (daily, hourly, ...)"
        )
    return dg.build_schedule_from_partitioned_job(
        job,
        name=name or f"{job.name}_schedule",
        minute_of_hour=minute_of_hour,
        hour_of_day=hour_of_day,
        day_of_week=day_of_week,
        day_of_month=day_of_month,
        default_status=default_status,
        tags=dict(tags) if tags else None,
        **kwargs,
    )
