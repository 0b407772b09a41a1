"""MemoryMonitorResource: the memory budget of a Dagster step, its checks and its metadata.

Assets, the chunked IO manager and the merge-asset factory share it: ``check(context, stage)``
logs WARNING and above and fails the step at EMERGENCY; ``track(context)`` samples peaks in the
background during a block and records the memsafe/* metadata of DESIGN.md's table.
"""

import contextlib
import dataclasses
import gc
import logging
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import dagster as dg
from pydantic import Field, PrivateAttr, model_validator

from memsafe_dagster import metadata as md
from memsafe_dagster.memory import (
    MemoryLimits,
    MemoryMonitor,
    MemoryPressureError,
    MemoryPressureLevel,
    PeakWindow,
    SamplingRequest,
    detect_memory_limits,
)
from memsafe_dagster.memory.admission import (
    AdmissionLedger,
    AdmissionTimeout,
    expected_increment_mb,
)
from memsafe_dagster.memory.process import current_rss_bytes
from memsafe_dagster.memory.sizes import MiB

PROFILES = ("container", "development", "explicit")
_BUDGET_FIELDS = ("max_pyarrow_mb", "max_process_memory_mb", "min_system_available_mb")

WARNING = MemoryPressureLevel.WARNING
CRITICAL = MemoryPressureLevel.CRITICAL
EMERGENCY = MemoryPressureLevel.EMERGENCY

log = logging.getLogger(__name__)


class MemoryMonitorResource(dg.ConfigurableResource):
    """The memory budget of a step, from the container's real limit.

    Budgets left unset come from the profile: ``"container"`` (default) splits the detected
    container limit 60 % process / 40 % PyArrow / 20 % kept free; ``"development"`` uses the
    seed's tiers by available memory; ``"explicit"`` takes all three budgets from config and
    requires them. Every field accepts ``EnvVar`` / ``EnvVar.int``.
    """

    max_pyarrow_mb: int | None = Field(
        default=None, description="PyArrow allocation budget in MB (unset: from the profile)."
    )
    max_process_memory_mb: int | None = Field(
        default=None, description="Process RSS budget in MB (unset: from the profile)."
    )
    min_system_available_mb: int | None = Field(
        default=None,
        description="Memory the container must keep available, in MB (unset: from the profile).",
    )
    profile: str = Field(
        default="container",
        description="Where unset budgets come from: 'container', 'development' or 'explicit'.",
    )
    sampling_interval_ms: int = Field(
        default=100,
        description="Background sampling period of track() in ms; 0 samples only at checks.",
    )
    admission: bool = Field(
        default=True,
        description=(
            "Reserve the step's expected peak from the container-wide admission ledger before "
            "track() starts, waiting while the container cannot hold it."
        ),
    )
    admission_timeout_s: float = Field(
        default=600.0, description="How long a step waits for admission before it fails."
    )
    admission_ledger: str | None = Field(
        default=None,
        description="Ledger file (default: one per memory cgroup, or MEMSAFE_ADMISSION_LEDGER).",
    )

    _monitor: MemoryMonitor | None = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _validate_config(cls, data: Any) -> Any:
        # Runs on the raw values: an EnvVar is a placeholder here (it is resolved, and this
        # runs again, when the resource is initialized for a run).
        if not isinstance(data, Mapping):
            return data
        profile = data.get("profile", "container")
        if not _is_env_var(profile) and profile not in PROFILES:
            raise ValueError(
                f"MemoryMonitorResource.profile must be one of {', '.join(PROFILES)}; "
                f"got {profile!r}"
            )
        if profile == "explicit":
            missing = [name for name in _BUDGET_FIELDS if data.get(name) is None]
            if missing:
                raise ValueError(
                    "MemoryMonitorResource(profile='explicit') needs all three budgets; "
                    f"missing: {', '.join(missing)}. Set them, or use profile='container' to "
                    "derive unset budgets from the container's memory limit."
                )
        for name in (*_BUDGET_FIELDS, "sampling_interval_ms"):
            value = data.get(name)
            if isinstance(value, (int, float)) and not _is_env_var(value) and value < 0:
                raise ValueError(f"MemoryMonitorResource.{name} must be >= 0, got {value!r}")
        return data

    # -- the monitor ------------------------------------------------------------------------

    def get_monitor(self) -> MemoryMonitor:
        """This resource's ``MemoryMonitor`` (built once, on first use)."""
        if self._monitor is None:
            self._monitor = self.build_monitor()
        return self._monitor

    def build_monitor(self, limits: MemoryLimits | None = None) -> MemoryMonitor:
        """A new ``MemoryMonitor`` with this resource's budgets (``limits`` default: detected)."""
        limits = limits if limits is not None else detect_memory_limits()
        if self.profile == "explicit":
            return MemoryMonitor(
                max_pyarrow_mb=self.max_pyarrow_mb,  # type: ignore[arg-type]
                max_process_memory_mb=self.max_process_memory_mb,
                min_system_available_mb=self.min_system_available_mb,  # type: ignore[arg-type]
                limits=limits,
            )
        if self.profile == "development":
            base = MemoryMonitor.for_development(limits=limits)
        else:
            base = MemoryMonitor.for_container(limits=limits)
        return MemoryMonitor(
            max_pyarrow_mb=_pick(self.max_pyarrow_mb, base.max_pyarrow_mb),
            max_process_memory_mb=_pick(self.max_process_memory_mb, base.max_process_memory_mb),
            min_system_available_mb=_pick(
                self.min_system_available_mb, base.min_system_available_mb
            ),
            limits=limits,
        )

    @property
    def sampling_interval_s(self) -> float:
        return self.sampling_interval_ms / 1000.0

    # -- checks -----------------------------------------------------------------------------

    def check(self, context: Any, stage: str) -> MemoryPressureLevel:
        """The current pressure level; logs WARNING and above through ``context.log``.

        At EMERGENCY (after one garbage collection and a recheck) raises the memsafe
        ``dagster.Failure`` naming ``stage``, the peak and the limit, with memsafe/* metadata.
        """
        return check_pressure(self.get_monitor(), context, stage)

    @contextlib.contextmanager
    def track(
        self,
        context: Any = None,
        *,
        stage: str | None = None,
        record: bool = True,
        output_name: str | None = None,
    ) -> Iterator["MemoryTracker"]:
        """Sample peaks in the background during the block and record memsafe/* metadata.

        Yields a ``MemoryTracker`` with its own peaks (nested tracks do not disturb each
        other). On a clean exit, with ``record`` and a context that has
        ``add_output_metadata`` (an asset/op context or an IO manager's ``OutputContext``),
        the metadata is added to the output; ``tracker.metadata`` is there either way, e.g.
        to merge into a ``MaterializeResult``. A ``MemoryPressureError`` raised in the block
        (an adaptive stream at EMERGENCY) becomes the memsafe ``dagster.Failure``.
        """
        tracker = MemoryTracker(
            self.get_monitor(),
            context=context,
            stage=stage or _default_stage(context),
            sampling_interval_s=self.sampling_interval_s,
            admission=self._admission() if context is not None else None,
        )
        with tracker:
            yield tracker
        if record and context is not None:
            tracker.record(context, output_name=output_name)

    def _admission(self) -> "Admission | None":
        if not self.admission:
            return None
        return Admission(
            ledger_path=self.admission_ledger, timeout_s=float(self.admission_timeout_s)
        )


def _is_env_var(value: Any) -> bool:
    """True for ``EnvVar`` / ``EnvVar.int`` placeholders (both carry ``env_var_name``)."""
    return isinstance(value, dg.EnvVar) or hasattr(value, "env_var_name")


def _pick(value: float | None, default: float | None) -> Any:
    return default if value is None else value


def _default_stage(context: Any) -> str:
    """A readable stage name from whatever Dagster context is at hand."""
    if context is None:
        return "this block"
    for attr in ("step_key", "op_handle"):
        with contextlib.suppress(Exception):
            value = getattr(context, attr)
            if value:
                return f"step {value}"
    with contextlib.suppress(Exception):
        return f"asset {context.asset_key.to_user_string()}"
    return "this step"


def _log(context: Any) -> Any:
    with contextlib.suppress(Exception):
        if context is not None and context.log is not None:
            return context.log
    return log


def check_pressure(
    monitor: MemoryMonitor,
    context: Any,
    stage: str,
    *,
    extra: Mapping[str, Any] | None = None,
    window: PeakWindow | None = None,
    baseline_rss_bytes: int | None = None,
) -> MemoryPressureLevel:
    """``MemoryMonitorResource.check`` for any monitor (the tracker and IO manager use it);
    peaks reported are those of ``window`` (default: the monitor's own)."""
    reading, level = monitor.sample()
    if level is EMERGENCY:
        gc.collect()
        reading, level = monitor.sample()
    _log_level(context, monitor, level, stage, window)
    if level is EMERGENCY:
        figures = md.MemoryFigures.from_window(window) if window is not None else None
        if figures is not None:
            figures = dataclasses.replace(figures, baseline_rss_bytes=baseline_rss_bytes)
        raise md.pressure_failure(stage, monitor, figures=figures, reading=reading, extra=extra)
    return level


def _log_level(
    context: Any,
    monitor: MemoryMonitor,
    level: MemoryPressureLevel,
    stage: str,
    window: PeakWindow | None = None,
) -> None:
    if level < WARNING:
        return
    logger = _log(context)
    message = f"memsafe: memory pressure {level.value.upper()} during {stage}: " + (
        monitor.get_detailed_status(window)
    )
    if level >= CRITICAL:
        logger.error(message)
    else:
        logger.warning(message)


class MemoryTracker:
    """What ``MemoryMonitorResource.track`` yields: peaks, worst level and chunks of one block.

    It watches the resource's monitor through a window of its own (nested tracks keep their
    own peaks), and asks the monitor's one sampler for ``sampling_interval_s``. Everything that
    samples the same monitor during the block feeds the window: a stream attached to
    ``tracker.monitor``, a merge given it as ``memory_monitor``, their background sampling.
    So ``figures`` already hold the worst of all of them.
    """

    def __init__(
        self,
        monitor: MemoryMonitor,
        *,
        context: Any = None,
        stage: str = "this block",
        sampling_interval_s: float = 0.1,
        admission: "Admission | None" = None,
    ) -> None:
        self.monitor = monitor
        self.admission = admission
        self.baseline_rss_bytes: int | None = None
        self.context = context
        self.stage = stage
        self.sampling_interval_s = sampling_interval_s
        self.chunks: int | None = None
        self.extra: dict[str, Any] = {}
        self.window: PeakWindow | None = None
        self._sampling: SamplingRequest | None = None

    def __enter__(self) -> "MemoryTracker":
        if self.admission is not None:
            self.extra.update(self.admission.enter(self.context, self.monitor, self.stage))
        self.baseline_rss_bytes = current_rss_bytes()
        self.window = PeakWindow(self.monitor)
        self.monitor.sample()
        if self.sampling_interval_s > 0:
            self._sampling = self.monitor.sampler.request(self.sampling_interval_s)
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if self.admission is not None:
            self.admission.exit()
        if self._sampling is not None:
            self._sampling.release()
            self._sampling = None
        self.monitor.sample()
        window = self._window().close()
        if isinstance(exc, MemoryPressureError):
            raise self.failure(detail=str(exc)) from exc
        if exc is None and window.max_pressure is EMERGENCY:
            # A momentary sample: no check acted on it and the step finished.
            _log(self.context).warning(
                f"memsafe: one memory sample during {self.stage} reached EMERGENCY, but it had "
                "passed by the next check and the step finished; worst figures: "
                + self.monitor.get_detailed_status(window)
            )
        elif exc is None and window.max_pressure >= WARNING:
            _log_level(self.context, self.monitor, window.max_pressure, self.stage, window)

    # -- during the block ---------------------------------------------------------------------

    def check(self, stage: str | None = None) -> MemoryPressureLevel:
        """Check now (logs WARNING and above; the memsafe Failure at EMERGENCY)."""
        return check_pressure(
            self.monitor,
            self.context,
            stage or self.stage,
            extra=self.extra,
            window=self.window,
            baseline_rss_bytes=self.baseline_rss_bytes,
        )

    def add_chunks(self, count: int = 1) -> None:
        """Count chunks processed in the block (reported as ``memsafe/chunks``)."""
        self.chunks = (self.chunks or 0) + count

    def failure(self, detail: str | None = None, stage: str | None = None) -> dg.Failure:
        """The memsafe EMERGENCY Failure for this block, with its figures so far."""
        return md.pressure_failure(
            stage or self.stage,
            self.monitor,
            figures=self.figures,
            detail=detail,
            extra=self.extra,
        )

    # -- results ------------------------------------------------------------------------------

    @property
    def figures(self) -> md.MemoryFigures:
        """Final figures after the block; live figures while it runs."""
        figures = md.MemoryFigures.from_window(self._window())
        return dataclasses.replace(figures, baseline_rss_bytes=self.baseline_rss_bytes)

    def _window(self) -> PeakWindow:
        if self.window is None:
            raise RuntimeError("MemoryTracker has no figures before its block starts")
        return self.window

    @property
    def metadata(self) -> dict[str, Any]:
        """The memsafe/* entries of DESIGN.md's table (plus ``extra``), ready for Dagster."""
        return md.for_ui({**md.memory_metadata(self.figures, chunks=self.chunks), **self.extra})

    def record(self, context: Any, *, output_name: str | None = None) -> None:
        """Add ``metadata`` to the context's output (asset/op context or ``OutputContext``)."""
        add = getattr(context, "add_output_metadata", None)
        if add is None:
            return
        if isinstance(context, dg.OutputContext) or output_name is None:
            add(self.metadata)
        else:
            add(self.metadata, output_name=output_name)


# -- admission --------------------------------------------------------------------------------

EXPECTED_PEAK_KEY = "memsafe/expected_peak_mb"
HISTORY_LIMIT = 20

# One reservation per step process: tracks nested inside a track (an IO manager's inside an
# asset's) run under the outer one's reservation.
_held = threading.local()


class Admission:
    """The Dagster side of admission: what a step expects, the wait, its log line, metadata.

    The expected peak comes from the asset's definition metadata ``memsafe/expected_peak_mb``
    (a peak RSS of the step process), else the 90th percentile of its last 20 materializations'
    ``memsafe/step_rss_mb`` plus 20 % (or ``memsafe/peak_rss_mb`` minus today's baseline), else
    ``memsafe.memory.admission.default_reservation_mb`` (25 % of the limit, at most 512 MB).
    """

    def __init__(self, *, ledger_path: str | None, timeout_s: float) -> None:
        self.ledger_path = ledger_path
        self.timeout_s = timeout_s
        self._ledger: AdmissionLedger | None = None

    def enter(self, context: Any, monitor: MemoryMonitor, stage: str) -> dict[str, Any]:
        depth = getattr(_held, "depth", 0)
        _held.depth = depth + 1
        if depth > 0:
            return {}
        ledger = AdmissionLedger(self.ledger_path, limits=monitor.limits)
        baseline_mb = current_rss_bytes() / MiB
        need_mb, source = expected_increment_mb(
            expected_peak_mb=_expected_peak(context),
            history_increments_mb=_history_increments(context, baseline_mb),
            baseline_mb=baseline_mb,
            limit_mb=monitor.limits.limit_bytes / MiB,
        )
        logger = _log(context)

        def waiting(state: Any) -> None:
            logger.info(f"memsafe: admission for {stage}: {state.waiting_message(need_mb)}")

        try:
            granted = ledger.reserve(
                need_mb, label=stage[:120], timeout_s=self.timeout_s, on_wait=waiting
            )
        except AdmissionTimeout as exc:
            _held.depth = depth
            raise dg.Failure(
                description=(
                    f"memsafe: admission timed out for {stage}: {exc}. Other steps in this "
                    "container held the memory this step expects to need "
                    f"({need_mb:,.0f} MB, from {source}). Lower the executor's max_concurrent "
                    "(memsafe_dagster.container_executor), give the container more memory, or "
                    "set memsafe/expected_peak_mb on the asset."
                ),
                metadata={
                    ADMISSION_WAIT_S: dg.MetadataValue.float(round(self.timeout_s, 2)),
                    ADMISSION_RESERVED_MB: dg.MetadataValue.float(round(need_mb, 1)),
                    ADMISSION_SOURCE: dg.MetadataValue.text(source),
                },
                allow_retries=True,
            ) from exc
        self._ledger = ledger
        if granted.waited:
            logger.info(
                f"memsafe: admitted {stage} after {granted.wait_s:.1f} s ({need_mb:,.0f} MB "
                f"reserved, from {source})"
            )
        return {
            ADMISSION_WAIT_S: dg.MetadataValue.float(round(granted.wait_s, 3)),
            ADMISSION_RESERVED_MB: dg.MetadataValue.float(round(need_mb, 1)),
            ADMISSION_SOURCE: dg.MetadataValue.text(source),
        }

    def exit(self) -> None:
        depth = max(0, getattr(_held, "depth", 1) - 1)
        _held.depth = depth
        if self._ledger is not None:
            ledger, self._ledger = self._ledger, None
            with contextlib.suppress(OSError):
                ledger.release()


ADMISSION_WAIT_S = md.ADMISSION_WAIT_S
ADMISSION_RESERVED_MB = md.ADMISSION_RESERVED_MB
ADMISSION_SOURCE = md.ADMISSION_SOURCE


def _asset_key(context: Any) -> dg.AssetKey | None:
    with contextlib.suppress(Exception):
        key = context.asset_key
        if key is not None:
            return key
    return None


def _expected_peak(context: Any) -> float | None:
    """``memsafe/expected_peak_mb`` from the asset's (or output's) definition metadata."""
    candidates: list[Mapping[str, Any]] = []
    key = _asset_key(context)
    with contextlib.suppress(Exception):
        assets_def = context.assets_def
        if key is not None:
            candidates.append(assets_def.specs_by_key[key].metadata or {})
    with contextlib.suppress(Exception):
        candidates.append(context.definition_metadata or {})
    with contextlib.suppress(Exception):
        step = context.step_context
        if key is not None:
            candidates.append(step.job_def.asset_layer.get(key).metadata or {})
    for meta in candidates:
        value = meta.get(EXPECTED_PEAK_KEY)
        value = getattr(value, "value", value)
        with contextlib.suppress(TypeError, ValueError):
            if value is not None:
                return float(value)
    return None


def _history_increments(context: Any, baseline_mb: float) -> list[float]:
    """Recent step increments of the asset from its materializations on the instance."""
    key = _asset_key(context)
    if key is None:
        return []
    try:
        records = context.instance.fetch_materializations(key, limit=HISTORY_LIMIT).records
    except Exception:
        return []
    out: list[float] = []
    for record in records:
        with contextlib.suppress(Exception):
            meta = record.asset_materialization.metadata
            step = meta.get(md.STEP_RSS_MB)
            if step is not None:
                out.append(float(step.value))
                continue
            peak = meta.get(md.PEAK_RSS_MB)
            if peak is not None:
                out.append(max(0.0, float(peak.value) - baseline_mb))
    return out
