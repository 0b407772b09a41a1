"""The merge's key index (``merge.index.KeyIndex``) on its own: lookups against a Python set,
duplicate policies, hashed keys verified against their values (a forced collision), range
pruning, and split indexes (``lo``/``hi``) that see only their share of the codes."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from memsafe_dagster.datasets.keys import KeyCodec, exact_code_of
from memsafe_dagster.datasets.merge.index import DuplicateKeyError, KeyIndex


def index_of(table: pa.Table, keys: list[str], on_duplicate: str = "error"):
    codec = KeyCodec(table.schema, keys)
    codes, _ = codec.codes(codec.key_arrays(table))
    values = None if codec.exact else table.select(keys)
    index, dropped = KeyIndex.build(
        codes,
        None,
        values,
        exact=codec.exact,
        on_duplicate=on_duplicate,
        key_names=keys,
        key_type=table.schema.field(keys[0]).type,
    )
    return codec, index, dropped


def lookup(codec: KeyCodec, index: KeyIndex, table: pa.Table):
    arrays = codec.key_arrays(table)
    codes, valid = codec.codes(arrays)
    return index.lookup(codes, valid, arrays)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_int_lookups_match_a_python_set(seed: int) -> None:
    rng = np.random.default_rng(seed)
    source = rng.choice(10**9, size=5_000, replace=False).astype(np.int64)
    probe = np.concatenate([rng.choice(source, 2_000), rng.integers(0, 10**9, 3_000)])
    codec, index, dropped = index_of(pa.table({"k": source}), ["k"])
    assert index.exact and len(dropped) == 0
    rows, entries = lookup(codec, index, pa.table({"k": probe}))
    members = set(source.tolist())
    assert sorted(rows.tolist()) == [i for i, v in enumerate(probe.tolist()) if v in members]
    # Each hit names the entry holding the same key (positions are source rows).
    assert (source[index.positions[entries]] == probe[rows]).all()


def test_composite_string_keys_match_and_keep_source_positions() -> None:
    source = pa.table({"a": ["x", "y", "x", "z"], "b": [1, 1, 2, 3]})
    codec, index, _ = index_of(source, ["a", "b"])
    assert not index.exact
    probe = pa.table({"a": ["x", "x", "z", "q", "y"], "b": [2, 9, 3, 1, 1]})
    rows, entries = lookup(codec, index, probe)
    hits = sorted(zip(rows.tolist(), index.positions[entries].tolist(), strict=True))
    assert hits == [(0, 2), (2, 3), (4, 1)]


def test_a_hash_collision_is_verified_against_the_key_values() -> None:
    source = pa.table({"k": ["alpha", "beta"]})
    codec, index, _ = index_of(source, ["k"])
    # A target key whose code equals an index entry's but whose value differs: forced by
    # giving "gamma" the code of "alpha". Only the value check can reject it.
    arrays = codec.key_arrays(pa.table({"k": ["gamma", "beta"]}))
    codes, valid = codec.codes(arrays)
    alpha_code, _ = codec.codes(codec.key_arrays(pa.table({"k": ["alpha"]})))
    codes = codes.copy()
    codes[0] = alpha_code[0]
    rows, entries = index.lookup(codes, valid, arrays)
    assert rows.tolist() == [1] and index.positions[entries].tolist() == [1]


@pytest.mark.parametrize(("policy", "kept_positions"), [("first", [0, 2, 3]), ("last", [1, 2, 4])])
def test_duplicate_policies_keep_the_first_or_last_occurrence(
    policy: str, kept_positions: list[int]
) -> None:
    source = pa.table({"k": [7, 7, 8, 9, 9]})
    _, index, dropped = index_of(source, ["k"], on_duplicate=policy)
    assert sorted(index.positions.tolist()) == kept_positions
    assert sorted(dropped.tolist()) == sorted(set(range(5)) - set(kept_positions))


def test_duplicates_are_an_error_naming_an_example() -> None:
    with pytest.raises(
        DuplicateKeyError, match=r"1 row\(s\) repeat an earlier key, e.g. \{'k': 'b'\}"
    ):
        index_of(pa.table({"k": ["a", "b", "b"]}), ["k"])
    _, index, dropped = index_of(pa.table({"k": ["a", "b"]}), ["k"])  # control: no duplicate
    assert len(index) == 2 and len(dropped) == 0


def test_range_pruning_on_exact_and_string_keys() -> None:
    _, index, _ = index_of(pa.table({"k": pa.array([10, 20, 30], pa.int64())}), ["k"])

    def bound(lo: int, hi: int):
        return [(exact_code_of(lo, pa.int64()), exact_code_of(hi, pa.int64()))]

    assert index.may_contain_range(bound(15, 25))
    assert not index.may_contain_range(bound(21, 29))
    assert index.may_contain_range([None])  # no statistics: cannot prune
    _, strings, _ = index_of(pa.table({"k": ["apple", "melon"]}), ["k"])
    assert strings.may_contain_range([("banana", "mango")]) is False
    assert strings.may_contain_range([("lemon", "peach")]) is True


def test_a_split_index_sees_only_its_code_range() -> None:
    source = pa.table({"k": pa.array(range(100), pa.int64())})
    codec = KeyCodec(source.schema, ["k"])
    codes, _ = codec.codes(codec.key_arrays(source))
    cut = int(np.sort(codes)[50])
    halves = []
    for lo, hi in ((0, cut), (cut, None)):
        mask = codes >= np.uint64(lo)
        if hi is not None:
            mask &= codes < np.uint64(hi)
        index, _ = KeyIndex.build(
            codes[mask],
            np.flatnonzero(mask),
            None,
            exact=True,
            on_duplicate="error",
            key_names=["k"],
            key_type=pa.int64(),
            lo=lo,
            hi=hi,
        )
        rows, _ = index.lookup(codes, None)
        halves.append(set(rows.tolist()))
    assert halves[0].isdisjoint(halves[1]) and halves[0] | halves[1] == set(range(100))
    assert len(halves[0]) == 50
