"""Every strategy into an Iceberg table against the oracle, on random key sets (hypothesis),
and sequences of merges: each one a single snapshot, every earlier snapshot still reading as
it did.

Integer, string and composite keys; empty tables (no snapshot), one or several data files;
empty sources; duplicate source keys with first/last; tiny row groups and file sizes so
rolling, compaction and the small-survivors path run too.
"""

from __future__ import annotations

import itertools
import tempfile
from pathlib import Path

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from iceberg_helpers import check_metadata_complete, make_catalog, scan
from merge_helpers import dict_rows_set, oracle, row_set

from memsafe_dagster.datasets import merge_iceberg
from memsafe_dagster.datasets.merge import STRATEGIES

KEY_KINDS = {
    "int": (["k"], pa.schema([("k", pa.int64()), ("v", pa.int64()), ("s", pa.string())])),
    "str": (["k"], pa.schema([("k", pa.string()), ("v", pa.int64()), ("s", pa.string())])),
    "composite": (
        ["k", "k2"],
        pa.schema([("k", pa.int32()), ("k2", pa.string()), ("v", pa.int64()), ("s", pa.string())]),
    ),
}
_NAMES = itertools.count()


def _key_value(kind: str, i: int) -> dict:
    if kind == "int":
        return {"k": i * 7919 - 100}
    if kind == "str":
        return {"k": f"key-with-a-long-shared-prefix-{i:03d}" if i % 3 else f"k{i}"}
    return {"k": i % 5, "k2": f"p{i // 5}"}


def _rows(kind: str, ids: list[int], tag: str, nulls: bool) -> list[dict]:
    out = []
    for n, i in enumerate(ids):
        row = _key_value(kind, i)
        row["v"] = i * 10 + (1 if tag == "s" else 0) + n * 1000
        row["s"] = None if nulls and n % 4 == 0 else f"{tag}{i}"
        out.append(row)
    return out


@st.composite
def merge_cases(draw):
    kind = draw(st.sampled_from(sorted(KEY_KINDS)))
    domain = draw(st.integers(min_value=1, max_value=40))
    target_ids = draw(st.lists(st.integers(0, domain), unique=True, max_size=30))
    n_files = draw(st.integers(min_value=0, max_value=3)) if target_ids else 0
    source_ids = draw(st.lists(st.integers(0, domain), max_size=25))
    on_duplicate = draw(st.sampled_from(["error", "first", "last"]))
    if on_duplicate == "error":
        source_ids = list(dict.fromkeys(source_ids))
    nulls = draw(st.booleans())
    return {
        "kind": kind,
        "target": _rows(kind, target_ids, "t", nulls),
        "files": n_files,
        "source": _rows(kind, source_ids, "s", nulls),
        "strategy": draw(st.sampled_from(STRATEGIES)),
        "on_duplicate": on_duplicate,
        "row_group_size": draw(st.sampled_from([2, 3, 1000])),
        "target_file_rows": draw(st.sampled_from([4, 7, 1_000_000])),
    }


def _table(catalog, schema: pa.Schema, target: list[dict], files: int):
    table = catalog.create_table(f"ns.t{next(_NAMES)}", schema=schema)
    if files:
        data = pa.Table.from_pylist(target, schema=schema)
        per = -(-data.num_rows // files)
        for i in range(files):
            part = data.slice(i * per, per)
            if part.num_rows:
                table.append(part.cast(table.schema().as_arrow()))
    return table


def _check(case: dict, catalog) -> None:
    keys, schema = KEY_KINDS[case["kind"]]
    table = _table(catalog, schema, case["target"], case["files"])
    before_id = table.current_snapshot().snapshot_id if table.current_snapshot() else None
    before = scan(table)
    n_snapshots = len(table.snapshots())
    expected, counts = oracle(
        case["target"] if case["files"] else [],
        case["source"],
        case["strategy"],
        keys,
        case["on_duplicate"],
    )
    result = merge_iceberg(
        pa.Table.from_pylist(case["source"], schema=schema),
        table,
        case["strategy"],
        keys,
        on_duplicate_keys=case["on_duplicate"],
        row_group_size=case["row_group_size"],
        target_file_rows=case["target_file_rows"],
        merge_min_system_available_mb=0,
        allow_empty_source=True,
    )
    got = scan(table)
    assert row_set(got.select(schema.names)) == dict_rows_set(expected, schema.names)
    assert (result.inserted, result.updated, result.deleted) == (
        counts["inserted"],
        counts["updated"],
        counts["deleted"],
    )
    assert result.target_count_after == got.num_rows
    assert len(table.snapshots()) == n_snapshots + (1 if result.committed else 0)
    if result.committed:
        assert table.current_snapshot().snapshot_id == result.snapshot_id
        assert table.current_snapshot().parent_snapshot_id == before_id
    if before_id is not None:
        assert row_set(scan(table, before_id)) == row_set(before)
    check_metadata_complete(table)


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(case=merge_cases())
def test_every_strategy_matches_the_oracle(case: dict) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        _check(case, make_catalog(Path(tmp)))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    steps=st.lists(
        st.tuples(
            st.sampled_from(STRATEGIES),
            st.lists(st.integers(0, 60), unique=True, max_size=20),
        ),
        min_size=2,
        max_size=6,
    )
)
def test_merge_sequences_keep_every_snapshot_readable(steps) -> None:
    keys, schema = KEY_KINDS["int"]
    with tempfile.TemporaryDirectory() as tmp:
        catalog = make_catalog(Path(tmp))
        table = _table(catalog, schema, _rows("int", list(range(0, 40, 3)), "t", False), 2)
        current = _rows("int", list(range(0, 40, 3)), "t", False)
        history = {table.current_snapshot().snapshot_id: dict_rows_set(current, schema.names)}
        for n, (strategy, ids) in enumerate(steps):
            source = _rows("int", ids, f"s{n}-", False)
            result = merge_iceberg(
                pa.Table.from_pylist(source, schema=schema),
                table,
                strategy,
                keys,
                target_file_rows=7,
                merge_min_system_available_mb=0,
                allow_empty_source=True,
            )
            current, _ = oracle(current, source, strategy, keys)
            if result.committed:
                history[result.snapshot_id] = dict_rows_set(current, schema.names)
            assert row_set(scan(table)) == dict_rows_set(current, schema.names)
        for snapshot_id, expected in history.items():
            assert row_set(scan(table, snapshot_id)) == expected, snapshot_id
        check_metadata_complete(table)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_string_keys_with_truncated_manifest_bounds_never_miss_a_match(strategy: str) -> None:
    """Keys sharing a prefix longer than the 16 characters Iceberg keeps in its bounds."""
    keys, schema = KEY_KINDS["str"]
    with tempfile.TemporaryDirectory() as tmp:
        catalog = make_catalog(Path(tmp))
        target = _rows("str", [i for i in range(30) if i % 3], "t", False)
        table = _table(catalog, schema, target, 3)
        source = _rows("str", [1, 2, 40, 41], "s", False)
        expected, _ = oracle(target, source, strategy, keys)
        merge_iceberg(
            pa.Table.from_pylist(source, schema=schema),
            table,
            strategy,
            keys,
            merge_min_system_available_mb=0,
        )
        assert row_set(scan(table)) == dict_rows_set(expected, schema.names)
