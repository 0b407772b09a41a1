"""The memsafe metadata keys, and the one place that turns memory, stream and merge results into
Dagster metadata and into the ``memsafe: memory pressure EMERGENCY`` Failure.

Every asset, IO manager and merge asset emits the same names, so the Dagster UI plots them
over time (DESIGN.md, "Metadata keys"). ``memsafe/limit_mb`` is the effective limit of the
process (``MemoryLimits.limit_bytes``: the smallest of env overrides, cgroup limits and RAM) and
``memsafe/limit_source`` says which one binds; ``memsafe/headroom_mb`` is that limit minus the
peak RSS. The budgets pressure is classified against (a share of that limit) are in
``memsafe/budgets``.

Memory figures always come from one ``PeakWindow``: a tracked block's window already holds what
everything sampling the same monitor inside it saw (a merge's guard included). A merge asset::

    with memory.track(context, record=False) as tracker:
        result = io.merge(..., memory_monitor=tracker.monitor)
    return MaterializeResult(
        metadata={**merge_metadata(result, tracker.monitor, figures=tracker.figures)}
    )
"""

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import dagster as dg
import pyarrow as pa

from memsafe_dagster.memory import MemoryMonitor, MemoryPressureLevel, MemoryReading, PeakWindow
from memsafe_dagster.memory.sizes import MiB
from memsafe_dagster.memory.window import PeaksInMB

PRESSURE = "memsafe/pressure"
PEAK_RSS_MB = "memsafe/peak_rss_mb"
PEAK_PYARROW_MB = "memsafe/peak_pyarrow_mb"
LIMIT_MB = "memsafe/limit_mb"
LIMIT_SOURCE = "memsafe/limit_source"
HEADROOM_MB = "memsafe/headroom_mb"
CHUNKS = "memsafe/chunks"
MERGE = "memsafe/merge"
INSERTED = "memsafe/inserted"
UPDATED = "memsafe/updated"
DELETED = "memsafe/deleted"
ROW_COUNT = "dagster/row_count"
PARTITION_ROW_COUNT = "dagster/partition_row_count"
COLUMN_SCHEMA = "dagster/column_schema"
URI = "dagster/uri"  # where the data is: a path or a URL
PATH = "path"  # what UPathIOManager records for an IO-managed output

# Beyond DESIGN.md's table: what the step ran with, so a retry's smaller chunk is visible.
CHUNK_SIZE_ROWS = "memsafe/chunk_size_rows"
RETRY_NUMBER = "memsafe/retry_number"
STAGE = "memsafe/stage"
DETAIL = "memsafe/detail"
CURRENT_RSS_MB = "memsafe/rss_mb"
BUDGETS = "memsafe/budgets"
#: A finished step whose worst sample was EMERGENCY records ``memsafe/pressure: critical``
#: (it ran on; nothing stopped it) and the sample here. Only a stopped step reads "emergency".
PRESSURE_WORST_SAMPLE = "memsafe/pressure_worst_sample"
#: The step's own increment: its peak RSS minus the process's RSS when the step started.
STEP_RSS_MB = "memsafe/step_rss_mb"
#: Admission (MemoryMonitorResource(admission=True)): seconds waited, MB reserved, from where.
ADMISSION_WAIT_S = "memsafe/admission_wait_s"
ADMISSION_RESERVED_MB = "memsafe/admission_reserved_mb"
ADMISSION_SOURCE = "memsafe/admission_source"
#: On the EMERGENCY Failure: the budget that bound (its config name), its MB, and whether a
#: smaller chunk could fit (the Failure allows retries only then).
BINDING = "memsafe/binding"
BINDING_MB = "memsafe/binding_mb"
CHUNKS_HELP = "memsafe/chunks_help"
#: The op config field a relaunch may halve (set by merge assets: merge_chunk_size_rows).
CHUNK_CONFIG = "memsafe/chunk_config"

#: The keys every memory figure set carries (DESIGN.md's table, memory rows).
MEMORY_KEYS = (PRESSURE, PEAK_RSS_MB, PEAK_PYARROW_MB, LIMIT_MB, LIMIT_SOURCE, HEADROOM_MB)

FAILURE_PREFIX = "memsafe: memory pressure EMERGENCY"


@dataclass(frozen=True)
class MemoryFigures(PeaksInMB):
    """Peaks, worst level and the binding limit of one window (a step, a block, a merge)."""

    pressure: MemoryPressureLevel
    peak_rss_bytes: int
    peak_pyarrow_bytes: int
    limit_bytes: int
    limit_source: str
    baseline_rss_bytes: int | None = None
    #: True when the step stopped at EMERGENCY (the Failure); a finished step whose worst
    #: sample was EMERGENCY did not act on it.
    stopped: bool = False

    @classmethod
    def from_window(
        cls, window: PeakWindow, level: MemoryPressureLevel | None = None
    ) -> "MemoryFigures":
        """The window's peaks and worst level, with its monitor's limit (``level`` folds in a
        level seen outside the monitor, e.g. by a stream's sizer)."""
        pressure = window.max_pressure if level is None else max(window.max_pressure, level)
        limits = window.monitor.limits
        return cls(
            pressure=pressure,
            peak_rss_bytes=window.peak_rss_bytes,
            peak_pyarrow_bytes=window.peak_pyarrow_bytes,
            limit_bytes=limits.limit_bytes,
            limit_source=limits.source,
        )

    @classmethod
    def from_monitor(
        cls, monitor: MemoryMonitor, level: MemoryPressureLevel | None = None
    ) -> "MemoryFigures":
        """The monitor's own window: peaks and worst level since its last reset."""
        return cls.from_window(monitor.window, level)

    @property
    def limit_mb(self) -> float:
        return self.limit_bytes / MiB

    @property
    def step_rss_mb(self) -> float | None:
        """The peak RSS above the process's RSS at the step's start (None: baseline unknown)."""
        if self.baseline_rss_bytes is None:
            return None
        return max(0, self.peak_rss_bytes - self.baseline_rss_bytes) / MiB

    @property
    def headroom_mb(self) -> float:
        """The effective limit minus the peak RSS (negative when the peak went over)."""
        return (self.limit_bytes - self.peak_rss_bytes) / MiB


# The entries people look at first, in this order; everything else follows, JSON last.
FIRST_LOOK = (
    PRESSURE,
    "memsafe/pressure_worst_sample",
    PEAK_RSS_MB,
    "memsafe/step_rss_mb",
    HEADROOM_MB,
    LIMIT_MB,
    LIMIT_SOURCE,
    INSERTED,
    UPDATED,
    DELETED,
    ROW_COUNT,
    PARTITION_ROW_COUNT,
    URI,
)


_BIG = (dg.JsonMetadataValue, dg.TableSchemaMetadataValue)


def for_ui(metadata: dict[str, Any]) -> dict[str, Any]:
    """``metadata`` ordered as the UI should show it: ``FIRST_LOOK`` first, then the other
    figures, and the big entries (JSON, column schemas) last."""
    first = {key: metadata[key] for key in FIRST_LOOK if key in metadata}
    rest = [(k, v) for k, v in metadata.items() if k not in first]
    is_json = [isinstance(v, _BIG) for _, v in rest]
    return {
        **first,
        **{k: v for (k, v), j in zip(rest, is_json, strict=True) if not j},
        **{k: v for (k, v), j in zip(rest, is_json, strict=True) if j},
    }


def memory_metadata(
    figures: MemoryFigures | PeakWindow | MemoryMonitor, *, chunks: int | None = None
) -> dict[str, dg.MetadataValue]:
    """The memsafe/* memory entries (pressure, peaks, limit, source, headroom[, chunks]) of
    figures, a window, or a monitor's own window."""
    figures = _figures(figures)
    acted = figures.pressure
    if acted is MemoryPressureLevel.EMERGENCY and not figures.stopped:
        acted = MemoryPressureLevel.CRITICAL
    out: dict[str, dg.MetadataValue] = {
        PRESSURE: dg.MetadataValue.text(acted.value),
        **(
            {PRESSURE_WORST_SAMPLE: dg.MetadataValue.text(figures.pressure.value)}
            if acted is not figures.pressure
            else {}
        ),
        PEAK_RSS_MB: dg.MetadataValue.float(round(figures.peak_rss_mb, 2)),
        **(
            {STEP_RSS_MB: dg.MetadataValue.float(round(figures.step_rss_mb, 2))}
            if figures.step_rss_mb is not None
            else {}
        ),
        PEAK_PYARROW_MB: dg.MetadataValue.float(round(figures.peak_pyarrow_mb, 2)),
        LIMIT_MB: dg.MetadataValue.float(round(figures.limit_mb, 2)),
        LIMIT_SOURCE: dg.MetadataValue.text(figures.limit_source),
        HEADROOM_MB: dg.MetadataValue.float(round(figures.headroom_mb, 2)),
    }
    if chunks is not None:
        out[CHUNKS] = dg.MetadataValue.int(int(chunks))
    return out


def _figures(source: MemoryFigures | PeakWindow | MemoryMonitor) -> MemoryFigures:
    if isinstance(source, MemoryMonitor):
        return MemoryFigures.from_monitor(source)
    if isinstance(source, PeakWindow):
        return MemoryFigures.from_window(source)
    return source


def budgets_metadata(monitor: MemoryMonitor) -> dict[str, dg.MetadataValue]:
    """The budgets the monitor classifies against, as one JSON entry."""
    return {
        BUDGETS: dg.MetadataValue.json(
            {
                "max_pyarrow_mb": monitor.max_pyarrow_mb,
                "max_process_memory_mb": monitor.max_process_memory_mb,
                "min_system_available_mb": monitor.min_system_available_mb,
            }
        )
    }


def column_schema(schema: pa.Schema) -> dg.TableSchema:
    """A Dagster ``TableSchema`` for an Arrow schema (type names as Arrow prints them)."""
    return dg.TableSchema(
        columns=[
            dg.TableColumn(
                name=field.name,
                type=str(field.type),
                constraints=dg.TableColumnConstraints(nullable=field.nullable),
            )
            for field in schema
        ]
    )


def table_metadata(
    schema: pa.Schema, row_count: int, *, partitioned: bool = False
) -> dict[str, dg.MetadataValue]:
    """``dagster/row_count`` and ``dagster/column_schema`` (plus ``dagster/partition_row_count``
    for one partition: its rows are what this materialization wrote)."""
    out: dict[str, dg.MetadataValue] = {
        ROW_COUNT: dg.MetadataValue.int(int(row_count)),
        COLUMN_SCHEMA: dg.MetadataValue.table_schema(column_schema(schema)),
    }
    if partitioned:
        out[PARTITION_ROW_COUNT] = dg.MetadataValue.int(int(row_count))
    return out


def stream_metadata(stats: Any) -> dict[str, dg.MetadataValue]:
    """Chunk figures of a ``ChunkStream``'s ``stats``: chunks streamed and chunk sizes used."""
    out: dict[str, dg.MetadataValue] = {CHUNKS: dg.MetadataValue.int(int(stats.chunks))}
    if stats.max_chunk_size_rows is not None:
        out["memsafe/chunk_size_rows_min"] = dg.MetadataValue.int(int(stats.min_chunk_size_rows))
        out["memsafe/chunk_size_rows_max"] = dg.MetadataValue.int(int(stats.max_chunk_size_rows))
    out["memsafe/chunk_resizes"] = dg.MetadataValue.int(int(stats.resizes))
    return out


def merge_metadata(
    result: Any,
    monitor: MemoryMonitor | None = None,
    *,
    figures: MemoryFigures | PeakWindow | None = None,
    chunks: int | None = None,
) -> dict[str, dg.MetadataValue]:
    """A ``MergeResult`` as metadata: the whole result as JSON, the three counts and the
    memory entries.

    Memory comes from ``figures`` (the step's window, which holds the merge's own peaks) when
    given; else from the result's peaks, with the limit of ``monitor`` (else detected now).
    """
    as_dict = _json_ready(result.to_dict())
    out: dict[str, dg.MetadataValue] = {
        MERGE: dg.MetadataValue.json(as_dict),
        INSERTED: dg.MetadataValue.int(int(result.inserted)),
        UPDATED: dg.MetadataValue.int(int(result.updated)),
        DELETED: dg.MetadataValue.int(int(result.deleted)),
    }
    if figures is None:
        figures = _result_figures(result, monitor)
    out.update(memory_metadata(figures, chunks=chunks))
    return out


def _result_figures(result: Any, monitor: MemoryMonitor | None) -> MemoryFigures:
    """The memory figures a ``MergeResult`` carries, for callers without a window."""
    from memsafe_dagster.memory import detect_memory_limits

    limits = monitor.limits if monitor is not None else detect_memory_limits()
    return MemoryFigures(
        pressure=MemoryPressureLevel.parse(result.max_pressure),
        peak_rss_bytes=int(float(result.peak_rss_mb) * MiB),
        peak_pyarrow_bytes=int(float(result.peak_pyarrow_mb) * MiB),
        limit_bytes=limits.limit_bytes,
        limit_source=limits.source,
    )


def _json_ready(value: Any) -> Any:
    """``value`` with enums and other non-JSON leaves turned into strings."""
    return json.loads(json.dumps(value, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, MemoryPressureLevel):
        return value.value
    return str(value)


# -- the EMERGENCY failure -------------------------------------------------------------------


@dataclass(frozen=True)
class Breach:
    """One signal over its budget: which budget (its config name), its value and the figure."""

    budget: str  # "max_pyarrow_mb", "max_process_memory_mb" or "min_system_available_mb"
    budget_mb: float
    value_mb: float
    text: str


def breach_list(monitor: MemoryMonitor, reading: MemoryReading) -> list[Breach]:
    """The signals of ``reading`` at EMERGENCY, process RSS first (it is what the kernel and
    the kubelet count), then PyArrow, then the container's available memory."""
    available = reading.available_bytes
    # (budget name, its value, the reading, over when, how the signal reads)
    signals = (
        (
            "max_process_memory_mb",
            monitor.max_process_memory_mb,
            reading.rss_bytes,
            ">=",
            "process RSS",
        ),
        (
            "max_pyarrow_mb",
            monitor.max_pyarrow_mb,
            reading.pyarrow_bytes,
            ">=",
            "PyArrow allocation",
        ),
        ("min_system_available_mb", monitor.min_system_available_mb, available, "<", "available"),
    )
    found = []
    for budget, budget_mb, value, over, what in signals:
        if not budget_mb or value is None:
            continue
        value_mb = value / MiB
        if value_mb >= budget_mb if over == ">=" else value_mb < budget_mb:
            text = f"{what} {value_mb:.1f} MB {over} {budget} {budget_mb:g}"
            found.append(Breach(budget, float(budget_mb), value_mb, text))
    return found


def breaches(monitor: MemoryMonitor, reading: MemoryReading) -> list[str]:
    """Which signals of ``reading`` are at EMERGENCY, each as readable text with its budget."""
    return [b.text for b in breach_list(monitor, reading)]


def chunks_can_help(breach: Breach | None, figures: "MemoryFigures") -> bool:
    """False when the process held the binding budget before the step did anything: no chunk
    size fits then, and a retry with half the chunk only fails again."""
    if breach is None or breach.budget != "max_process_memory_mb":
        return True
    if figures.baseline_rss_bytes is None:
        return True
    return figures.baseline_rss_bytes / MiB < 0.9 * breach.budget_mb


def fitting_budget_mb(figures: "MemoryFigures") -> float:
    """A process budget that holds this step: its peak with a quarter more, in whole 64 MB."""
    need = figures.peak_rss_mb * 1.25
    return float(64 * -(-need // 64))


def pressure_failure(
    stage: str,
    monitor: MemoryMonitor,
    *,
    figures: MemoryFigures | None = None,
    reading: MemoryReading | None = None,
    detail: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dg.Failure:
    """The ``dagster.Failure`` for EMERGENCY pressure during ``stage``.

    Its description starts with ``memsafe: memory pressure EMERGENCY`` and names the stage, the
    signal over its budget, the peak and the limit; its metadata carries the memsafe/* figures
    as they stood. It allows retries: a retried step streams with half the chunk size.
    """
    reading = reading if reading is not None else monitor.read()
    base = figures if figures is not None else MemoryFigures.from_monitor(monitor)
    figures = MemoryFigures(
        pressure=MemoryPressureLevel.EMERGENCY,
        peak_rss_bytes=max(base.peak_rss_bytes, reading.rss_bytes),
        peak_pyarrow_bytes=max(base.peak_pyarrow_bytes, reading.pyarrow_bytes),
        limit_bytes=base.limit_bytes,
        limit_source=base.limit_source,
        stopped=True,
    )
    found = breach_list(monitor, reading)
    binding = found[0] if found else None
    figures = dataclasses.replace(figures, baseline_rss_bytes=base.baseline_rss_bytes)
    helps = chunks_can_help(binding, figures)
    over = [b.text for b in found] or ["pressure stayed at EMERGENCY"]
    description = (
        f"{FAILURE_PREFIX} during {stage}: {'; '.join(over)}. "
        f"Peak RSS {figures.peak_rss_mb:.1f} MB, peak PyArrow {figures.peak_pyarrow_mb:.1f} MB, "
        f"limit {figures.limit_mb:.1f} MB ({figures.limit_source}). "
        "The step stopped before the kernel could kill it and wrote nothing: "
        + advice(binding, figures, helps)
    )
    metadata: dict[str, Any] = {
        **memory_metadata(figures),
        **budgets_metadata(monitor),
        STAGE: dg.MetadataValue.text(stage),
        CURRENT_RSS_MB: dg.MetadataValue.float(round(reading.rss_bytes / MiB, 2)),
        CHUNKS_HELP: dg.MetadataValue.bool(helps),
    }
    if binding is not None:
        metadata[BINDING] = dg.MetadataValue.text(binding.budget)
        metadata[BINDING_MB] = dg.MetadataValue.float(round(binding.budget_mb, 2))
    if detail:
        metadata[DETAIL] = dg.MetadataValue.text(detail)
    if extra:
        metadata.update(extra)
    return dg.Failure(description=description, metadata=metadata, allow_retries=helps)


def advice(binding: Breach | None, figures: MemoryFigures, helps: bool) -> str:
    """What to change, for the budget that bound."""
    if binding is not None and binding.budget == "max_process_memory_mb" and not helps:
        baseline = (figures.baseline_rss_bytes or 0) / MiB
        return (
            f"the process already held {baseline:.0f} MB (Python, Dagster and the libraries "
            f"it imported) before the step began, so no chunk size fits under "
            f"max_process_memory_mb {binding.budget_mb:g}; a budget of about "
            f"{fitting_budget_mb(figures):.0f} MB would fit (MemoryMonitorResource("
            "max_process_memory_mb=...), or a container limit of which the default 60 % is "
            "that much)."
        )
    if binding is not None and binding.budget == "min_system_available_mb":
        return (
            "the container as a whole ran short (other processes count too): give the "
            "container more memory, run fewer steps at once (admission, container_executor), "
            "or lower chunk_size_rows."
        )
    return (
        "lower chunk_size_rows, stream inputs (ChunkStream, RecordBatchReader or Dataset "
        "annotations), raise the memsafe budgets or give the container more memory."
    )
