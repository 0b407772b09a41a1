"""The Dagster layer over Iceberg, on real Dagster instances: ``build_merge_asset(...,
target_table=...)`` with an ``IcebergCatalogResource`` configured by ``dg.EnvVar``, one snapshot
per materialization recorded in the metadata (snapshot id, counts, ``dagster/*``), inbox
sources, partitioned runs into one table, and ``ChunkedParquetIOManager`` reading an Iceberg
table under every input annotation (a merge asset's table, an external table, a pinned
snapshot, columns and filter pushed down).

No ``from __future__ import annotations`` here: this module defines assets.
"""

from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from dagster_helpers import latest_metadata
from iceberg_helpers import CATALOG_NAME, catalog_properties, create_table, make_catalog, scan
from merge_helpers import row_set

from memsafe_dagster import build_merge_asset
from memsafe_dagster import metadata as md
from memsafe_dagster.datasets import ChunkStream
from memsafe_dagster.iceberg_catalog import IcebergCatalogResource
from memsafe_dagster.io_managers import ChunkedParquetIOManager
from memsafe_dagster.merge_asset import MEMORY_HEADROOM, UNIQUE_KEYS, merge_spec_of
from memsafe_dagster.merge_asset.spec import TABLE_NAME, TARGET_TABLE
from memsafe_dagster.merge_asset.step import ICEBERG_SNAPSHOT_ID
from memsafe_dagster.resources import MemoryMonitorResource

SCHEMA = pa.schema([("id", pa.int64()), ("v", pa.string())])


def rows(ids, tag: str) -> pa.Table:
    ids = list(ids)
    return pa.table({"id": ids, "v": [f"{tag}{i}" for i in ids]}, schema=SCHEMA)


@pytest.fixture
def catalog_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A catalog whose location lives only in the environment, and its table ``ns.orders``."""
    props = catalog_properties(tmp_path / "cat")
    monkeypatch.setenv("TEST_ICEBERG_URI", props["uri"])
    monkeypatch.setenv("TEST_ICEBERG_WAREHOUSE", props["warehouse"])
    catalog = make_catalog(tmp_path / "cat")
    table = create_table(catalog, "ns.orders", SCHEMA, [rows(range(0, 100), "t")])
    return catalog, table


def catalog_resource() -> IcebergCatalogResource:
    return IcebergCatalogResource(
        name=CATALOG_NAME,
        properties={
            "uri": dg.EnvVar("TEST_ICEBERG_URI"),
            "warehouse": dg.EnvVar("TEST_ICEBERG_WAREHOUSE"),
        },
    )


def resources(tmp_path: Path) -> dict[str, Any]:
    catalog = catalog_resource()
    return {
        "io_manager": ChunkedParquetIOManager(
            base_path=str(tmp_path / "io"), iceberg_catalog=catalog
        ),
        "memory": MemoryMonitorResource(min_system_available_mb=0),
        "iceberg_catalog": catalog,
    }


VERSION = {"tag": "a", "ids": range(50, 150)}


@dg.asset
def changes() -> ChunkStream:
    """The rows to upsert: ``VERSION`` says which."""
    table = rows(VERSION["ids"], VERSION["tag"])
    return ChunkStream.from_batches(table.to_batches(max_chunksize=30))


def test_merge_asset_into_an_iceberg_table_records_the_snapshot(tmp_path, catalog_env) -> None:
    _, table = catalog_env
    merged = build_merge_asset(
        "orders_ice", source=changes, target_table="ns.orders", key_columns="id"
    )
    spec = merge_spec_of(merged)
    assert spec.target_table == "ns.orders" and spec.catalog_resource_key == "iceberg_catalog"
    definition = merged.specs_by_key[merged.key].metadata
    assert definition[TARGET_TABLE] == "ns.orders" and definition[TABLE_NAME] == "ns.orders"
    assert md.URI not in definition and "memsafe/target_path" not in definition
    assert merged.specs_by_key[merged.key].kinds == {"iceberg"}
    assert {c.name for c in merged.check_specs} == {MEMORY_HEADROOM}, "no unique_keys check"
    assert "iceberg_catalog" in merged.required_resource_keys

    instance = dg.DagsterInstance.ephemeral()
    parent = table.current_snapshot().snapshot_id
    VERSION.update(tag="a", ids=range(50, 150))
    result = dg.materialize([changes, merged], resources=resources(tmp_path), instance=instance)
    assert result.success
    table.refresh()
    snapshot = table.current_snapshot()
    assert snapshot.parent_snapshot_id == parent, "one snapshot per materialization"
    assert row_set(scan(table)) == row_set(
        pa.concat_tables([rows(range(0, 50), "t"), rows(range(50, 150), "a")]).cast(
            scan(table).schema
        )
    )
    meta = latest_metadata(instance, "orders_ice")
    assert meta[ICEBERG_SNAPSHOT_ID] == str(snapshot.snapshot_id)
    assert meta[TABLE_NAME] == "ns.orders"
    assert (meta[md.INSERTED], meta[md.UPDATED], meta[md.DELETED]) == (50, 50, 0)
    assert meta[md.ROW_COUNT] == 150
    assert [c.name for c in meta[md.COLUMN_SCHEMA].columns] == ["id", "v"]
    assert meta[md.MERGE]["snapshot_id"] == snapshot.snapshot_id
    assert meta[md.URI] == table.location()
    assert meta[md.PRESSURE] == "normal" and meta[md.PEAK_RSS_MB] > 20
    summary = snapshot.summary.additional_properties
    assert summary["dagster.run-id"] == result.run_id
    assert summary["dagster.asset-key"] == "orders_ice"
    assert summary["memsafe.strategy"] == "upsert"

    # A downstream asset reads the merged table through the IO manager, as a stream.
    seen: dict[str, int] = {}

    @dg.asset(ins={"merged": dg.AssetIn(key=merged.key)})
    def report(merged: ChunkStream) -> None:
        seen["rows"] = sum(chunk.num_rows for chunk in merged)

    assert dg.materialize(
        [report, merged.to_source_asset()], resources=resources(tmp_path), instance=instance
    ).success
    assert seen["rows"] == 150


def test_inbox_into_an_iceberg_table(tmp_path, catalog_env) -> None:
    _, table = catalog_env
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    pq.write_table(rows(range(90, 110), "i"), inbox / "batch-1.parquet")
    merged = build_merge_asset(
        "orders_inbox", source=str(inbox), target_table="ns.orders", key_columns="id"
    )
    instance = dg.DagsterInstance.ephemeral()
    assert dg.materialize([merged], resources=resources(tmp_path), instance=instance).success
    assert scan(table.refresh()).num_rows == 110
    meta = latest_metadata(instance, "orders_inbox")
    assert meta[md.INSERTED] == 10 and meta[md.UPDATED] == 10
    # An empty inbox commits nothing and reports the table as it stands.
    snapshot = table.current_snapshot().snapshot_id
    assert dg.materialize([merged], resources=resources(tmp_path), instance=instance).success
    meta = latest_metadata(instance, "orders_inbox")
    assert meta[ICEBERG_SNAPSHOT_ID] == str(snapshot) and meta[md.ROW_COUNT] == 110
    assert table.refresh().current_snapshot().snapshot_id == snapshot


DAYS = dg.StaticPartitionsDefinition(["d1", "d2"])


@dg.asset(partitions_def=DAYS)
def daily(context: dg.AssetExecutionContext) -> pa.Table:
    day = int(context.partition_key[1:])
    return rows(range(1000 * day, 1000 * day + 10), context.partition_key)


def test_partitions_merge_into_one_table(tmp_path, catalog_env) -> None:
    _, table = catalog_env
    merged = build_merge_asset(
        "orders_daily", source=daily, target_table="ns.orders", key_columns="id"
    )
    instance = dg.DagsterInstance.ephemeral()
    for day in DAYS.get_partition_keys():
        assert dg.materialize(
            [daily, merged], resources=resources(tmp_path), instance=instance, partition_key=day
        ).success
    got = scan(table.refresh())
    assert got.num_rows == 120
    assert sorted(v for v in got["v"].to_pylist() if v.startswith("d")) == sorted(
        [f"d1{i}" for i in range(1000, 1010)] + [f"d2{i}" for i in range(2000, 2010)]
    )


# -- reading Iceberg tables ---------------------------------------------------------------------

ORDERS = dg.AssetSpec("orders_table", metadata={"memsafe/iceberg_table": "ns.orders"})
READ: dict[str, Any] = {}


@dg.asset(ins={"orders": dg.AssetIn("orders_table")})
def as_table(orders: pa.Table) -> None:
    READ["table"] = orders


@dg.asset(ins={"orders": dg.AssetIn("orders_table")})
def as_dataset(orders: ds.Dataset) -> None:
    READ["dataset"] = orders.to_table()


@dg.asset(ins={"orders": dg.AssetIn("orders_table")})
def as_reader(orders: pa.RecordBatchReader) -> None:
    READ["reader"] = orders.read_all()


@dg.asset(ins={"orders": dg.AssetIn("orders_table")})
def as_stream(orders: ChunkStream) -> None:
    READ["stream"] = pa.concat_tables(list(orders))


@dg.asset(
    ins={
        "orders": dg.AssetIn(
            "orders_table", metadata={"columns": ["id"], "filter": [("id", "<", 10)]}
        )
    }
)
def narrowed(orders: pa.Table) -> None:
    READ["narrowed"] = orders


def test_the_io_manager_reads_an_iceberg_table_under_every_annotation(
    tmp_path, catalog_env
) -> None:
    _, table = catalog_env
    READ.clear()
    assets = [ORDERS, as_table, as_dataset, as_reader, as_stream, narrowed]
    assert dg.materialize(assets, resources=resources(tmp_path)).success
    expected = row_set(scan(table))
    for kind in ("table", "dataset", "reader", "stream"):
        assert row_set(READ[kind]) == expected, kind
    assert READ["narrowed"].column_names == ["id"]
    assert sorted(READ["narrowed"]["id"].to_pylist()) == list(range(10))


def test_an_input_can_pin_a_snapshot(tmp_path, catalog_env) -> None:
    from memsafe_dagster.datasets import merge_iceberg

    _, table = catalog_env
    first = table.current_snapshot().snapshot_id
    merge_iceberg(rows(range(0, 10), "new"), table, "delete", "id", merge_min_system_available_mb=0)
    pinned: dict[str, pa.Table] = {}

    @dg.asset(
        ins={"orders": dg.AssetIn("orders_table", metadata={"memsafe/iceberg_snapshot_id": first})}
    )
    def old(orders: pa.Table) -> None:
        pinned["old"] = orders

    assert dg.materialize([ORDERS, old], resources=resources(tmp_path)).success
    assert pinned["old"].num_rows == 100 and scan(table.refresh()).num_rows == 90


def test_an_iceberg_input_without_a_catalog_is_a_clear_error(tmp_path, catalog_env) -> None:
    bare = {
        "io_manager": ChunkedParquetIOManager(base_path=str(tmp_path / "io")),
        "memory": MemoryMonitorResource(),
    }
    with pytest.raises(ValueError, match="iceberg_catalog=IcebergCatalogResource"):
        dg.materialize([ORDERS, as_table], resources=bare)


def test_factory_refuses_ambiguous_or_malformed_targets() -> None:
    with pytest.raises(ValueError, match="not both"):
        build_merge_asset(
            "x", source=changes, target_path="/tmp/x", target_table="ns.t", key_columns="id"
        )
    with pytest.raises(ValueError, match=r"namespace\.table"):
        build_merge_asset("x", source=changes, target_table="orders", key_columns="id")
    with pytest.raises(ValueError, match="target_path must be"):
        build_merge_asset("x", source=changes, key_columns="id")
    with pytest.raises(ValueError, match="placeholders"):
        build_merge_asset(
            "x", source=changes, target_table="ns.t_{partition_key}", key_columns="id"
        )
    assert UNIQUE_KEYS
