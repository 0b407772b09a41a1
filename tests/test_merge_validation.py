"""Validation before anything is published, lossless casts, key types, and source kinds.

Every refusal is a ValueError naming the column or problem, and leaves the target
byte-for-byte as it was (state directory included).
"""

from __future__ import annotations

import datetime as dt
import decimal
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from merge_helpers import data_files, read_dataset, row_set, snapshot, write_files

from memsafe_dagster.datasets import ChunkStream
from memsafe_dagster.datasets.merge import merge_dataset

FS = fsspec.filesystem("file")
TARGET_SCHEMA = pa.schema(
    [
        pa.field("id", pa.int64()),
        pa.field("name", pa.string()),
        pa.field("score", pa.float64()),
        pa.field("required", pa.int32(), nullable=False),
    ]
)


def _target(tmp_path: Path) -> Path:
    target = tmp_path / "target"
    table = pa.table(
        {
            "id": list(range(10)),
            "name": [f"t{i}" for i in range(10)],
            "score": [float(i) for i in range(10)],
            "required": pa.array(range(10), pa.int32()),
        },
        schema=TARGET_SCHEMA,
    )
    write_files(target, [table.slice(0, 5), table.slice(5)])
    return target


def _merge(source, target: Path, **kwargs):
    kwargs.setdefault("key_columns", ["id"])
    kwargs.setdefault("merge_min_system_available_mb", 0)
    return merge_dataset(source, str(target), fs=FS, **kwargs)


REFUSALS = {
    "null key": (
        pa.table({"id": [1, None], "name": ["a", "b"], "required": pa.array([1, 2], pa.int32())}),
        {"missing_columns": "null"},
        "key column 'id' has 1 null",
    ),
    "duplicate keys": (
        pa.table({"id": [3, 4, 3], "required": pa.array([1, 2, 3], pa.int32())}),
        {"missing_columns": "null"},
        "duplicate key",
    ),
    "key missing in source": (
        pa.table({"name": ["a"], "required": pa.array([1], pa.int32())}),
        {},
        "key column(s) ['id'] missing from the source",
    ),
    "key missing in target": (
        pa.table({"id": [1], "other": ["x"], "required": pa.array([1], pa.int32())}),
        {"key_columns": ["other"]},
        "key column(s) ['other'] missing from the target",
    ),
    "string key into int key": (
        pa.table({"id": ["1"], "required": pa.array([1], pa.int32())}),
        {"missing_columns": "null"},
        "column 'id': source type string cannot be cast to the target's int64",
    ),
    "lossy key cast": (
        pa.table({"id": pa.array([1.5]), "required": pa.array([1], pa.int32())}),
        {},
        "key column 'id' of the source is floating point",
    ),
    "overflowing value cast": (
        pa.table({"id": [1], "required": pa.array([2**40], pa.int64())}),
        {"missing_columns": "null"},
        "column 'required': cannot cast source int64 to the target's int32 without loss",
    ),
    "string into float column": (
        pa.table({"id": [1], "score": ["high"], "required": pa.array([1], pa.int32())}),
        {"missing_columns": "null"},
        "column 'score': source type string cannot be cast",
    ),
    "unknown extra column": (
        pa.table({"id": [1], "surprise": [1], "required": pa.array([1], pa.int32())}),
        {},
        "source column(s) ['surprise'] do not exist in the target",
    ),
    "missing nullable column": (
        pa.table({"id": [1], "required": pa.array([1], pa.int32())}),
        {},
        "source lacks column(s) ['name', 'score'] of the target dataset",
    ),
    "bad missing_columns policy": (
        pa.table({"id": [1]}),
        {"missing_columns": "zero"},
        "missing_columns must be one of ['error', 'null']",
    ),
    "missing non-nullable column": (
        pa.table({"id": [1], "name": ["a"]}),
        {"missing_columns": "null"},
        "column 'required' is missing from the source and is not nullable",
    ),
    "nulls in a non-nullable column": (
        pa.table({"id": [1], "required": pa.array([None], pa.int32())}),
        {"missing_columns": "null"},
        "column 'required' has 1 null value(s) but is not nullable",
    ),
    "unknown strategy": (
        pa.table({"id": [1]}),
        {"strategy": "merge_all"},
        "unknown merge strategy",
    ),
    "unknown option": (pa.table({"id": [1]}), {"row_groups": 5}, "unknown merge option(s)"),
    "bad duplicate policy": (
        pa.table({"id": [1]}),
        {"on_duplicate_keys": "any"},
        "on_duplicate_keys must be one of",
    ),
    "bad chunk size": (
        pa.table({"id": [1]}),
        {"merge_chunk_size_rows": 0},
        "merge_chunk_size_rows",
    ),
    "no key columns": (pa.table({"id": [1]}), {"key_columns": []}, "key_columns must be"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
@pytest.mark.parametrize("strategy", ["upsert", "insert"])
def test_refusals_name_the_problem_and_leave_the_target_unchanged(
    tmp_path: Path, case: str, strategy: str
) -> None:
    source, kwargs, message = REFUSALS[case]
    kwargs = {"strategy": strategy, **kwargs}
    target = _target(tmp_path)
    before = snapshot(target)
    with pytest.raises(ValueError) as err:
        _merge(source, target, **kwargs)
    assert message in str(err.value)
    assert snapshot(target) == before


@pytest.mark.parametrize("strategy", ["upsert", "update", "full_merge", "insert"])
def test_a_source_without_a_column_does_not_wipe_it(tmp_path: Path, strategy: str) -> None:
    """Replacing a row with a source row that lacks a column would null its value: refused
    unless nulls are asked for, and then they are written."""
    target = _target(tmp_path)
    source = pa.table(
        {"id": [3, 42], "name": ["new3", "new42"], "required": pa.array([30, 420], pa.int32())}
    )
    before = snapshot(target)
    with pytest.raises(ValueError, match=r"source lacks column\(s\) \['score'\]"):
        _merge(source, target, strategy=strategy)
    assert snapshot(target) == before
    _merge(source, target, strategy=strategy, missing_columns="null")
    scores = dict(
        zip(
            read_dataset(target).column("id").to_pylist(),
            read_dataset(target).column("score").to_pylist(),
            strict=True,
        )
    )
    if strategy in ("upsert", "update", "full_merge"):
        assert scores[3] is None
    if strategy in ("upsert", "full_merge", "insert"):
        assert scores[42] is None
    if strategy != "full_merge":
        assert scores[4] == 4.0


def test_refusal_on_a_missing_target_leaves_no_directory(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="null"):
        _merge(pa.table({"id": [1, None]}), tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_int32_source_keys_match_int64_target_keys(tmp_path: Path) -> None:
    """The seed's library duplicated these rows; here they replace the target's."""
    target = _target(tmp_path)
    source = pa.table(
        {
            "id": pa.array([3, 42], pa.int32()),
            "name": ["new3", "new42"],
            "required": pa.array([30, 420], pa.int16()),
        }
    )
    result = _merge(source, target, missing_columns="null")
    out = read_dataset(target)
    assert out.num_rows == 11 and result.updated == 1 and result.inserted == 1
    assert sorted(out.column("id").to_pylist()) == sorted([*range(10), 42])
    by_id = dict(zip(out.column("id").to_pylist(), out.column("name").to_pylist(), strict=True))
    assert by_id[3] == "new3" and by_id[42] == "new42"
    for path in data_files(target):
        assert pq.read_schema(path).equals(TARGET_SCHEMA), path
    # The missing nullable column was filled with nulls, as asked.
    row = out.filter(pa.compute.equal(out.column("id"), 42)).to_pylist()[0]
    assert row["score"] is None and row["required"] == 420


def test_every_written_file_keeps_the_target_schema_and_row_groups(tmp_path: Path) -> None:
    target = _target(tmp_path)
    source = pa.table(
        {
            "required": pa.array(range(60, 120), pa.int8()),
            "id": pa.array(range(4, 64), pa.int16()),
            "name": pa.array([f"s{i}" for i in range(60)], pa.large_string()),
        }
    )
    _merge(source, target, row_group_size=16, target_file_rows=32, missing_columns="null")
    for path in data_files(target):
        assert pq.read_schema(path).equals(TARGET_SCHEMA), path
        md = pq.read_metadata(path)
        sizes = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
        if path.name.startswith(("ins-", "part-2")):
            assert all(s == 16 for s in sizes[:-1]) and sizes[-1] <= 16, (path.name, sizes)
            assert md.num_rows <= 32
    assert read_dataset(target).num_rows == 64


def test_files_with_extra_columns_are_refused(tmp_path: Path) -> None:
    target = _target(tmp_path)
    pq.write_table(
        pa.table({"id": [99], "required": pa.array([1], pa.int32()), "extra": [1]}),
        target / "zz.parquet",
    )
    before = snapshot(target)
    with pytest.raises(ValueError, match=r"has column\(s\) \['extra'\]"):
        _merge(pa.table({"id": [1], "required": pa.array([1], pa.int32())}), target)
    assert snapshot(target) == before


def test_directory_partitioned_targets_are_refused(tmp_path: Path) -> None:
    target = tmp_path / "t"
    write_files(target / "year=2024", [pa.table({"id": [1]})])
    with pytest.raises(ValueError, match="partitioned by directory"):
        _merge(pa.table({"id": [1]}), target)


def _source_kinds(table: pa.Table, tmp_path: Path) -> dict:
    path = tmp_path / "source"
    write_files(path, [table.slice(0, 3), table.slice(3)])
    return {
        "table": lambda: table,
        "record_batch": lambda: table.to_batches()[0] if table.num_rows else table,
        "reader": lambda: pa.RecordBatchReader.from_batches(table.schema, table.to_batches(2)),
        "dataset": lambda: ds.dataset(str(path)),
        "path": lambda: str(path),
        "url": lambda: f"file://{path}",
        "generator": lambda: (b for b in table.to_batches(max_chunksize=2)),
        "list_of_tables": lambda: [table.slice(0, 2), table.slice(2)],
        "chunkstream": lambda: ChunkStream.from_batches(iter(table.to_batches(2))),
    }


@pytest.mark.parametrize(
    "kind",
    [
        "table",
        "reader",
        "dataset",
        "path",
        "url",
        "generator",
        "list_of_tables",
        "chunkstream",
    ],
)
@pytest.mark.parametrize("strategy", ["upsert", "update", "insert"])
def test_every_source_kind_gives_the_same_result(tmp_path: Path, kind: str, strategy: str) -> None:
    source = pa.table(
        {"id": [2, 4, 11, 12, 13], "required": pa.array([20, 40, 110, 120, 130], pa.int32())}
    )
    results = []
    for variant in ("reference", kind):
        base = tmp_path / variant
        target = _target(base)
        data = source if variant == "reference" else _source_kinds(source, base)[kind]()
        r = _merge(data, target, strategy=strategy, missing_columns="null")
        results.append((row_set(read_dataset(target)), r.inserted, r.updated, r.source_count))
    assert results[0] == results[1]


KEY_TYPES = {
    "int8": pa.array([1, -2, 3, 4], pa.int8()),
    "uint64": pa.array([1, 2**63 + 5, 3, 2**64 - 1], pa.uint64()),
    "date32": pa.array([dt.date(2024, 1, d) for d in (1, 2, 3, 4)], pa.date32()),
    "timestamp_ns": pa.array([1, 2, 3, 10**18], pa.timestamp("ns")),
    "timestamp_tz": pa.array([1, 2, 3, 4], pa.timestamp("us", tz="UTC")),
    "decimal": pa.array([decimal.Decimal(f"{i}.25") for i in (1, 2, 3, -4)], pa.decimal128(12, 2)),
    "binary": pa.array([b"a", b"\x00b", b"", b"zz"], pa.binary()),
    "large_string": pa.array(["a", "é", "", "z" * 300], pa.large_string()),
    "dictionary": pa.array(["a", "b", "c", "d"]).dictionary_encode(),
}


@pytest.mark.parametrize("name", sorted(KEY_TYPES))
def test_key_types(tmp_path: Path, name: str) -> None:
    keys = KEY_TYPES[name]
    target = tmp_path / "t"
    write_files(target, [pa.table({"k": keys.slice(0, 3), "v": [1, 2, 3]})])
    source = pa.table({"k": keys.slice(1), "v": [20, 30, 40]})
    result = _merge(source, target, key_columns=["k"])
    out = read_dataset(target)
    assert result.updated == 2 and result.inserted == 1 and out.num_rows == 4

    def plain(values: pa.Array | pa.ChunkedArray) -> list:
        # Nanosecond timestamps become Python objects only through pandas: compare their ints.
        return (
            values.cast(pa.int64()) if pa.types.is_timestamp(values.type) else values
        ).to_pylist()

    got = dict(zip(plain(out.column("k")), out.column("v").to_pylist(), strict=True))
    expected = dict(zip(plain(keys), [1, 20, 30, 40], strict=True))
    assert got == expected


def test_the_source_columns_may_come_in_any_order(tmp_path: Path) -> None:
    target = _target(tmp_path)
    source = pa.table(
        {"required": pa.array([7], pa.int32()), "score": [0.5], "name": ["x"], "id": [5]}
    )
    _merge(source, target)
    by_id = {r["id"]: r for r in read_dataset(target).to_pylist()}
    assert by_id[5] == {"id": 5, "name": "x", "score": 0.5, "required": 7}


@pytest.mark.parametrize(
    ("strategy", "expected"),
    [
        ("upsert", {None: 2, 1: "s1", 2: "t2", 3: "s3"}),
        ("delete", {None: 2, 2: "t2"}),
        ("full_merge", {1: "s1", 3: "s3"}),
    ],
)
def test_null_keys_in_the_target_never_match(tmp_path: Path, strategy: str, expected: dict) -> None:
    target = tmp_path / "t"
    write_files(target, [pa.table({"id": [None, 1, 2, None], "v": ["n1", "t1", "t2", "n2"]})])
    source = pa.table({"id": [1, 3], "v": ["s1", "s3"]})
    _merge(source, target, strategy=strategy)
    rows = read_dataset(target).to_pylist()
    nulls = sum(1 for r in rows if r["id"] is None)
    got = {r["id"]: r["v"] for r in rows if r["id"] is not None}
    if nulls:
        got[None] = nulls
    assert got == expected
