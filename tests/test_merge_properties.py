"""Every strategy against a simple oracle, on random key sets (hypothesis).

Integer, string and composite keys; zero (missing target), one or several target files;
empty sources; duplicate source keys with first/last; tiny row groups and file sizes so the
rolling writers, compaction and the ``small survivors`` path run too.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from merge_helpers import (
    OracleDuplicate,
    data_files,
    dict_rows_set,
    leftover_state,
    oracle,
    read_dataset,
    row_set,
    rows_of,
    write_files,
)

from memsafe_dagster.datasets.merge import STRATEGIES, MergeResult, merge_dataset

KEY_KINDS = {
    "int": (["k"], pa.schema([("k", pa.int64()), ("v", pa.int64()), ("s", pa.string())])),
    "str": (["k"], pa.schema([("k", pa.string()), ("v", pa.int64()), ("s", pa.string())])),
    "composite": (
        ["k", "k2"],
        pa.schema([("k", pa.int32()), ("k2", pa.string()), ("v", pa.int64()), ("s", pa.string())]),
    ),
}


def _key_value(kind: str, i: int) -> dict:
    if kind == "int":
        return {"k": i * 7919 - 100}
    if kind == "str":
        return {"k": f"key-{i:03d}" if i % 3 else f"k{i}"}
    return {"k": i % 5, "k2": f"p{i // 5}"}


@st.composite
def merge_cases(draw):
    kind = draw(st.sampled_from(sorted(KEY_KINDS)))
    keys, schema = KEY_KINDS[kind]
    domain = draw(st.integers(min_value=1, max_value=40))
    target_ids = draw(st.lists(st.integers(0, domain), unique=True, max_size=30))
    n_files = draw(st.integers(min_value=0, max_value=3)) if target_ids else 0
    source_ids = draw(st.lists(st.integers(0, domain), max_size=25))
    on_duplicate = draw(st.sampled_from(["error", "first", "last"]))
    if on_duplicate == "error":
        source_ids = list(dict.fromkeys(source_ids))
    strategy = draw(st.sampled_from(STRATEGIES))
    row_group_size = draw(st.sampled_from([2, 3, 1000]))
    target_file_rows = draw(st.sampled_from([4, 7, 1_000_000]))
    nulls = draw(st.booleans())

    def rows(ids, tag):
        out = []
        for n, i in enumerate(ids):
            row = _key_value(kind, i)
            row["v"] = i * 10 + (1 if tag == "s" else 0) + n * 1000
            row["s"] = None if nulls and n % 4 == 0 else f"{tag}{i}"
            out.append(row)
        return out

    target_rows = rows(target_ids, "t")
    source_rows = rows(source_ids, "s")
    return {
        "kind": kind,
        "keys": keys,
        "schema": schema,
        "target": target_rows,
        "files": n_files,
        "source": source_rows,
        "strategy": strategy,
        "on_duplicate": on_duplicate,
        "row_group_size": row_group_size,
        "target_file_rows": target_file_rows,
    }


def _run_case(case: dict, root: Path, fs: fsspec.AbstractFileSystem, target: str) -> None:
    schema = case["schema"]
    columns = schema.names
    target_table = pa.Table.from_pylist(case["target"], schema=schema)
    if case["files"]:
        per = -(-target_table.num_rows // case["files"])
        parts = [target_table.slice(i * per, per) for i in range(case["files"])]
        for i, part in enumerate(parts):
            with fs.open(f"{target}/part-{i:05d}.parquet", "wb") as fh:
                pq.write_table(part, fh)
    source = pa.Table.from_pylist(case["source"], schema=schema)
    expected_rows, counts = oracle(
        case["target"] if case["files"] else [],
        case["source"],
        case["strategy"],
        case["keys"],
        case["on_duplicate"],
    )
    result = merge_dataset(
        source,
        target,
        fs=fs,
        strategy=case["strategy"],
        key_columns=case["keys"],
        on_duplicate_keys=case["on_duplicate"],
        row_group_size=case["row_group_size"],
        target_file_rows=case["target_file_rows"],
        merge_min_system_available_mb=0,
        allow_empty_source=True,  # the oracle is the contract's table, empty source included
    )
    files = (
        [p for p in fs.find(target) if "/_" not in p[len(target) :]] if fs.exists(target) else []
    )
    tables = []
    for p in files:
        with fs.open(p, "rb") as fh:
            t = pq.read_table(fh)
        assert t.schema.equals(schema), (p, t.schema)
        with fs.open(p, "rb") as fh:
            md = pq.read_metadata(fh)
        sizes = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
        assert all(s == case["row_group_size"] for s in sizes[:-1]), sizes
        tables.append(t)
    got = pa.concat_tables(tables) if tables else schema.empty_table()
    assert row_set(got) == dict_rows_set(expected_rows, columns)
    assert result.inserted == counts["inserted"]
    assert result.updated == counts["updated"]
    assert result.deleted == counts["deleted"]
    assert result.source_count == len(case["source"])
    assert result.target_count_after == got.num_rows
    assert result.target_count_before == (len(case["target"]) if case["files"] else 0)
    assert leftover_state(target, fs) == [], "state left behind"


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(case=merge_cases())
def test_every_strategy_matches_the_oracle_on_local_disk(case: dict) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        target = f"{tmp}/target"
        fs = fsspec.filesystem("file")
        fs.makedirs(target, exist_ok=True)
        _run_case(case, Path(tmp), fs, target)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=merge_cases())
def test_every_strategy_matches_the_oracle_on_memory_fs(case: dict) -> None:
    fs = fsspec.filesystem("memory")
    target = f"/merge-prop-{id(case)}"
    try:
        _run_case(case, Path("/"), fs, target)
    finally:
        if fs.exists(target):
            fs.rm(target, recursive=True)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_missing_target_is_an_empty_dataset(tmp_path: Path, strategy: str) -> None:
    source = pa.table({"id": [1, 2, 3], "v": ["a", "b", "c"]})
    target = tmp_path / "new"
    result = merge_dataset(
        source,
        str(target),
        fs=fsspec.filesystem("file"),
        strategy=strategy,
        key_columns="id",
        merge_min_system_available_mb=0,
    )
    expected, counts = oracle([], rows_of(source, ["id", "v"]), strategy, ["id"])
    got = read_dataset(target, source.schema)
    assert row_set(got) == dict_rows_set(expected, ["id", "v"])
    assert result.inserted == counts["inserted"] == len(expected)
    if not expected:
        assert not target.exists(), "a no-op merge must not create the target"
    else:
        assert got.schema.equals(source.schema)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_empty_source(tmp_path: Path, strategy: str) -> None:
    target = tmp_path / "t"
    table = pa.table({"id": list(range(10)), "v": [f"t{i}" for i in range(10)]})
    write_files(target, [table.slice(0, 5), table.slice(5)])
    before = {p.name: p.read_bytes() for p in data_files(target)}

    def merge(**options: object) -> MergeResult:
        return merge_dataset(
            table.schema.empty_table(),
            str(target),
            fs=fsspec.filesystem("file"),
            strategy=strategy,
            key_columns=["id"],
            merge_min_system_available_mb=0,
            **options,
        )

    if strategy == "full_merge":
        # An empty upstream is more often a fault than an intent: refused unless allowed.
        with pytest.raises(ValueError, match="would delete all 10 rows"):
            merge()
        assert {p.name: p.read_bytes() for p in data_files(target)} == before
        result = merge(allow_empty_source=True)
    else:
        result = merge()
    after = {p.name: p.read_bytes() for p in data_files(target)}
    if strategy == "full_merge":
        assert after == {} and result.deleted == 10 and result.target_count_after == 0
    else:
        assert after == before and not result.committed
        assert result.target_count_after == 10


def test_oracle_refuses_duplicates_like_the_engine(tmp_path: Path) -> None:
    with pytest.raises(OracleDuplicate):
        oracle([], [{"k": 1}, {"k": 1}], "upsert", ["k"])
