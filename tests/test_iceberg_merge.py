"""merge_iceberg on an embedded catalog (pyiceberg's SQL catalog on SQLite, local warehouse).

Semantics against the oracle, one snapshot per merge with its summary, time travel, the
table's schema and field ids in every written file, pruning by manifest bounds (footers of
pruned files never read), validation errors and failures that leave the table at the same
snapshot with no new files, refusals (partitioned, renamed columns), catalogs resolved by
pyiceberg's own configuration, orphan cleanup, and the lazy import.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from iceberg_helpers import (
    CATALOG_NAME,
    catalog_properties,
    check_metadata_complete,
    child_env,
    create_table,
    local_files,
    make_catalog,
    scan,
)
from merge_helpers import dict_rows_set, oracle, row_set, rows_of

from memsafe_dagster.datasets import merge_iceberg
from memsafe_dagster.datasets.iceberg import (
    IcebergMergeResult,
    iceberg_dataset,
    remove_orphan_files,
)
from memsafe_dagster.datasets.merge import STRATEGIES
from memsafe_dagster.memory import MemoryPressureError

SCHEMA = pa.schema([("k", pa.int64()), ("v", pa.string()), ("x", pa.float64())])
ROOM = {"merge_min_system_available_mb": 0}


def rows(lo: int, hi: int, tag: str = "t") -> pa.Table:
    keys = list(range(lo, hi))
    return pa.table(
        {"k": keys, "v": [f"{tag}{k}" for k in keys], "x": [k / 2 for k in keys]}, schema=SCHEMA
    )


@pytest.fixture
def catalog(tmp_path: Path):
    return make_catalog(tmp_path / "cat")


@pytest.fixture
def table(catalog):
    """Three data files: keys 0-99, 100-199, 200-299."""
    return create_table(catalog, "ns.t", SCHEMA, [rows(0, 100), rows(100, 200), rows(200, 300)])


def warehouse_files(table) -> set[str]:
    return local_files(table.location().removeprefix("file://"))


def expect(table_before: pa.Table, source: pa.Table, strategy: str, keys=("k",)):
    columns = table_before.column_names
    out, counts = oracle(
        rows_of(table_before, columns), rows_of(source, columns), strategy, list(keys)
    )
    return dict_rows_set(out, columns), counts


# -- semantics and the snapshot ----------------------------------------------------------------


def test_upsert_commits_one_overwrite_snapshot_and_keeps_the_previous_one(table) -> None:
    before = scan(table)
    parent = table.current_snapshot().snapshot_id
    n_snapshots = len(table.snapshots())
    files_before = {t.file.file_path for t in table.scan().plan_files()}
    source = pa.concat_tables([rows(150, 160, "s"), rows(1000, 1010, "s")])
    expected, counts = expect(before, source, "upsert")

    result = merge_iceberg(source, table, "upsert", "k", **ROOM)

    assert isinstance(result, IcebergMergeResult)
    assert len(table.snapshots()) == n_snapshots + 1, "one snapshot per merge"
    snapshot = table.current_snapshot()
    assert snapshot.snapshot_id == result.snapshot_id
    assert snapshot.parent_snapshot_id == parent == result.parent_snapshot_id
    assert snapshot.summary.operation.value == "overwrite"
    summary = snapshot.summary.additional_properties
    assert summary["memsafe.strategy"] == "upsert"
    assert summary["memsafe.key-columns"] == "k"
    assert summary["memsafe.merge-id"] == result.txn
    assert (summary["memsafe.inserted"], summary["memsafe.updated"]) == ("10", "10")
    assert summary["deleted-data-files"] == "1", "only the file holding keys 100-199"
    assert summary["total-records"] == "310"
    assert (result.inserted, result.updated, result.deleted) == (
        counts["inserted"],
        counts["updated"],
        counts["deleted"],
    )
    assert result.files_rewritten == 1 and result.files_untouched == 2
    assert row_set(scan(table)) == expected
    # The other two files are still the same files, untouched.
    live = {t.file.file_path for t in table.scan().plan_files()}
    assert len(files_before & live) == 2
    # Time travel: the previous snapshot reads exactly as before.
    assert row_set(scan(table, parent)) == row_set(before)
    check_metadata_complete(table)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_matches_the_oracle(table, strategy: str) -> None:
    before = scan(table)
    source = pa.concat_tables([rows(90, 110, "s"), rows(500, 505, "s")])
    expected, counts = expect(before, source, strategy)
    result = merge_iceberg(source, table, strategy, ["k"], **ROOM)
    assert row_set(scan(table)) == expected
    assert (result.inserted, result.updated, result.deleted) == (
        counts["inserted"],
        counts["updated"],
        counts["deleted"],
    )
    assert result.target_count_after == int(
        table.current_snapshot().summary.additional_properties["total-records"]
    )


def test_written_files_carry_the_table_schema_with_field_ids(table) -> None:
    merge_iceberg(rows(0, 50, "s"), table, key_columns="k", **ROOM)
    ids = {f.name: f.field_id for f in table.schema().fields}
    written = [
        t.file.file_path
        for t in table.scan().plan_files()
        if t.file.file_path.rsplit("/", 1)[-1].startswith(("ins-", "part-"))
    ]
    assert written
    for uri in written:
        schema = pq.read_schema(uri.removeprefix("file://"))
        assert {f.name: int(f.metadata[b"PARQUET:field_id"]) for f in schema} == ids
        assert schema.field("v").type == pa.large_string()
    # pyiceberg's own reader agrees, and so does the memsafe snapshot dataset.
    assert row_set(iceberg_dataset(table).to_table()) == row_set(scan(table))


def test_insert_only_merge_is_an_append_snapshot(table) -> None:
    result = merge_iceberg(rows(300, 310, "s"), table, "insert", "k", **ROOM)
    assert result.files_removed == 0 and result.inserted == 10
    assert table.current_snapshot().summary.operation.value == "append"


def test_empty_table_without_a_snapshot_gets_its_first(catalog) -> None:
    table = catalog.create_table("ns.empty", schema=SCHEMA)
    assert table.current_snapshot() is None
    result = merge_iceberg(rows(0, 5, "s"), table, "upsert", "k", **ROOM)
    assert result.inserted == 5 and result.parent_snapshot_id is None
    assert row_set(scan(table)) == row_set(rows(0, 5, "s"))


def test_a_merge_that_changes_nothing_commits_nothing(table) -> None:
    parent = table.current_snapshot().snapshot_id
    result = merge_iceberg(rows(1000, 1005, "s"), table, "update", "k", **ROOM)
    assert not result.committed and result.snapshot_id is None
    assert table.current_snapshot().snapshot_id == parent
    assert len(table.snapshots()) == 3


def test_composite_string_keys_and_nested_columns_survive_a_rewrite(catalog) -> None:
    schema = pa.schema(
        [
            ("region", pa.string()),
            ("id", pa.int32()),
            ("tags", pa.list_(pa.string())),
            ("point", pa.struct([("x", pa.int64()), ("y", pa.float64())])),
        ]
    )

    def part(lo: int, hi: int, tag: str) -> pa.Table:
        return pa.Table.from_pylist(
            [
                {
                    "region": f"r{i % 3}",
                    "id": i,
                    "tags": [tag, str(i)],
                    "point": {"x": i, "y": i / 4},
                }
                for i in range(lo, hi)
            ],
            schema=schema,
        )

    table = create_table(catalog, "ns.nested", schema, [part(0, 30, "t"), part(30, 60, "t")])
    before = scan(table)
    source = pa.concat_tables([part(25, 35, "s"), part(90, 92, "s")])
    columns = ["region", "id", "tags", "point"]
    expected, _ = oracle(
        rows_of(before, columns), rows_of(source, columns), "upsert", ["region", "id"]
    )
    result = merge_iceberg(source, table, "upsert", ["region", "id"], **ROOM)
    assert result.updated == 10 and result.inserted == 2
    got = rows_of(scan(table), columns)
    key = lambda r: (r["region"], r["id"])  # noqa: E731
    assert sorted(got, key=key) == sorted(expected, key=key)


def test_columns_added_and_promoted_after_old_files_were_written(catalog) -> None:
    from pyiceberg.types import LongType, StringType

    schema = pa.schema([("k", pa.int64()), ("n", pa.int32())])
    old = pa.table({"k": [1, 2, 3], "n": pa.array([10, 20, 30], pa.int32())}, schema=schema)
    table = create_table(catalog, "ns.evolved", schema, [old])
    with table.update_schema() as update:
        update.add_column("note", StringType())
        update.update_column("n", LongType())
    source = pa.table({"k": [2], "n": [2**40], "note": ["new"]})
    merge_iceberg(source, table, "upsert", "k", **ROOM)
    got = sorted(scan(table).to_pylist(), key=lambda r: r["k"])
    assert got == [
        {"k": 1, "n": 10, "note": None},
        {"k": 2, "n": 2**40, "note": "new"},
        {"k": 3, "n": 30, "note": None},
    ]


def test_key_columns_default_to_the_identifier_fields(catalog) -> None:
    from pyiceberg.schema import Schema
    from pyiceberg.types import LongType, NestedField, StringType

    schema = Schema(
        NestedField(1, "k", LongType(), required=True),
        NestedField(2, "v", StringType(), required=False),
        identifier_field_ids=[1],
    )
    table = catalog.create_table("ns.ident", schema=schema)
    table.append(pa.table({"k": [1, 2], "v": ["a", "b"]}).cast(schema.as_arrow()))
    merge_iceberg(pa.table({"k": [2, 3], "v": ["B", "C"]}), "ns.ident", catalog=catalog, **ROOM)
    assert sorted(scan(table.refresh()).to_pylist(), key=lambda r: r["k"]) == [
        {"k": 1, "v": "a"},
        {"k": 2, "v": "B"},
        {"k": 3, "v": "C"},
    ]
    # A required key column still refuses nulls in the source.
    with pytest.raises(ValueError, match="key column 'k'"):
        merge_iceberg(pa.table({"k": [None], "v": ["x"]}, schema=SCHEMA.remove(2)), table)


def test_no_identifier_fields_and_no_key_columns_is_refused(table) -> None:
    with pytest.raises(ValueError, match="key_columns is required"):
        merge_iceberg(rows(0, 1), table)


# -- pruning ----------------------------------------------------------------------------------


def test_manifest_bounds_prune_files_whose_footers_are_never_read(
    catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    from memsafe_dagster.datasets.iceberg import target as iceberg_target

    table = create_table(
        catalog, "ns.wide", SCHEMA, [rows(i * 100, i * 100 + 100) for i in range(10)]
    )
    reads: list[str] = []
    real = iceberg_target.target_file

    def counting(afs, path, *args, **kwargs):
        reads.append(path)
        return real(afs, path, *args, **kwargs)

    monkeypatch.setattr(iceberg_target, "target_file", counting)
    result = merge_iceberg(rows(550, 560, "s"), table, "update", "k", **ROOM)
    assert result.updated == 10 and result.files_rewritten == 1
    assert result.files_pruned == 9
    # The touched file's footer, and at most one more (the engine sizes row groups from the
    # first file's footer): never the ten a directory merge reads.
    assert 1 <= len(set(reads)) <= 2, reads
    assert any("550" not in p for p in reads)
    # Positive control: a source spread over every file reads every footer.
    reads.clear()
    spread = pa.concat_tables([rows(i * 100 + 5, i * 100 + 6, "s") for i in range(10)])
    assert merge_iceberg(spread, table, "update", "k", **ROOM).files_rewritten == 10
    assert len(set(reads)) == 10


def test_row_group_statistics_prune_inside_a_touched_file(catalog) -> None:
    table = catalog.create_table(
        "ns.groups", schema=SCHEMA, properties={"write.parquet.row-group-limit": "100"}
    )
    table.append(rows(0, 1000))
    assert (
        pq.read_metadata(
            next(iter(table.scan().plan_files())).file.file_path.removeprefix("file://")
        ).num_row_groups
        == 10
    )
    result = merge_iceberg(rows(420, 425, "s"), table, "update", "k", **ROOM)
    assert result.updated == 5 and result.row_groups_pruned == 9


# -- errors leave the table as it was ---------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "kwargs", "message"),
    [
        (pa.table({"v": ["a"]}), {}, "key column"),
        (pa.table({"k": ["1"], "v": ["a"], "x": [1.0]}), {}, "'k'"),
        (pa.table({"k": pa.array([None], pa.int64()), "v": ["a"], "x": [1.0]}), {}, "null"),
        (pa.table({"k": [5, 5], "v": ["a", "b"], "x": [1.0, 2.0]}), {}, "duplicate"),
        (pa.table({"k": [5], "v": ["a"], "x": [1.0], "extra": [1]}), {}, "extra"),
        (pa.table({"k": [5], "v": ["a"]}), {}, "lacks column"),
        (rows(0, 3), {"key_columns": "x"}, "floating point"),
        (rows(0, 3), {"key_columns": "nope"}, "nope"),
        (rows(0, 3), {"strategy": "replace"}, "strategy must be one of"),
    ],
)
def test_bad_input_is_a_clear_error_and_the_table_keeps_its_snapshot(
    table, source: pa.Table, kwargs: dict, message: str
) -> None:
    snapshot = table.current_snapshot().snapshot_id
    files = warehouse_files(table)
    call = {"strategy": "upsert", "key_columns": "k", **kwargs}
    with pytest.raises(ValueError, match=message):
        merge_iceberg(source, table, **call, **ROOM)
    table.refresh()
    assert table.current_snapshot().snapshot_id == snapshot
    assert warehouse_files(table) == files, "a refused merge must leave no file behind"


def test_a_source_failing_midway_deletes_every_file_the_merge_wrote(table) -> None:
    snapshot = table.current_snapshot().snapshot_id
    files = warehouse_files(table)

    def batches():
        for i in range(5):
            yield rows(1000 + i * 100, 1100 + i * 100, "s").to_batches()[0]
        raise RuntimeError("upstream broke")

    with pytest.raises(RuntimeError, match="upstream broke"):
        # A one-pass source of an upsert is written while it is read: files exist by now.
        merge_iceberg(batches(), table, "upsert", "k", target_file_rows=100, **ROOM)
    assert table.refresh().current_snapshot().snapshot_id == snapshot
    assert warehouse_files(table) == files


def test_memory_emergency_leaves_the_table_unchanged(table) -> None:
    snapshot = table.current_snapshot().snapshot_id
    files = warehouse_files(table)
    with pytest.raises(MemoryPressureError):
        merge_iceberg(rows(0, 100, "s"), table, "upsert", "k", merge_max_process_memory_mb=1)
    assert table.refresh().current_snapshot().snapshot_id == snapshot
    assert warehouse_files(table) == files


def test_a_failed_commit_deletes_the_new_data_files(table, monkeypatch) -> None:
    from memsafe_dagster.datasets.iceberg import target as iceberg_target

    snapshot = table.current_snapshot().snapshot_id
    files = warehouse_files(table)

    def failing(self, info):
        self._data_files()  # the files exist and are valid data files ...
        raise OSError("catalog unreachable before the commit")  # ... but nothing committed

    monkeypatch.setattr(iceberg_target.IcebergWrite, "commit", failing)
    with pytest.raises(OSError, match="unreachable"):
        merge_iceberg(rows(50, 150, "s"), table, "upsert", "k", **ROOM)
    assert table.refresh().current_snapshot().snapshot_id == snapshot
    assert warehouse_files(table) == files


# -- refusals ---------------------------------------------------------------------------------


def test_partitioned_tables_are_refused_naming_the_partition(catalog) -> None:
    from pyiceberg.partitioning import PartitionField, PartitionSpec
    from pyiceberg.transforms import IdentityTransform

    table = catalog.create_table("ns.parted", schema=SCHEMA)
    with table.update_spec() as spec:
        spec.add_identity("v")
    table.append(rows(0, 3))
    del PartitionField, PartitionSpec, IdentityTransform
    snapshot = table.current_snapshot().snapshot_id
    with pytest.raises(ValueError, match=r"partitioned by v \(identity\)"):
        merge_iceberg(rows(0, 2, "s"), table, "upsert", "k", **ROOM)
    assert table.refresh().current_snapshot().snapshot_id == snapshot
    # Reading a partitioned table is fine (the partition column is in the files).
    assert row_set(iceberg_dataset(table).to_table()) == row_set(rows(0, 3))


def test_renamed_columns_are_refused(table) -> None:
    with table.update_schema() as update:
        update.rename_column("v", "w")
    with pytest.raises(ValueError, match="was called 'v'"):
        merge_iceberg(rows(0, 2).rename_columns(["k", "w", "x"]), table, "upsert", "k", **ROOM)
    with pytest.raises(ValueError, match="was called 'v'"):
        iceberg_dataset(table)


def test_a_column_dropped_and_added_again_is_refused(table) -> None:
    from pyiceberg.types import StringType

    with table.update_schema() as update:
        update.delete_column("v")
    with table.update_schema() as update:
        update.add_column("v", StringType())
    with pytest.raises(ValueError, match="dropped and added again"):
        merge_iceberg(rows(0, 2), table, "upsert", "k", **ROOM)


# -- catalogs and tables ----------------------------------------------------------------------


def test_a_table_identifier_needs_an_existing_table(catalog) -> None:
    with pytest.raises(ValueError, match="does not exist in catalog"):
        merge_iceberg(rows(0, 1), "ns.missing", "upsert", "k", catalog=catalog)
    with pytest.raises(ValueError, match=r"namespace\.table"):
        merge_iceberg(rows(0, 1), "nodot", "upsert", "k", catalog=catalog)
    with pytest.raises(TypeError, match="pyiceberg Table or an identifier"):
        merge_iceberg(rows(0, 1), 42, "upsert", "k", catalog=catalog)


_BY_NAME = """
import json
import pyarrow as pa
from memsafe_dagster.datasets import merge_iceberg
source = pa.table({{"k": [7, 1000], "v": ["n", "m"], "x": [0.5, 1.5]}})
r = merge_iceberg(source, "ns.t", "upsert", "k", catalog={name!r},
                  merge_min_system_available_mb=0)
print(json.dumps([r.updated, r.inserted, r.snapshot_id]))
"""


@pytest.mark.parametrize("how", ["environment", "pyiceberg.yaml"])
def test_a_catalog_name_is_resolved_by_pyicebergs_configuration(
    tmp_path: Path, table, how: str
) -> None:
    props = catalog_properties(tmp_path / "cat")
    env = child_env()
    env.pop("PYICEBERG_HOME", None)
    if how == "environment":
        # PYICEBERG_CATALOG__<NAME>__<KEY>: "_" in a name becomes "-", so the name has none.
        name = "envcat"
        env.update({f"PYICEBERG_CATALOG__ENVCAT__{k.upper()}": v for k, v in props.items()})
    else:
        name = "yamlcat"
        home = tmp_path / "home"
        home.mkdir()
        (home / ".pyiceberg.yaml").write_text(
            "catalog:\n  yamlcat:\n" + "".join(f"    {k}: {v}\n" for k, v in props.items())
        )
        env["PYICEBERG_HOME"] = str(home)
    # The SQL catalog keys its tables by catalog name: register the table under this name.
    from pyiceberg.catalog.sql import SqlCatalog

    named = SqlCatalog(name, **props)
    named.create_namespace("ns")
    named.register_table("ns.t", table.metadata_location)
    run = subprocess.run(
        [sys.executable, "-c", _BY_NAME.format(name=name)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    updated, inserted, snapshot_id = json.loads(run.stdout.strip().splitlines()[-1])
    assert (updated, inserted) == (1, 1)
    reloaded = SqlCatalog(name, **props).load_table("ns.t")
    assert reloaded.current_snapshot().snapshot_id == snapshot_id
    # Positive control: an unknown name is a clear error, not a silent default.
    bad = subprocess.run(
        [sys.executable, "-c", _BY_NAME.format(name="nosuchcat")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode != 0 and "could not be loaded" in bad.stderr


def test_importing_memsafe_does_not_import_pyiceberg() -> None:
    code = (
        "import sys, memsafe_dagster, memsafe_dagster.datasets, memsafe_dagster.datasets.iceberg\n"
        "from memsafe_dagster.datasets import merge_iceberg, merge_dataset\n"
        "from memsafe_dagster import build_merge_asset, ChunkedParquetIOManager\n"
        "before = sorted(m for m in sys.modules if m.split('.')[0] == 'pyiceberg')\n"
        "import pyarrow as pa\n"
        "try:\n"
        "    merge_iceberg(pa.table({'k': [1]}), 'ns.t', 'upsert', 'k', catalog='none')\n"
        "except Exception:\n"
        "    pass\n"
        "after = 'pyiceberg' in sys.modules\n"
        "print(before, after)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], env=child_env(), capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-2000:]
    # Nothing before a merge is asked for; the positive control shows the probe sees it.
    assert run.stdout.strip() == "[] True"


# -- orphans ----------------------------------------------------------------------------------


def test_remove_orphan_files_deletes_only_old_unreferenced_files(table) -> None:
    merge_iceberg(rows(150, 160, "s"), table, "upsert", "k", **ROOM)
    data = Path(table.location().removeprefix("file://"))
    old = time.time() - 7200
    stale_data = data / "data" / "ins-20200101T000000-deadbeef0000-00000.parquet"
    pq.write_table(rows(0, 1), stale_data)
    stale_manifest = data / "metadata" / "0000-orphan-m0.avro"
    stale_manifest.write_bytes(b"junk")
    young = data / "data" / "ins-inflight-00000.parquet"
    pq.write_table(rows(0, 1), young)
    for p in (stale_data, stale_manifest):
        os.utime(p, (old, old))
    referenced_before = warehouse_files(table) - {str(stale_data), str(stale_manifest), str(young)}

    listed = remove_orphan_files(table, older_than=dt.timedelta(hours=1), dry_run=True)
    assert sorted(listed) == sorted([str(stale_data), str(stale_manifest)])
    assert stale_data.exists(), "dry_run deletes nothing"
    removed = remove_orphan_files(table, older_than=dt.timedelta(hours=1))
    assert removed == listed
    assert not stale_data.exists() and not stale_manifest.exists()
    assert young.exists(), "files younger than the grace period are kept"
    assert warehouse_files(table) == referenced_before | {str(young)}
    check_metadata_complete(table)
    for snapshot in table.snapshots():  # every snapshot still reads
        scan(table, snapshot.snapshot_id)
    with pytest.raises(ValueError, match="older_than"):
        remove_orphan_files(table, older_than=-1)  # type: ignore[arg-type]


def test_new_files_follow_the_tables_data_location(catalog, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    table = create_table(
        catalog,
        "ns.located",
        SCHEMA,
        [rows(0, 10)],
        properties={"write.data.path": f"file://{elsewhere}"},
    )
    merge_iceberg(rows(5, 15, "s"), table, "upsert", "k", **ROOM)
    written = [t.file.file_path for t in table.scan().plan_files() if "ins-" in t.file.file_path]
    assert written and all(p.startswith(f"file://{elsewhere}/") for p in written)
    assert CATALOG_NAME  # the helper's catalog name is shared with the child processes
