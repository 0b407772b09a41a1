"""The key codec: exact codes keep the keys' order, hashed codes are equal exactly for equal keys
(on samples), and the helpers that decode and bound codes agree with it."""

import datetime as dt

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from memsafe_dagster.datasets.keys import (
    KeyCodec,
    check_key_type,
    column_hash,
    decode_exact,
    exact_code_of,
    exact_codes,
    is_exact_type,
    key_array,
    mix,
    unmix,
)

RNG = np.random.default_rng(12)

# Built when a test runs: an Arrow array built at import time would load pandas into every test
# process (tens of MB of RSS that the memory tests would see).
EXACT = {
    "int64": lambda: pa.array(RNG.integers(-(2**62), 2**62, 2_000), pa.int64()),
    "int8": lambda: pa.array(RNG.integers(-128, 128, 2_000), pa.int8()),
    "uint64": lambda: pa.array(RNG.integers(0, 2**63, 2_000, dtype=np.uint64) * 2, pa.uint64()),
    "date32": lambda: pa.array(RNG.integers(-20_000, 20_000, 2_000), pa.int32()).cast(pa.date32()),
    "timestamp": lambda: pa.array(RNG.integers(-(2**50), 2**50, 2_000)).cast(pa.timestamp("us")),
    "time64": lambda: pa.array(RNG.integers(0, 86_400 * 10**6, 2_000)).cast(pa.time64("us")),
    "duration": lambda: pa.array(RNG.integers(-(10**12), 10**12, 2_000)).cast(pa.duration("ms")),
}


@pytest.mark.parametrize("name", sorted(EXACT))
def test_exact_codes_keep_the_keys_order(name: str) -> None:
    values = EXACT[name]()
    assert is_exact_type(values.type)
    codes = exact_codes(values)
    assert codes.dtype == np.uint64
    # Sorting by code sorts by key: the index answers range questions with its sorted codes.
    ordered = pc.take(values, pa.array(np.argsort(codes, kind="stable")))
    assert ordered.equals(pc.take(values, pc.sort_indices(values)))
    assert len(np.unique(codes)) == len(pc.unique(values))


def test_a_hash_is_the_control_it_does_not_keep_order() -> None:
    values = EXACT["int64"]()
    hashed = column_hash(values)
    ordered = pc.take(values, pa.array(np.argsort(hashed, kind="stable")))
    assert not ordered.equals(pc.take(values, pc.sort_indices(values)))


def test_exact_code_of_and_decode_exact_agree_with_exact_codes() -> None:
    for t, raw in (
        (pa.int64(), [-(2**63), -1, 0, 1, 2**63 - 1]),
        (pa.uint64(), [0, 1, 2**64 - 1]),
        (pa.int16(), [-(2**15), 7, 2**15 - 1]),
    ):
        codes = exact_codes(pa.array(raw, t))
        assert [exact_code_of(v, t) for v in raw] == list(codes)
        assert [decode_exact(c, t) for c in codes] == raw
    stamps = pa.array(
        [dt.datetime(1969, 7, 20, 20, 17), dt.datetime(2024, 2, 29)], pa.timestamp("s")
    )
    assert [decode_exact(c, stamps.type) for c in exact_codes(stamps)] == stamps.to_pylist()


def test_mix_is_a_bijection() -> None:
    x = RNG.integers(0, 2**64 - 1, 10_000, dtype=np.uint64)
    assert np.array_equal(unmix(mix(x)), x)
    assert len(np.unique(mix(x))) == len(np.unique(x))


def composite(a: list, b: list, *, large: bool = False) -> pa.Table:
    s = pa.large_string() if large else pa.string()
    return pa.table({"region": pa.array(a, s), "n": pa.array(b, pa.int32())})


def test_hashed_codes_are_equal_for_equal_keys_whatever_their_layout() -> None:
    words = [f"customer-{i}-{'x' * (i % 37)}" for i in range(5_000)]
    nums = list(range(5_000))
    base = composite(words, nums)
    codec = KeyCodec(base.schema, ["region", "n"])
    assert not codec.exact
    codes, valid = codec.codes(codec.key_arrays(base))
    assert valid is None
    perm = RNG.permutation(5_000)
    # Another row order, chunking, string width and dictionary encoding of the same keys.
    other = composite([words[i] for i in perm], [nums[i] for i in perm], large=True)
    other = pa.Table.from_batches(other.to_batches(max_chunksize=333))
    other = other.set_column(0, "region", pc.dictionary_encode(other.column("region")))
    again, _ = codec.codes(codec.key_arrays(other))
    assert np.array_equal(again, codes[perm])


def test_hashed_codes_differ_for_different_keys() -> None:
    words = [f"k{i}" for i in range(50_000)]
    table = composite(words, [i % 3 for i in range(50_000)])
    codec = KeyCodec(table.schema, ["region", "n"])
    codes, _ = codec.codes(codec.key_arrays(table))
    assert len(np.unique(codes)) == 50_000  # no collision on this sample
    # Swapping the components, or moving bytes between them, is another key.
    pairs = pa.table({"a": ["x", "y", "xy", ""], "b": ["y", "x", "", "xy"]})
    codec = KeyCodec(pairs.schema, ["a", "b"])
    assert len(set(codec.codes(codec.key_arrays(pairs))[0].tolist())) == 4


def test_a_single_integer_key_is_exact_and_nulls_are_reported() -> None:
    table = pa.table({"id": pa.array([5, None, 7], pa.int64()), "s": ["a", "b", None]})
    exact = KeyCodec(table.schema, ["id"])
    assert exact.exact
    codes, valid = exact.codes(exact.key_arrays(table))
    assert list(valid) == [True, False, True]
    assert codes[0] == exact_code_of(5, pa.int64())
    _codes, valid = KeyCodec(table.schema, ["id", "s"]).codes(
        KeyCodec(table.schema, ["id", "s"]).key_arrays(table)
    )
    assert list(valid) == [True, False, False]


def test_key_array_combines_chunks_and_decodes_dictionaries() -> None:
    column = pa.chunked_array([["a", "b"], ["a"]]).dictionary_encode()
    flat = key_array(column)
    assert isinstance(flat, pa.Array) and flat.type == pa.string()
    assert flat.to_pylist() == ["a", "b", "a"]


@pytest.mark.parametrize(
    ("t", "message"),
    [
        (pa.float64(), "floating point"),
        (pa.dictionary(pa.int8(), pa.float32()), "floating point"),
        (pa.list_(pa.int64()), "cannot be a key"),
        (pa.struct([("a", pa.int64())]), "cannot be a key"),
        (pa.null(), "cannot be a key"),
    ],
)
def test_types_that_cannot_identify_a_row_are_refused(t: pa.DataType, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_key_type("k", t, "source")


@pytest.mark.parametrize(
    "t", [pa.int64(), pa.string(), pa.large_binary(), pa.decimal128(12, 2), pa.date32()]
)
def test_types_that_can_be_keys_pass(t: pa.DataType) -> None:
    check_key_type("k", t, "target")
    assert len(column_hash(pa.array([], t))) == 0
