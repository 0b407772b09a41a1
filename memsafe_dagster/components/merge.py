"""MergeComponent: a merge asset declared in a ``defs.yaml``, built by ``build_merge_asset``.

Its attributes are ``build_merge_asset``'s keyword arguments under the same names (see
``MERGE_ASSET_ARGUMENTS``), except three that YAML spells more naturally: ``asset_key`` (a
``/``-separated key: the asset's name and ``key_prefix``), ``source`` (``{asset: <key>}`` or
``{inbox: <url>, pattern: ...}``, the latter carrying ``inbox_pattern``) and ``merge_options``
(``merge_dataset``'s options, the factory's ``**merge_options``). So the component builds
exactly the asset the factory builds, checks, metadata and pool included, and a new factory
argument becomes an attribute by adding one field and its name.

Beyond the asset it declares what usually goes with it: the memory resource (``memory:``),
an inbox sensor (``sensor:``, inbox sources) and a schedule (``schedule:``, time-partitioned
merges).

Annotations here stay real objects (no postponed evaluation): pydantic and Dagster read them.
"""

from collections.abc import Mapping
from typing import Annotated, Any, Literal, Optional, Union

import dagster as dg
from dagster.components.resolved.core_models import (
    DailyPartitionsDefinitionModel,
    HourlyPartitionsDefinitionModel,
    StaticPartitionsDefinitionModel,
    TimeWindowPartitionsDefinitionModel,
    WeeklyPartitionsDefinitionModel,
    resolve_partitions_def,
)
from pydantic import BaseModel, ConfigDict, Field

from memsafe_dagster.components.memory import ENV_SCOPE, ResolvedMemory
from memsafe_dagster.memory import MemoryPressureLevel
from memsafe_dagster.merge_asset import build_merge_asset
from memsafe_dagster.schedules import build_merge_schedule
from memsafe_dagster.sensors import build_inbox_sensor

Strategy = Literal["insert", "update", "upsert", "delete", "full_merge"]
Status = Literal["running", "stopped"]

#: Attributes handed to ``build_merge_asset`` under their own name.
MERGE_ASSET_ARGUMENTS = (
    "target_path",
    "target_table",
    "catalog_resource_key",
    "key_columns",
    "strategy",
    "partitions_def",
    "memory_resource_key",
    "merge_chunk_size_rows",
    "on_duplicate_keys",
    "enable_streaming_merge",
    "storage_options",
    "input_metadata",
    "check_unique_keys",
    "min_headroom_mb",
    "check_memory_mb",
    "pool",
    "retry_policy",
    "group_name",
    "description",
    "tags",
    "owners",
)
#: Factory arguments with a YAML spelling of their own (``asset_key``, ``source``); the Python
#: objects ``partition_mapping`` takes have none.
SPELLED_OTHERWISE = ("name", "key_prefix", "source", "inbox_pattern", "partition_mapping")


# -- source -----------------------------------------------------------------------------------


class AssetSource(dg.Resolvable, dg.Model):
    """Merge an upstream asset, loaded by its IO manager (``ChunkedParquetIOManager`` streams
    it in chunks)."""

    asset: dg.ResolvedAssetKey = Field(description="The upstream asset key, e.g. raw/orders.")


class InboxSource(dg.Resolvable, dg.Model):
    """Merge the Parquet files that land in an inbox directory (any fsspec URL); each file is
    merged once and then moved to ``<inbox>/_processed/``."""

    inbox: str = Field(description="Path or URL of the inbox directory.")
    pattern: str = Field(default="*.parquet", description="Glob of the files to merge.")


# -- partitions, retries ----------------------------------------------------------------------

PartitionsModel = Union[  # noqa: UP007 (pydantic reads the objects at runtime)
    HourlyPartitionsDefinitionModel,
    DailyPartitionsDefinitionModel,
    WeeklyPartitionsDefinitionModel,
    TimeWindowPartitionsDefinitionModel,
    StaticPartitionsDefinitionModel,
]


def _resolve_partitions(
    context: dg.ResolutionContext, value: BaseModel | str | None
) -> dg.PartitionsDefinition | None:
    """Dagster's own YAML shape (``{type: daily, start_date: ...}``, templates allowed in its
    fields) or one template evaluating to a ``PartitionsDefinition``."""
    if value is None:
        return None
    if isinstance(value, str):
        resolved = context.resolve_value(value)
        if resolved is None or isinstance(resolved, dg.PartitionsDefinition):
            return resolved
        raise ValueError(
            f"partitions_def: {value!r} gave {type(resolved).__name__}, not a "
            "PartitionsDefinition; write {type: daily, start_date: '2024-01-01'} or a template "
            "such as \"{{ dg.DailyPartitionsDefinition(start_date='2024-01-01') }}\""
        )
    rendered = type(value).model_validate(context.resolve_value(value.model_dump()))
    return resolve_partitions_def(context, rendered)


ResolvedPartitions = Annotated[
    Optional[dg.PartitionsDefinition],  # noqa: UP045
    dg.Resolver(
        _resolve_partitions,
        model_field_type=Optional[PartitionsModel],  # noqa: UP045
        description=(
            "Partitions of the merge asset, e.g. {type: daily, start_date: '2024-01-01'} "
            "(default: the upstream asset's when it is a Python asset of the same project)."
        ),
    ),
]


class RetryPolicyModel(dg.Resolvable, dg.Model):
    """``dagster.RetryPolicy``; every retry halves the merge's chunk size."""

    max_retries: int = 1
    delay: float | None = None
    backoff: Literal["linear", "exponential"] | None = None
    jitter: Literal["full", "plus_minus"] | None = None

    def to_retry_policy(self) -> dg.RetryPolicy:
        return dg.RetryPolicy(
            max_retries=self.max_retries,
            delay=self.delay,
            backoff=dg.Backoff[self.backoff.upper()] if self.backoff else None,
            jitter=dg.Jitter[self.jitter.upper()] if self.jitter else None,
        )


# -- what goes with the asset -----------------------------------------------------------------


class InboxSensorModel(dg.Resolvable, dg.Model):
    """An inbox sensor (``build_inbox_sensor``): one run per new batch of files."""

    name: str | None = Field(default=None, description="Sensor name (default: <asset>_inbox).")
    job_name: str | None = Field(
        default=None, description="Name of a job of the merge asset for the runs (default: none)."
    )
    minimum_interval_seconds: int = 30
    default_status: Status = "stopped"
    memory_threshold: Literal["warning", "critical", "emergency"] | None = Field(
        default="critical", description="Skip ticks at this memory pressure or worse."
    )


class MergeScheduleModel(dg.Resolvable, dg.Model):
    """A schedule (``build_merge_schedule``): one run per time partition as its window closes."""

    name: str | None = Field(default=None, description="Schedule name (default: <job>_schedule).")
    job_name: str | None = Field(default=None, description="Job name (default: <asset>_job).")
    include_upstream: bool = Field(default=True, description="The job runs the upstream too.")
    minute_of_hour: int | None = None
    hour_of_day: int | None = None
    day_of_week: int | None = None
    day_of_month: int | None = None
    default_status: Status = "stopped"


# -- scaffolder -------------------------------------------------------------------------------


class MergeScaffoldParams(BaseModel):
    """``dg scaffold defs memsafe_dagster.MergeComponent PATH`` parameters (lists need
    ``--json-params``)."""

    asset_key: str = "warehouse/orders"
    source_asset: str | None = None
    inbox: str | None = None
    target_path: str | None = None
    key_columns: list[str] = Field(default_factory=lambda: ["id"])
    strategy: Strategy = "upsert"


class MergeComponentScaffolder(dg.Scaffolder[MergeScaffoldParams]):
    """Writes a ``defs.yaml`` that loads as it is: an inbox (default) or an upstream asset
    merged into a dataset under the project's ``data/`` directory."""

    @classmethod
    def get_scaffold_params(cls) -> type[MergeScaffoldParams]:
        return MergeScaffoldParams

    def scaffold(self, request: dg.ScaffoldRequest[MergeScaffoldParams]) -> None:
        params = request.params or MergeScaffoldParams()
        name = params.asset_key.strip("/").replace("/", "_")
        root = "{{ context.project_root }}/data"
        attributes: dict[str, Any] = {"asset_key": params.asset_key}
        if params.source_asset:
            attributes["source"] = {"asset": params.source_asset}
        else:
            attributes["source"] = {"inbox": params.inbox or f"{root}/inbox/{name}"}
        attributes.update(
            target_path=params.target_path or f"{root}/{name}",
            key_columns=list(params.key_columns),
            strategy=params.strategy,
            memory={"profile": "container"},
        )
        if "inbox" in attributes["source"]:
            attributes["sensor"] = {"minimum_interval_seconds": 30, "default_status": "stopped"}
        dg.scaffold_component(request, attributes)


# -- the component ----------------------------------------------------------------------------


@dg.scaffold_with(MergeComponentScaffolder)
class MergeComponent(dg.Component, dg.Resolvable, dg.Model):
    """Merges a source (an upstream asset or an inbox of Parquet files) into the Parquet
    dataset at ``target_path`` by ``key_columns``, in bounded memory (``build_merge_asset``).

    The asset has the ``unique_keys`` and ``memory_headroom`` checks, memsafe metadata and a
    pool per target. ``memory:`` provides the ``MemoryMonitorResource`` under
    ``memory_resource_key`` (leave it out when a ``MemoryResourceComponent`` provides it);
    ``{{ env_int('NAME') }}`` / ``{{ env_var('NAME') }}`` defer a value to run time.
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    asset_key: dg.ResolvedAssetKey = Field(description="Key of the merge asset, e.g. wh/orders.")
    source: AssetSource | InboxSource = Field(description="{asset: <key>} or {inbox: <url>}.")
    target_path: str | None = Field(
        default=None,
        description="Dataset directory (path or fsspec URL); may contain {partition_key}.",
    )
    target_table: str | None = Field(
        default=None, description="An Iceberg table 'namespace.table' instead of target_path."
    )
    catalog_resource_key: str = "iceberg_catalog"
    key_columns: str | list[str] = Field(description="Key column(s) the merge matches rows by.")
    strategy: Strategy = "upsert"
    partitions_def: ResolvedPartitions = None
    memory_resource_key: str = "memory"
    memory: ResolvedMemory = None
    merge_chunk_size_rows: int = Field(default=100_000, description="Rows per merge chunk.")
    on_duplicate_keys: Literal["error", "first", "last"] = "error"
    enable_streaming_merge: bool = True
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description=(
            "fsspec storage options for target, inbox and a URL source; "
            "\"{{ env_var('X') }}\" is read when the run starts (secrets), {{ env.X }} at load."
        ),
    )
    input_metadata: dict[str, Any] | None = None
    check_unique_keys: bool = True
    min_headroom_mb: float | None = None
    check_memory_mb: float | None = None
    pool: str | None = None
    retry_policy: RetryPolicyModel | None = None
    group_name: str | None = None
    description: str | None = None
    tags: dict[str, str] | None = None
    owners: list[str] | None = None
    merge_options: dict[str, Any] = Field(
        default_factory=dict,
        description="merge_dataset options: row_group_size, target_file_rows, compression, ...",
    )
    sensor: InboxSensorModel | None = None
    schedule: MergeScheduleModel | None = None

    @classmethod
    def get_additional_scope(cls) -> Mapping[str, Any]:
        return {**super().get_additional_scope(), **ENV_SCOPE}

    @classmethod
    def get_spec(cls) -> dg.ComponentTypeSpec:
        return dg.ComponentTypeSpec(
            description=(
                "Merges an upstream asset or an inbox of Parquet files into a Parquet dataset "
                "by key columns, in bounded memory, with key and memory-headroom checks."
            ),
            tags=["memsafe", "parquet", "merge"],
            produces=["asset", "asset_check", "resource", "sensor", "schedule"],
        )

    def merge_asset_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of the ``build_merge_asset`` call this component makes."""
        clash = sorted(set(self.merge_options) & {*MERGE_ASSET_ARGUMENTS, *SPELLED_OTHERWISE})
        if clash:
            raise ValueError(
                f"{self.asset_key.to_user_string()}: merge_options {clash} are attributes of "
                "their own (or spelled asset_key / source); set them there"
            )
        kwargs = {name: getattr(self, name) for name in MERGE_ASSET_ARGUMENTS}
        if self.retry_policy is not None:
            kwargs["retry_policy"] = self.retry_policy.to_retry_policy()
        *prefix, name = self.asset_key.path
        kwargs.update(name=name, key_prefix=prefix or None)
        if isinstance(self.source, InboxSource):
            kwargs.update(source=self.source.inbox, inbox_pattern=self.source.pattern)
        else:
            kwargs["source"] = self.source.asset
        kwargs.update(self.merge_options)
        return kwargs

    def build_defs(self, context: dg.ComponentLoadContext) -> dg.Definitions:
        asset = build_merge_asset(**self.merge_asset_kwargs())
        sensors = [self._sensor(asset)] if self.sensor is not None else []
        schedules = [self._schedule(asset)] if self.schedule is not None else []
        resources = {self.memory_resource_key: self.memory} if self.memory is not None else {}
        return dg.Definitions(
            assets=[asset], sensors=sensors, schedules=schedules, resources=resources
        )

    def _sensor(self, asset: dg.AssetsDefinition) -> dg.SensorDefinition:
        config = self.sensor
        assert config is not None
        if not isinstance(self.source, InboxSource):
            raise ValueError(
                f"{asset.key.to_user_string()}: sensor: needs an inbox source "
                "(source: {inbox: <url>}); an upstream asset is scheduled or automated instead"
            )
        job = (
            dg.define_asset_job(
                config.job_name,
                selection=[asset],
                description=f"Merges the files waiting in {self.source.inbox}.",
            )
            if config.job_name
            else None
        )
        threshold = config.memory_threshold
        return build_inbox_sensor(
            name=config.name or f"{asset.key.path[-1]}_inbox",
            target=asset,
            job=job,
            minimum_interval_seconds=config.minimum_interval_seconds,
            memory_threshold=MemoryPressureLevel.parse(threshold) if threshold else None,
            default_status=dg.DefaultSensorStatus[config.default_status.upper()],
        )

    def _schedule(self, asset: dg.AssetsDefinition) -> dg.ScheduleDefinition:
        config = self.schedule
        assert config is not None
        return build_merge_schedule(
            asset,
            name=config.name,
            job_name=config.job_name,
            include_upstream=config.include_upstream,
            minute_of_hour=config.minute_of_hour,
            hour_of_day=config.hour_of_day,
            day_of_week=config.day_of_week,
            day_of_month=config.day_of_month,
            default_status=dg.DefaultScheduleStatus[config.default_status.upper()],
        )
