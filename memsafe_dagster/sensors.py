"""Sensors: an inbox sensor, a memory gate for any sensor, and a run-failure sensor that explains
memory failures (memsafe's own EMERGENCY stops and the kernel's OOM kills).
"""

import functools
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import dagster as dg

from memsafe_dagster.datasets.filesystem import resolve_filesystem
from memsafe_dagster.datasets.inbox import batch_key, list_inbox
from memsafe_dagster.memory import MemoryMonitor, MemoryPressureLevel
from memsafe_dagster.merge_asset import MergeAssetSpec, merge_spec_of
from memsafe_dagster.metadata import FAILURE_PREFIX, LIMIT_MB, LIMIT_SOURCE, PEAK_RSS_MB

DIAGNOSIS_TAG = "memsafe/diagnosis"


# -- memory gate ------------------------------------------------------------------------------


def memory_gate(
    *,
    threshold: MemoryPressureLevel = MemoryPressureLevel.CRITICAL,
    monitor_factory: Callable[[], MemoryMonitor] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Wrap a sensor's evaluation function: at ``threshold`` pressure or worse the tick skips.

    Place it under ``@dg.sensor``::

        @dg.sensor(job=my_job)
        @memory_gate()
        def my_sensor(context): ...

    The skip reason names the level and the figures, so the UI's tick history says why no run
    was launched. Pressure is measured where the sensor evaluates (the code server), by default
    with ``MemoryMonitor.for_container()`` created at each tick.
    """

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def gated(*args: Any, **kwargs: Any) -> Any:
            monitor = monitor_factory() if monitor_factory else MemoryMonitor.for_container()
            level = monitor.check_memory_pressure()
            if level >= threshold:
                return dg.SkipReason(
                    f"memsafe: memory pressure {level.value.upper()}, not launching runs until "
                    f"it eases ({monitor.get_detailed_status()})"
                )
            return fn(*args, **kwargs)

        return gated

    return decorate


# -- inbox sensor -----------------------------------------------------------------------------


def build_inbox_sensor(
    *,
    name: str,
    target: dg.AssetsDefinition,
    inbox: str | None = None,
    job: Any = None,
    pattern: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
    minimum_interval_seconds: int = 30,
    memory_threshold: MemoryPressureLevel | None = MemoryPressureLevel.CRITICAL,
    default_status: dg.DefaultSensorStatus = dg.DefaultSensorStatus.STOPPED,
) -> dg.SensorDefinition:
    """One run per new batch of files in ``inbox``, deduplicated by a run key of their names,
    sizes and mtimes.

    The run's config hands ``target`` (an inbox merge asset of ``build_merge_asset``) the exact
    files of the batch, so files that land while a run is in flight go to the next batch. The
    cursor remembers the files already requested while they are still in the inbox (the merge
    moves them to ``_processed/`` after its commit). ``inbox``, ``pattern`` and
    ``storage_options`` default to the ones ``target`` was built with. Memory-gated unless
    ``memory_threshold`` is None.
    """
    built_with = _merge_spec(target)
    if inbox is None:
        if built_with is None or built_with.inbox is None:
            raise ValueError(
                f"build_inbox_sensor({name!r}): pass inbox=, or a target built by "
                "build_merge_asset with an inbox URL as its source"
            )
        inbox = built_with.inbox
    if "{" in inbox or target.partitions_def is not None:
        raise ValueError(
            f"build_inbox_sensor({name!r}): {target.key.to_user_string()} is partitioned; an "
            "inbox sensor launches unpartitioned runs (one inbox, one target)"
        )
    if pattern is None:
        pattern = built_with.inbox_pattern if built_with is not None else "*.parquet"
    if storage_options is None:
        storage_options = dict(built_with.storage_options) if built_with is not None else {}
    op_name = target.op.name
    run_target: dict[str, Any] = {"job": job} if job is not None else {"asset_selection": [target]}

    def evaluate(context: dg.SensorEvaluationContext) -> dg.SensorResult:
        fs, path = resolve_filesystem(inbox, storage_options=storage_options)
        present = list_inbox(fs, path, pattern)
        seen = _load_cursor(context.cursor)
        fresh = [f for f in present if seen.get(f.path) != [f.size, f.mtime]]
        still_there = {f.path: [f.size, f.mtime] for f in present if f.path in seen}
        if not fresh:
            # Still save the cursor: files the merge moved away are forgotten.
            return dg.SensorResult(
                skip_reason=f"no new files in {inbox} matching {pattern!r}",
                cursor=json.dumps(still_there),
            )
        key = batch_key(fresh)
        request = dg.RunRequest(
            run_key=f"inbox-{key}",
            run_config={"ops": {op_name: {"config": {"files": [f.path for f in fresh]}}}},
            tags={"memsafe/inbox_batch": key, "memsafe/inbox_files": str(len(fresh))},
        )
        still_there.update({f.path: [f.size, f.mtime] for f in fresh})
        return dg.SensorResult(run_requests=[request], cursor=json.dumps(still_there))

    evaluate.__name__ = name
    if memory_threshold is not None:
        evaluate = memory_gate(threshold=memory_threshold)(evaluate)
    return dg.SensorDefinition(
        name=name,
        evaluation_fn=evaluate,
        minimum_interval_seconds=minimum_interval_seconds,
        description=(
            f"Merges new Parquet files from {inbox} ({pattern}) into {target.key.to_user_string()}."
        ),
        default_status=default_status,
        **run_target,
    )


def _merge_spec(target: dg.AssetsDefinition) -> MergeAssetSpec | None:
    """The spec of a merge asset; None for any other asset (which then needs ``inbox=``)."""
    try:
        return merge_spec_of(target)
    except TypeError:
        return None


def _load_cursor(cursor: str | None) -> dict[str, list[float]]:
    if not cursor:
        return {}
    try:
        loaded = json.loads(cursor)
    except ValueError:
        return {}
    return loaded if isinstance(loaded, dict) else {}


# -- failure diagnosis ------------------------------------------------------------------------


@dataclass(frozen=True)
class FailureDiagnosis:
    """Why a step died of memory, and what to change."""

    step_key: str | None
    kind: str  # "memsafe-emergency" or "oom-killed"
    text: str
    peak_rss_mb: float | None = None
    limit_mb: float | None = None
    limit_source: str | None = None


_KILL_PATTERN = re.compile(r"signal 9\b|SIGKILL|exit code (?:-9|137)\b|OOMKilled")


def diagnose_step_failure(event: dg.DagsterEvent) -> FailureDiagnosis | None:
    """A diagnosis for a step failure caused by memory, else None."""
    data = event.step_failure_data
    if data is None:
        return None
    user = data.user_failure_data
    if user is not None and (user.description or "").startswith(FAILURE_PREFIX):
        meta = {k: getattr(v, "value", v) for k, v in (user.metadata or {}).items()}
        peak = _float(meta.get(PEAK_RSS_MB))
        limit = _float(meta.get(LIMIT_MB))
        source = meta.get(LIMIT_SOURCE)
        figures = (
            f"peak RSS {peak:.0f} MB of a {limit:.0f} MB limit ({source})"
            if peak is not None and limit is not None
            else "figures unavailable"
        )
        return FailureDiagnosis(
            step_key=event.step_key,
            kind="memsafe-emergency",
            text=(
                f"memsafe stopped step {event.step_key} cleanly before the kernel would have "
                f"killed it: {figures}. Lower chunk_size_rows / merge_chunk_size_rows, read fewer "
                "columns, or raise the memory limit (on Kubernetes: the pod's "
                "resources.limits.memory); the data was left untouched."
            ),
            peak_rss_mb=peak,
            limit_mb=limit,
            limit_source=str(source) if source is not None else None,
        )
    error = data.error
    if error is not None and (
        error.cls_name == "ChildProcessCrashException" or _KILL_PATTERN.search(error.message or "")
    ):
        return FailureDiagnosis(
            step_key=event.step_key,
            kind="oom-killed",
            text=(
                f"step {event.step_key} was killed by the operating system (SIGKILL, usually the "
                "OOM killer): it outgrew its memory limit without warning. Stream it with "
                "ChunkedParquetIOManager / ChunkStream or build_merge_asset so memsafe can stop "
                "it cleanly and record its peaks; `memsafe status` shows the limit that applies."
            ),
        )
    return None


def build_memsafe_failure_sensor(
    name: str = "memsafe_failure_sensor",
    *,
    monitored_jobs: list[Any] | None = None,
    monitor_all_code_locations: bool = False,
    default_status: dg.DefaultSensorStatus = dg.DefaultSensorStatus.RUNNING,
) -> dg.SensorDefinition:
    """A run-failure sensor that recognises memory failures, logs a short diagnosis and tags
    the failed run with it (``memsafe/diagnosis``, visible in the UI's run list)."""

    @dg.run_failure_sensor(
        name=name,
        monitored_jobs=monitored_jobs,
        monitor_all_code_locations=monitor_all_code_locations,
        default_status=default_status,
        description="Explains runs that failed for lack of memory and tags them.",
    )
    def memsafe_failure_sensor(context: dg.RunFailureSensorContext) -> None:
        diagnoses = [d for d in map(diagnose_step_failure, context.get_step_failure_events()) if d]
        if not diagnoses:
            return
        for diagnosis in diagnoses:
            context.log.warning(diagnosis.text)
        context.instance.add_run_tags(
            context.dagster_run.run_id, {DIAGNOSIS_TAG: diagnoses[0].text[:1000]}
        )

    return memsafe_failure_sensor


def _float(value: object) -> float | None:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
