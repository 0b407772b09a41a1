"""The merge asset's two asset checks, evaluated by the step after each merge.

``unique_keys`` (ERROR): every key occurs once in the target, counted by ``verify_unique_keys``
in a bounded budget under the step's monitor. ``memory_headroom`` (WARN): the step's peak left
enough room below the limit for the next run not to reach EMERGENCY.
"""

import dagster as dg
import fsspec

from memsafe_dagster import metadata as md
from memsafe_dagster.datasets.merge import MergeResult
from memsafe_dagster.datasets.unique import UniqueKeysReport, verify_unique_keys
from memsafe_dagster.memory import MemoryMonitor, MemoryPressureError, MemoryPressureLevel
from memsafe_dagster.merge_asset.spec import MergeAssetSpec

UNIQUE_KEYS = "unique_keys"
MEMORY_HEADROOM = "memory_headroom"

WARNING_RATIO = 0.7  # the monitor's WARNING ratio: memory_headroom's default threshold
MIN_CHECK_BUDGET_MB = 16.0
CHECK_BUDGET_SHARE = 0.25  # of the PyArrow budget, when check_memory_mb is not given


def unique_keys_report(
    spec: MergeAssetSpec, fs: fsspec.AbstractFileSystem, target: str, monitor: MemoryMonitor
) -> UniqueKeysReport | MemoryPressureError:
    """Count the target's keys; EMERGENCY on ``monitor`` stops the count (returned, not raised:
    the merge has committed, so the step reports the check as not verified)."""
    budget_mb = spec.check_memory_mb or max(
        MIN_CHECK_BUDGET_MB, CHECK_BUDGET_SHARE * float(monitor.max_pyarrow_mb)
    )

    def pressure() -> None:
        reading, level = monitor.sample()
        if level is MemoryPressureLevel.EMERGENCY:
            raise MemoryPressureError(
                "memory pressure EMERGENCY during the unique_keys check",
                level,
                monitor.status_of(reading, level),
            )

    try:
        return verify_unique_keys(
            target,
            spec.key_columns,
            filesystem=fs,
            memory_budget_mb=budget_mb,
            on_chunk=pressure,
        )
    except MemoryPressureError as exc:
        return exc


def unique_keys_check(
    spec: MergeAssetSpec, report: UniqueKeysReport | BaseException, result: MergeResult
) -> dg.AssetCheckResult:
    """The ``unique_keys`` result: ERROR on a repeated or null key, WARN when not verified."""
    if not isinstance(report, UniqueKeysReport):
        return dg.AssetCheckResult(
            check_name=UNIQUE_KEYS,
            passed=False,
            severity=dg.AssetCheckSeverity.WARN,
            description=f"not verified: {report}",
        )
    meta = {
        "rows": dg.MetadataValue.int(report.rows),
        "duplicate_keys": dg.MetadataValue.int(report.duplicate_keys),
        "duplicate_rows": dg.MetadataValue.int(report.duplicate_rows),
        "null_key_rows": dg.MetadataValue.int(report.null_key_rows),
        "buckets": dg.MetadataValue.int(report.buckets),
        "duration_s": dg.MetadataValue.float(round(report.duration_s, 3)),
    }
    if report.examples:
        meta["examples"] = dg.MetadataValue.json(report.examples)
    keys = ", ".join(spec.key_columns)
    if report.passed:
        description = f"{report.rows} rows, every key ({keys}) once"
    else:
        description = (
            f"{report.duplicate_keys} key(s) ({keys}) occur more than once "
            f"({report.duplicate_rows} rows), {report.null_key_rows} row(s) with a null key"
        )
    if report.rows != result.target_count_after:
        description += f"; the target holds {report.rows} rows, the merge reported " + str(
            result.target_count_after
        )
    return dg.AssetCheckResult(
        check_name=UNIQUE_KEYS,
        passed=report.passed,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata=meta,
        description=description,
    )


def headroom_check(
    spec: MergeAssetSpec, figures: md.MemoryFigures, monitor: MemoryMonitor
) -> dg.AssetCheckResult:
    """The ``memory_headroom`` result: WARN when the peak left less than the threshold below
    the limit, or pressure reached WARNING."""
    budget_mb = float(monitor.max_process_memory_mb or figures.limit_mb)
    threshold = (
        spec.min_headroom_mb
        if spec.min_headroom_mb is not None
        else max(0.0, figures.limit_mb - WARNING_RATIO * budget_mb)
    )
    headroom = figures.headroom_mb
    calm = figures.pressure < MemoryPressureLevel.WARNING
    passed = headroom >= threshold and calm
    # Said as the level the peak must stay under, not as free memory "needed".
    level_mb = figures.limit_mb - threshold
    if spec.min_headroom_mb is not None:
        level = f"{level_mb:.0f} MB ({threshold:.0f} MB below the {figures.limit_mb:.0f} MB limit)"
    else:
        level = (
            f"WARNING level {level_mb:.0f} MB "
            f"({WARNING_RATIO * 100:.0f} % of the {budget_mb:.0f} MB budget)"
        )
    description = (
        f"peak {figures.peak_rss_mb:.0f} MB, {level}; "
        f"limit {figures.limit_mb:.0f} MB ({figures.limit_source}); "
        f"worst pressure {figures.pressure.value}"
    )
    if not passed:
        description += (
            ". Next time this may hit EMERGENCY: lower merge_chunk_size_rows or raise the limit"
        )
    return dg.AssetCheckResult(
        check_name=MEMORY_HEADROOM,
        passed=passed,
        severity=dg.AssetCheckSeverity.WARN,
        description=description,
        metadata={
            md.HEADROOM_MB: dg.MetadataValue.float(round(headroom, 2)),
            "memsafe/min_headroom_mb": dg.MetadataValue.float(round(threshold, 2)),
            md.PEAK_RSS_MB: dg.MetadataValue.float(round(figures.peak_rss_mb, 2)),
            md.LIMIT_MB: dg.MetadataValue.float(round(figures.limit_mb, 2)),
            md.PRESSURE: dg.MetadataValue.text(figures.pressure.value),
        },
    )
