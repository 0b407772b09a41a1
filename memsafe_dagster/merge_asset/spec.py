"""MergeAssetSpec: how a merge asset was built, in one typed, frozen form.

``build_merge_asset`` validates its arguments once, freezes them in a ``MergeAssetSpec`` and
attaches it to the ``AssetsDefinition`` it returns; the step runs from it and sensors read it
with ``merge_spec_of(asset)``. The definition metadata shows the same facts to the UI as text
(``definition_metadata``), but nothing parses it back. Storage options (credentials) live only
in the spec the asset carries: never in metadata, never in a module global. (Typed JSON in the
definition metadata was the alternative; it could not carry the storage options, so they
would have needed a second home.)
"""

import hashlib
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import dagster as dg
import fsspec

from memsafe_dagster.datasets.merge.request import MergeRequest

# Definition metadata of every merge asset: what the UI shows about how it was built.
TARGET_PATH = "memsafe/target_path"
KEY_COLUMNS = "memsafe/key_columns"
STRATEGY = "memsafe/strategy"
INBOX = "memsafe/inbox"
INBOX_PATTERN = "memsafe/inbox_pattern"
POOL = "memsafe/pool"
TARGET_TABLE = "memsafe/target_table"
TABLE_NAME = "dagster/table_name"

PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_SPEC_ATTRIBUTE = "_memsafe_merge_spec"


@dataclass(frozen=True)
class MergeAssetSpec:
    """Everything ``build_merge_asset`` was given, validated: target, the merge itself (one
    ``MergeRequest``: strategy, keys, duplicates policy, chunk size, options), source (an
    upstream asset key or an inbox URL and pattern), check settings, pool.

    ``storage_options`` apply to the target and the inbox; they stay out of ``repr``. With
    ``target_table`` the target is that Iceberg table of the ``IcebergCatalogResource`` under
    ``catalog_resource_key`` (``target_path`` is then empty).
    """

    key: dg.AssetKey
    target_path: str
    request: MergeRequest
    memory_resource_key: str
    storage_options: Mapping[str, Any] = field(repr=False)
    inbox: str | None
    inbox_pattern: str
    placeholders: tuple[str, ...]
    check_unique_keys: bool
    min_headroom_mb: float | None
    check_memory_mb: float | None
    pool: str
    upstream: dg.AssetKey | None = None
    target_table: str | None = None  # an Iceberg table instead of target_path
    catalog_resource_key: str | None = None  # its IcebergCatalogResource

    def __post_init__(self) -> None:
        # Read-only, so a spec shared by a definition and its sensors cannot drift.
        object.__setattr__(
            self, "storage_options", types.MappingProxyType(dict(self.storage_options))
        )

    @property
    def key_columns(self) -> tuple[str, ...]:
        return self.request.keys

    @property
    def strategy(self) -> str:
        return self.request.strategy

    def target_for(self, partition_key: str | None, dimensions: Mapping[str, str]) -> str:
        """The target URL for one partition (``{partition_key}`` and dimension names filled)."""
        return fill_placeholders(self.target_path, partition_key, dimensions)

    def table_for(self, partition_key: str | None, dimensions: Mapping[str, str]) -> str:
        """The Iceberg table identifier for one partition (only with ``target_table``)."""
        if self.target_table is None:
            raise ValueError(f"{self.key.to_user_string()} merges into {self.target_path!r}")
        return fill_placeholders(self.target_table, partition_key, dimensions)

    def inbox_for(self, partition_key: str | None, dimensions: Mapping[str, str]) -> str:
        """The inbox URL for one partition (only for an inbox merge asset)."""
        if self.inbox is None:
            raise ValueError(f"{self.key.to_user_string()} merges an upstream asset, not an inbox")
        return fill_placeholders(self.inbox, partition_key, dimensions)


def fill_placeholders(
    template: str, partition_key: str | None, dimensions: Mapping[str, str]
) -> str:
    """``template`` with ``{partition_key}`` (``|`` of a multi-partition key as ``/``) and
    multi-partition dimension names replaced."""

    def value(match: re.Match) -> str:
        name = match.group(1)
        if name == "partition_key":
            if partition_key is None:
                raise ValueError(f"{template!r} needs a partition key and the run has none")
            return partition_key.replace("|", "/")
        return dimensions[name]

    return PLACEHOLDER.sub(value, template)


def definition_metadata(spec: MergeAssetSpec) -> dict[str, str]:
    """The readable definition metadata the UI shows (target, keys, strategy, pool, inbox)."""
    out = {
        TARGET_PATH: spec.target_path,
        KEY_COLUMNS: ", ".join(spec.key_columns),
        STRATEGY: spec.strategy,
        POOL: spec.pool,
    }
    if spec.target_table is not None:
        del out[TARGET_PATH]
        out[TARGET_TABLE] = spec.target_table
        out[TABLE_NAME] = spec.target_table
    if spec.inbox is not None:
        out[INBOX] = spec.inbox
        out[INBOX_PATTERN] = spec.inbox_pattern
    return out


def attach_spec(asset: dg.AssetsDefinition, spec: MergeAssetSpec) -> dg.AssetsDefinition:
    """Give ``asset`` its spec (once: the factory calls it on the definition it just built)."""
    if hasattr(asset, _SPEC_ATTRIBUTE):
        raise ValueError(f"{asset.key.to_user_string()} already carries a merge spec")
    setattr(asset, _SPEC_ATTRIBUTE, spec)
    return asset


def merge_spec_of(asset: dg.AssetsDefinition) -> MergeAssetSpec:
    """The ``MergeAssetSpec`` a merge asset was built with; TypeError for any other asset.

    Only the object ``build_merge_asset`` returned carries it: a copy Dagster makes with other
    attributes (``with_attributes``, ``map_asset_specs``) is no longer what was built.
    """
    spec = getattr(asset, _SPEC_ATTRIBUTE, None)
    if not isinstance(spec, MergeAssetSpec):
        what = asset.key.to_user_string() if isinstance(asset, dg.AssetsDefinition) else asset
        raise TypeError(
            f"{what!s} is not a merge asset: pass the AssetsDefinition that build_merge_asset "
            "returned"
        )
    return spec


def merge_asset_spec(asset: dg.AssetsDefinition) -> dict[str, str]:
    """The memsafe definition metadata of a merge asset as the UI shows it (target, keys,
    strategy, pool, inbox); ``merge_spec_of`` gives the typed spec."""
    return definition_metadata(merge_spec_of(asset))


def inbox_storage_options(asset: dg.AssetsDefinition) -> dict[str, Any]:
    """The storage options a merge asset was built with (they are not in its metadata)."""
    return dict(merge_spec_of(asset).storage_options)


def iceberg_pool_name(catalog_resource_key: str, table: str) -> str:
    """The concurrency pool of merges into one Iceberg table of one catalog resource."""
    normalized = f"iceberg://{catalog_resource_key}/{table}"
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "_", table).strip("_")[:60] or "table"
    digest = hashlib.sha256(normalized.encode()).hexdigest()[:8]
    return f"memsafe-merge-{readable}-{digest}"


def merge_pool_name(target_path: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """A stable concurrency pool name for a target: readable tail plus a hash of the full URL.

    Two spellings of one local directory (relative, absolute, ``file://``) get the same pool.
    The name depends on the URL alone: no filesystem is built for it (``storage_options`` are
    not read, so credentials are neither needed nor touched when definitions load).
    """
    del storage_options  # accepted for compatibility; the URL alone names the pool
    try:
        protocol, _ = fsspec.core.split_protocol(target_path)
        cls = fsspec.get_filesystem_class(protocol or "file")
        stripped = cls._strip_protocol(target_path)
        names = (cls.protocol,) if isinstance(cls.protocol, str) else tuple(cls.protocol)
        normalized = f"{names[0]}://{stripped.rstrip('/')}"
    except (ValueError, ImportError):
        normalized = target_path.rstrip("/")
    tail = "-".join(p for p in normalized.split("/")[-2:] if p)
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "_", tail).strip("_")[:60] or "target"
    digest = hashlib.sha256(normalized.encode()).hexdigest()[:8]
    return f"memsafe-merge-{readable}-{digest}"
