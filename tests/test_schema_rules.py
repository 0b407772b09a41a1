"""The cast rules: one taxonomy of kinds, the stream's lossless rule inside the merge's same-kind
rule, and values checked whichever rule let the types through."""

import itertools

import pyarrow as pa
import pytest

from memsafe_dagster.checks import (
    non_negative_number,
    non_negative_seconds,
    optional_non_negative_number,
    optional_positive_int,
    optional_positive_number,
    positive_int,
    positive_number,
)
from memsafe_dagster.datasets.schema import (
    cast_column,
    conform_batch,
    is_lossless_cast,
    same_kind,
    type_kind,
)

TYPES = [
    pa.null(),
    pa.bool_(),
    pa.int8(),
    pa.int32(),
    pa.int64(),
    pa.uint64(),
    pa.float32(),
    pa.float64(),
    pa.decimal128(10, 2),
    pa.decimal128(20, 4),
    pa.string(),
    pa.large_string(),
    pa.binary(),
    pa.binary(4),
    pa.timestamp("ms"),
    pa.timestamp("ns", "UTC"),
    pa.date32(),
    pa.date64(),
    pa.time64("us"),
    pa.duration("s"),
    pa.list_(pa.int32()),
    pa.large_list(pa.int64()),
    pa.struct([("a", pa.int32())]),
    pa.map_(pa.string(), pa.int64()),
    pa.dictionary(pa.int8(), pa.string()),
]


def test_every_lossless_cast_stays_within_its_kind() -> None:
    pairs = list(itertools.product(TYPES, TYPES))
    lossless = [(a, b) for a, b in pairs if is_lossless_cast(a, b)]
    assert lossless and all(same_kind(a, b) for a, b in lossless)
    # The merge's rule is wider: a target's types are fixed, so float and decimal narrowing and
    # float -> int are tried, values checked. Integers narrow under both (values checked).
    wider = {(str(a), str(b)) for a, b in pairs if same_kind(a, b) and not is_lossless_cast(a, b)}
    assert ("double", "float") in wider and ("double", "int64") in wider
    assert ("decimal128(20, 4)", "decimal128(10, 2)") in wider
    assert ("binary", "fixed_size_binary[4]") in wider
    assert is_lossless_cast(pa.int64(), pa.int32())
    assert ("string", "int64") not in wider  # across kinds: refused by both


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        (pa.string(), pa.int64()),
        (pa.int64(), pa.string()),
        (pa.bool_(), pa.int8()),
        (pa.timestamp("us"), pa.timestamp("us", "UTC")),
        (pa.date32(), pa.timestamp("s")),
    ],
)
def test_a_cast_across_kinds_is_refused_by_both_rules(src: pa.DataType, dst: pa.DataType) -> None:
    assert type_kind(src) != type_kind(dst)
    assert not same_kind(src, dst) and not is_lossless_cast(src, dst)


def test_values_are_checked_whichever_rule_allowed_the_types() -> None:
    small = pa.array([1, 2**20], pa.int64())
    field = pa.field("n", pa.int32())
    assert cast_column(small, field, lossless=True).type == pa.int32()
    assert cast_column(small, field, lossless=False).type == pa.int32()
    big = pa.array([2**40], pa.int64())
    with pytest.raises(ValueError, match="column 'n': cannot cast int64 to the stream type int32"):
        cast_column(big, field, lossless=True)
    with pytest.raises(ValueError, match="column 'n': cannot cast source int64 to the target's"):
        cast_column(big, field, lossless=False)
    halves = pa.array([1.5], pa.float64())
    with pytest.raises(ValueError, match="does not cast losslessly to the writer's type int32"):
        cast_column(halves, field, lossless=True, what="the writer's")
    with pytest.raises(ValueError, match="without loss"):  # same kind, but 1.5 is no int
        cast_column(halves, field, lossless=False)
    with pytest.raises(ValueError, match="without changing its meaning \\(string vs number\\)"):
        cast_column(pa.array(["1"]), field, lossless=False)


def test_conform_batch_orders_casts_and_checks_nulls() -> None:
    schema = pa.schema([pa.field("id", pa.int64(), nullable=False), ("name", pa.large_string())])
    batch = pa.record_batch({"name": ["a", "b"], "id": pa.array([1, 2], pa.int32())})
    out = conform_batch(batch, schema)
    assert out.schema.equals(schema) and out.column("id").to_pylist() == [1, 2]
    with pytest.raises(ValueError, match="column 'id': 1 null"):
        conform_batch(pa.record_batch({"id": [None], "name": ["a"]}), schema)
    with pytest.raises(ValueError, match=r"missing column\(s\) \['name'\]; unexpected"):
        conform_batch(pa.record_batch({"id": [1], "other": [1]}), schema)


POSITIVE = [
    (positive_int, 3, [0, -1, 2.0, True, "3", None], "n must be a positive integer, got "),
    (optional_positive_int, None, [0, True, "3"], "n must be a positive integer or None, got "),
    (positive_number, 0.5, [0, -1, True, "1"], "n must be a positive number of MB, got "),
    (optional_positive_number, None, [0, "1"], "n must be a positive number of MB or None, got "),
    (non_negative_number, 0, [-0.1, True, None], "n must be a non-negative number of MB, got "),
    (optional_non_negative_number, None, [-1], "n must be a non-negative number of MB, got "),
    (non_negative_seconds, 0.0, [-1, "1", False], "n must be >= 0 seconds, got "),
]


@pytest.mark.parametrize(("check", "good", "bad", "message"), POSITIVE)
def test_checks_return_good_values_and_quote_bad_ones(check, good, bad, message) -> None:
    kwargs = {"unit": "MB"} if "number of MB" in message else {}
    assert check("n", good, **kwargs) == good
    for value in bad:
        with pytest.raises(ValueError) as err:
            check("n", value, **kwargs)
        assert str(err.value) == message + repr(value)
