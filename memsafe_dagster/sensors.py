"""Sensors: an inbox sensor, a memory gate for any sensor, and a run-failure sensor that explains
memory failures (memsafe's own EMERGENCY stops and the kernel's OOM kills).
"""

import copy
import functools
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import dagster as dg

from memsafe_dagster import k8s
from memsafe_dagster import metadata as md
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
    ``storage_options`` default to the ones ``target`` was built with (``dg.EnvVar`` values are
    read at every tick). Memory-gated unless ``memory_threshold`` is None.
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

RELAUNCH_OF_TAG = "memsafe/relaunch_of"
RELAUNCH_ROOT_TAG = "memsafe/relaunch_root"
RELAUNCH_ATTEMPT_TAG = "memsafe/relaunch_attempt"
RELAUNCH_CAUSE_TAG = "memsafe/relaunch_cause"
RELAUNCH_KEY_TAG = "memsafe/relaunch_key"
#: Tags of the failed run a relaunch does not copy (Dagster's own, and the diagnosis).
_NOT_COPIED = ("dagster/", DIAGNOSIS_TAG, ".dagster/")


@dataclass(frozen=True)
class FailureDiagnosis:
    """Why a step died of memory, and what to change.

    ``text`` is the full explanation (logged); ``short`` the one line for the
    ``memsafe/diagnosis`` tag. ``binding`` names the budget that bound (a
    ``MemoryMonitorResource`` field, or ``"limit"`` for the kernel's), as the Failure did.
    """

    step_key: str | None
    kind: str  # "memsafe-emergency" or "oom-killed"
    text: str
    peak_rss_mb: float | None = None
    limit_mb: float | None = None
    limit_source: str | None = None
    short: str = ""
    binding: str | None = None
    binding_mb: float | None = None
    chunks_help: bool = True
    chunk_size_rows: int | None = None
    chunk_config: str | None = None


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
        binding = meta.get(md.BINDING)
        binding_mb = _float(meta.get(md.BINDING_MB))
        helps = bool(meta.get(md.CHUNKS_HELP, True))
        limit_text = f"{limit:.0f} MB limit ({source})" if limit is not None else "limit unknown"
        peak_text = f"peak RSS {peak:.0f} MB" if peak is not None else "peak unknown"
        if binding and binding_mb is not None:
            bound = f"{binding} {binding_mb:g} MB bound"
            figures = f"{bound} ({peak_text}; the container's {limit_text})"
            short = f"memsafe EMERGENCY in {event.step_key}: {bound}, {peak_text}"
        else:
            figures = f"{peak_text} of a {limit_text}"
            short = f"memsafe EMERGENCY in {event.step_key}: {peak_text} of {limit_text}"
        if binding in ("max_process_memory_mb", "max_pyarrow_mb"):
            fix = (
                f"raise {binding} of the memory resource (run config resources.<key>.config."
                f"{binding}), or give the container more memory"
            )
        else:
            fix = "give the container more memory (on Kubernetes: resources.limits.memory)"
        fix += (
            "; lower chunk_size_rows / merge_chunk_size_rows"
            if helps
            else "; smaller chunks cannot help: the process held the budget before the step"
        )
        return FailureDiagnosis(
            step_key=event.step_key,
            kind="memsafe-emergency",
            text=(
                f"memsafe stopped step {event.step_key} cleanly before the kernel would have "
                f"killed it: {figures}. To fix: {fix}. The data was left untouched."
            ),
            peak_rss_mb=peak,
            limit_mb=limit,
            limit_source=str(source) if source is not None else None,
            short=short[:200],
            binding=str(binding) if binding else None,
            binding_mb=binding_mb,
            chunks_help=helps,
            chunk_size_rows=_int(meta.get(md.CHUNK_SIZE_ROWS)),
            chunk_config=str(meta[md.CHUNK_CONFIG]) if meta.get(md.CHUNK_CONFIG) else None,
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
            short=f"OOM-killed: step {event.step_key} (SIGKILL at the container's limit)",
            binding="limit",
        )
    return None


def plan_relaunch(
    run: dg.DagsterRun,
    diagnosis: FailureDiagnosis,
    *,
    max_relaunches: int = 2,
    memory_factor: float = 1.5,
    memory_resource_key: str = "memory",
) -> tuple[dg.RunRequest | None, str]:
    """The run request that retries ``run`` with more memory, or None and why not.

    The new run has the failed run's job, asset selection and partition; its
    ``dagster-k8s/config`` memory limit is ``memory_factor`` times the failed run's (from its
    tags, else the limit the step failed under); when a memsafe budget bound, run config raises
    that budget to ``memory_factor`` times the larger of the budget and the peak; when the
    diagnosis says smaller chunks help and the step names its chunk field, the chunk is halved.
    Its run key is ``memsafe-relaunch-<original run>-<attempt>``.
    """
    root = run.tags.get(RELAUNCH_ROOT_TAG, run.run_id)
    attempt = int(run.tags.get(RELAUNCH_ATTEMPT_TAG, "0")) + 1
    if attempt > max_relaunches:
        return None, (
            f"not relaunching: run {root} was already relaunched {attempt - 1} time(s) "
            f"(max_relaunches={max_relaunches})"
        )
    current = k8s.memory_limit_mb(run.tags)
    if current is None:
        current = diagnosis.limit_mb
    if current is None:
        return None, (
            "not relaunching: the limit the step died under is unknown (no dagster-k8s/config "
            "memory limit on the run and no memsafe figures)"
        )
    new_limit = math.ceil(current * memory_factor)
    tags = {k: v for k, v in run.tags.items() if not k.startswith(_NOT_COPIED)}
    tags = k8s.with_memory(tags, request_mb=None, limit_mb=new_limit)
    run_key = f"memsafe-relaunch-{root}-{attempt}"
    tags.update(
        {
            RELAUNCH_OF_TAG: run.run_id,
            RELAUNCH_ROOT_TAG: root,
            RELAUNCH_ATTEMPT_TAG: str(attempt),
            RELAUNCH_CAUSE_TAG: diagnosis.short or diagnosis.kind,
            RELAUNCH_KEY_TAG: run_key,
        }
    )
    run_config = copy.deepcopy(dict(run.run_config or {}))
    changes = [f"memory limit {current:.0f} -> {new_limit} MB"]
    if diagnosis.binding in ("max_process_memory_mb", "max_pyarrow_mb"):
        budget = max(diagnosis.binding_mb or 0.0, diagnosis.peak_rss_mb or 0.0)
        if diagnosis.binding == "max_pyarrow_mb":
            budget = diagnosis.binding_mb or 0.0
        raised = math.ceil(budget * memory_factor)
        resource = run_config.setdefault("resources", {}).setdefault(memory_resource_key, {})
        resource.setdefault("config", {})[diagnosis.binding] = raised
        changes.append(f"{diagnosis.binding} -> {raised}")
    if diagnosis.chunks_help and diagnosis.chunk_config and diagnosis.chunk_size_rows:
        half = max(1, diagnosis.chunk_size_rows // 2)
        op = run_config.setdefault("ops", {}).setdefault(str(diagnosis.step_key), {})
        op.setdefault("config", {})[diagnosis.chunk_config] = half
        changes.append(f"{diagnosis.chunk_config} -> {half}")
    request = dg.RunRequest(
        run_key=run_key,
        job_name=run.job_name,
        asset_selection=sorted(run.asset_selection) if run.asset_selection else None,
        partition_key=run.tags.get("dagster/partition"),
        run_config=run_config,
        tags=tags,
    )
    return request, f"relaunching run {run.run_id} (attempt {attempt}): " + ", ".join(changes)


def build_memsafe_failure_sensor(
    name: str = "memsafe_failure_sensor",
    *,
    monitored_jobs: list[Any] | None = None,
    monitor_all_code_locations: bool = False,
    default_status: dg.DefaultSensorStatus = dg.DefaultSensorStatus.RUNNING,
    relaunch: bool = False,
    max_relaunches: int = 2,
    memory_factor: float = 1.5,
    memory_resource_key: str = "memory",
    relaunch_jobs: list[Any] | None = None,
) -> dg.SensorDefinition:
    """A run-failure sensor that recognises memory failures, logs the diagnosis and tags the
    failed run with its short form (``memsafe/diagnosis``, visible in the UI's run list).

    With ``relaunch=True`` it also answers each memory-failed run with one ``RunRequest``
    (see ``plan_relaunch``): more memory in ``dagster-k8s/config``, a raised memsafe budget
    when one bound, half the chunk where that helps; at most ``max_relaunches`` per original
    run, deduplicated by run key (and against runs already on the instance). The relaunched
    jobs are ``relaunch_jobs`` (default: ``monitored_jobs``).
    """
    request_jobs = relaunch_jobs if relaunch_jobs is not None else monitored_jobs
    if relaunch and not request_jobs:
        raise ValueError(
            "build_memsafe_failure_sensor(relaunch=True) needs the jobs it may relaunch: pass "
            "monitored_jobs= or relaunch_jobs="
        )
    if relaunch and max_relaunches < 1:
        raise ValueError("max_relaunches must be >= 1 when relaunch=True")

    @dg.run_failure_sensor(
        name=name,
        monitored_jobs=monitored_jobs,
        monitor_all_code_locations=monitor_all_code_locations,
        default_status=default_status,
        description="Explains runs that failed for lack of memory, tags them"
        + (" and relaunches them with more memory." if relaunch else "."),
        request_jobs=request_jobs if relaunch else None,
    )
    def memsafe_failure_sensor(context: dg.RunFailureSensorContext) -> Any:
        diagnoses = [d for d in map(diagnose_step_failure, context.get_step_failure_events()) if d]
        if not diagnoses:
            return None
        for diagnosis in diagnoses:
            context.log.warning(diagnosis.text)
        run = context.dagster_run
        context.instance.add_run_tags(run.run_id, {DIAGNOSIS_TAG: diagnoses[0].short})
        if not relaunch:
            return None
        request, why = plan_relaunch(
            run,
            diagnoses[0],
            max_relaunches=max_relaunches,
            memory_factor=memory_factor,
            memory_resource_key=memory_resource_key,
        )
        if request is not None and _already_requested(context.instance, request.run_key):
            return dg.SkipReason(f"run {request.run_key} already exists")
        context.log.info(f"memsafe: {why}")
        return request if request is not None else dg.SkipReason(why)

    return memsafe_failure_sensor


def _already_requested(instance: dg.DagsterInstance, run_key: str | None) -> bool:
    if run_key is None:
        return False
    return bool(instance.get_run_ids(dg.RunsFilter(tags={RELAUNCH_KEY_TAG: run_key}), limit=1))


def _int(value: object) -> int | None:
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _float(value: object) -> float | None:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
