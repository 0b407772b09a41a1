"""MergeAssetSpec: the one typed form of how a merge asset was built, carried by the asset.

No ``from __future__ import annotations`` here: this module defines assets.
"""

import dataclasses
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from memsafe_dagster.datasets.merge import MergeOptions
from memsafe_dagster.merge_asset import (
    INBOX,
    INBOX_PATTERN,
    KEY_COLUMNS,
    POOL,
    STRATEGY,
    TARGET_PATH,
    MergeAssetSpec,
    build_merge_asset,
    merge_asset_spec,
    merge_pool_name,
    merge_spec_of,
)
from memsafe_dagster.merge_asset.spec import attach_spec
from memsafe_dagster.resources import MemoryMonitorResource
from memsafe_dagster.sensors import build_inbox_sensor


@dg.asset
def changes() -> pa.Table:
    return pa.table({"id": [1, 2], "v": ["a", "b"]})


def test_an_upstream_merge_asset_carries_its_spec() -> None:
    merged = build_merge_asset(
        "wh",
        source=changes,
        target_path="/data/wh",
        key_columns="region, id",
        strategy="update",
        on_duplicate_keys="last",
        merge_chunk_size_rows=5_000,
        key_prefix=["warehouse"],
        row_group_size=1_000,
    )
    spec = merge_spec_of(merged)
    assert isinstance(spec, MergeAssetSpec)
    assert spec.key == merged.key == dg.AssetKey(["warehouse", "wh"])
    assert spec.upstream == changes.key and spec.inbox is None
    assert spec.key_columns == ("region", "id")
    assert (spec.strategy, spec.request.on_duplicate) == ("update", "last")
    assert spec.request.chunk_rows == 5_000
    assert spec.request.options == MergeOptions(row_group_size=1_000)
    assert spec.pool == merge_pool_name("/data/wh")
    assert spec.target_for(None, {}) == "/data/wh"
    with pytest.raises(ValueError, match="not an inbox"):
        spec.inbox_for(None, {})
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.strategy = "upsert"  # type: ignore[misc]


def test_an_inbox_merge_asset_carries_inbox_pattern_and_storage_options() -> None:
    merged = build_merge_asset(
        "customers",
        source="memory://spec-inbox/{partition_key}",
        target_path="memory://spec-target/{partition_key}",
        key_columns="id",
        partitions_def=dg.StaticPartitionsDefinition(["a", "b"]),
        inbox_pattern="*.pq",
        storage_options={"secret": "s3cr3t"},
        pool="customers-pool",
    )
    spec = merge_spec_of(merged)
    assert spec.inbox == "memory://spec-inbox/{partition_key}"
    assert spec.inbox_pattern == "*.pq" and spec.pool == "customers-pool"
    assert spec.placeholders == ("partition_key",)
    assert spec.inbox_for("b", {}) == "memory://spec-inbox/b"
    assert dict(spec.storage_options) == {"secret": "s3cr3t"}
    with pytest.raises(TypeError):
        spec.storage_options["secret"] = "changed"  # type: ignore[index]
    # Credentials live in the spec only: not in its repr, not in the definition metadata.
    assert "s3cr3t" not in repr(spec)
    assert "s3cr3t" not in repr(merged.specs_by_key[merged.key].metadata)


def test_the_ui_metadata_is_written_from_the_spec() -> None:
    merged = build_merge_asset(
        "inboxed", source="/in", target_path="/t", key_columns=["a", "b"], inbox_pattern="x*"
    )
    shown = merged.specs_by_key[merged.key].metadata
    expected = {
        TARGET_PATH: "/t",
        KEY_COLUMNS: "a, b",
        STRATEGY: "upsert",
        POOL: merge_pool_name("/t"),
        INBOX: "/in",
        INBOX_PATTERN: "x*",
    }
    assert {k: shown[k] for k in expected} == expected
    assert merge_asset_spec(merged) == expected


def test_a_non_merge_asset_has_no_spec() -> None:
    for other in (changes, dg.AssetSpec("plain"), "a string"):
        with pytest.raises(TypeError, match=r"not a merge asset.*build_merge_asset"):
            merge_spec_of(other)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not a merge asset"):
        merge_asset_spec(changes)


def test_a_spec_is_attached_once() -> None:
    merged = build_merge_asset("once", source=changes, target_path="/t", key_columns="id")
    with pytest.raises(ValueError, match="already carries a merge spec"):
        attach_spec(merged, merge_spec_of(merged))


def test_the_inbox_sensor_takes_inbox_pattern_and_options_from_the_spec(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    merged = build_merge_asset(
        "feed",
        source=str(inbox),
        target_path=str(tmp_path / "t"),
        key_columns="id",
        inbox_pattern="*.pq",
        storage_options={"auto_mkdir": True},
    )
    sensor = build_inbox_sensor(name="feed_sensor", target=merged, memory_threshold=None)
    assert sensor.description == (
        f"Merges new Parquet files from {inbox} (*.pq) into {merged.key.to_user_string()}."
    )
    table = pa.table({"id": [1]})
    pq.write_table(table, inbox / "wanted.pq")
    pq.write_table(table, inbox / "ignored.parquet")
    defs = dg.Definitions(
        assets=[merged], sensors=[sensor], resources={"memory": MemoryMonitorResource()}
    )
    with (
        dg.instance_for_test() as instance,
        dg.build_sensor_context(instance=instance, definitions=defs) as context,
    ):
        [request] = sensor.evaluate_tick(context).run_requests
    assert request.run_config["ops"]["feed"]["config"]["files"] == [str(inbox / "wanted.pq")]
