"""Merge assets: a Dagster asset that merges a source into a Parquet dataset by key columns.

The source is an upstream asset (streamed through its IO manager) or an inbox of Parquet files
(each merged exactly once, archived after the commit). One module per concept:

- ``spec``: ``MergeAssetSpec``, how a merge asset was built (typed, frozen, carried by the
  asset: ``merge_spec_of``), its readable definition metadata and its pool name;
- ``factory``: ``build_merge_asset``, which validates once and builds the ``AssetsDefinition``;
- ``step``: one materialization, the merge inside the memory resource's ``track``;
- ``checks``: the ``unique_keys`` and ``memory_headroom`` asset check results.

The key-uniqueness count itself (``verify_unique_keys``) and inbox file selection are
Dagster-free and live in ``memsafe_dagster.datasets``.
"""

from memsafe_dagster.datasets.unique import UniqueKeysReport, verify_unique_keys
from memsafe_dagster.merge_asset.checks import MEMORY_HEADROOM, UNIQUE_KEYS
from memsafe_dagster.merge_asset.factory import MergeSourceType, build_merge_asset
from memsafe_dagster.merge_asset.spec import (
    INBOX,
    INBOX_PATTERN,
    KEY_COLUMNS,
    POOL,
    STRATEGY,
    TARGET_PATH,
    MergeAssetSpec,
    inbox_storage_options,
    merge_asset_spec,
    merge_pool_name,
    merge_spec_of,
)
from memsafe_dagster.merge_asset.step import (
    INBOX_ARCHIVED,
    INBOX_FILES,
    UNIQUE_KEYS_META,
    InboxMergeConfig,
    MergeConfig,
)

__all__ = [
    "INBOX",
    "INBOX_ARCHIVED",
    "INBOX_FILES",
    "INBOX_PATTERN",
    "KEY_COLUMNS",
    "MEMORY_HEADROOM",
    "POOL",
    "STRATEGY",
    "TARGET_PATH",
    "UNIQUE_KEYS",
    "UNIQUE_KEYS_META",
    "InboxMergeConfig",
    "MergeAssetSpec",
    "MergeConfig",
    "MergeSourceType",
    "UniqueKeysReport",
    "build_merge_asset",
    "inbox_storage_options",
    "merge_asset_spec",
    "merge_pool_name",
    "merge_spec_of",
    "verify_unique_keys",
]
