"""Dagster Components: memsafe merges and the memory resource declared in ``defs.yaml``.

``memsafe_dagster.MergeComponent`` (a merge asset: ``build_merge_asset`` with its checks,
metadata, pool, and optionally its inbox sensor and schedule) and
``memsafe_dagster.MemoryResourceComponent`` (the ``MemoryMonitorResource`` for every merge of
a project). Both are registered for ``dg`` under the ``dagster_dg_cli.registry_modules`` entry
point, so ``dg list components`` shows them and ``dg scaffold defs`` writes their YAML.
"""

from memsafe_dagster.components.memory import (
    MemoryModel,
    MemoryResourceComponent,
    shared_memory_resource,
)
from memsafe_dagster.components.merge import (
    MERGE_ASSET_ARGUMENTS,
    AssetSource,
    InboxSensorModel,
    InboxSource,
    MergeComponent,
    MergeComponentScaffolder,
    MergeScaffoldParams,
    MergeScheduleModel,
    RetryPolicyModel,
)

__all__ = [
    "MERGE_ASSET_ARGUMENTS",
    "AssetSource",
    "InboxSensorModel",
    "InboxSource",
    "MemoryModel",
    "MemoryResourceComponent",
    "MergeComponent",
    "MergeComponentScaffolder",
    "MergeScaffoldParams",
    "MergeScheduleModel",
    "RetryPolicyModel",
    "shared_memory_resource",
]
