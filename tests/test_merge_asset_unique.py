"""verify_unique_keys, the merge asset's unique_keys check: exact counts for every key type
whether the keys are grouped in memory or spilled by hash bucket, and memory that does not grow
with the target."""

import decimal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from memsafe_dagster.datasets.keys import KeyCodec, mix
from memsafe_dagster.datasets.unique import key_hash, verify_unique_keys
from memsafe_dagster.memory.cgroup_cap import run_measured

RNG = np.random.default_rng(7)


def column(kind: str, n: int) -> pa.Array:
    """``n`` values of ``kind`` drawn from a small domain (so keys repeat), with nulls."""
    codes = RNG.integers(0, n // 2, n)
    mask = RNG.random(n) < 0.02
    if kind == "int64":
        return pa.array(codes, pa.int64(), mask=mask)
    if kind == "int32":
        return pa.array(codes.astype(np.int32), pa.int32(), mask=mask)
    if kind == "uint64":
        return pa.array(codes.astype(np.uint64) + np.uint64(2**63), pa.uint64(), mask=mask)
    if kind == "float64":
        return pa.array(codes / 4, pa.float64(), mask=mask)
    if kind == "bool":
        return pa.array(codes % 2 == 0, pa.bool_(), mask=mask)
    if kind in ("string", "large_string", "dictionary"):
        values = pa.array([f"key-{c}-{'x' * (c % 5)}" for c in codes], mask=mask)
        if kind == "large_string":
            return values.cast(pa.large_string())
        return values.dictionary_encode() if kind == "dictionary" else values
    if kind == "binary":
        return pa.array([c.tobytes() for c in codes.astype(np.int64)], pa.binary(), mask=mask)
    if kind == "timestamp":
        return pa.array(codes * 1_000, pa.timestamp("ms", tz="UTC"), mask=mask)
    if kind == "date32":
        return pa.array(codes.astype(np.int32), pa.int32(), mask=mask).cast(pa.date32())
    if kind == "decimal":
        values = [decimal.Decimal(int(c)) / 100 for c in codes]
        return pa.array(values, pa.decimal128(12, 2), mask=mask)
    raise AssertionError(kind)


def oracle(table: pa.Table, keys: list[str]) -> tuple[int, int, int]:
    """(duplicate keys, rows holding them, rows with a null key), counted in Python."""
    rows = list(zip(*(table[k].to_pylist() for k in keys), strict=True))
    nulls = sum(1 for r in rows if any(v is None for v in r))
    counts = Counter(rows)
    repeated = {k: c for k, c in counts.items() if c > 1}
    return len(repeated), sum(repeated.values()), nulls


def write_target(path: Path, table: pa.Table, files: int = 3) -> None:
    path.mkdir(parents=True, exist_ok=True)
    per = -(-table.num_rows // files)
    for i in range(files):
        pq.write_table(table.slice(i * per, per), path / f"part-{i}.parquet", row_group_size=700)


KINDS = [
    "int64",
    "int32",
    "uint64",
    "float64",
    "bool",
    "string",
    "large_string",
    "dictionary",
    "binary",
    "timestamp",
    "date32",
    "decimal",
]


@pytest.mark.parametrize("kind", KINDS)
def test_in_memory_and_spilled_counts_match_python(tmp_path: Path, kind: str) -> None:
    table = pa.table({"k": column(kind, 4_000), "payload": pa.array(range(4_000))})
    write_target(tmp_path / "t", table)
    expected = oracle(table, ["k"])
    assert expected[0] > 0  # the domain makes keys repeat
    in_memory = verify_unique_keys(str(tmp_path / "t"), "k", memory_budget_mb=64)
    # Booleans are bit-packed: a few hundred bytes of keys.
    budget = 0.0001 if kind == "bool" else 0.005
    spilled = verify_unique_keys(
        str(tmp_path / "t"), "k", memory_budget_mb=budget, chunk_size_rows=500
    )
    assert in_memory.buckets == 1 and spilled.buckets > 8
    for report in (in_memory, spilled):
        got = (report.duplicate_keys, report.duplicate_rows, report.null_key_rows)
        assert got == expected, report
        assert report.rows == 4_000 and not report.passed
    if kind != "bool":  # two values (and null) cannot spread over more than three buckets
        assert spilled.largest_bucket_rows < 4_000 / 4


def test_composite_keys_and_examples(tmp_path: Path) -> None:
    n = 3_000
    table = pa.table(
        {
            "region": column("string", n),
            "id": column("int32", n),
            "v": pa.array(range(n)),
        }
    )
    write_target(tmp_path / "t", table)
    expected = oracle(table, ["region", "id"])
    spilled = verify_unique_keys(
        str(tmp_path / "t"), ["region", "id"], memory_budget_mb=0.002, chunk_size_rows=256
    )
    assert (spilled.duplicate_keys, spilled.duplicate_rows, spilled.null_key_rows) == expected
    assert 0 < len(spilled.examples) <= 5
    for example in spilled.examples:
        assert set(example["key"]) == {"region", "id"} and example["count"] > 1


def test_unique_keys_pass_and_an_empty_target_passes(tmp_path: Path) -> None:
    table = pa.table({"id": pa.array(range(10_000), pa.int64())})
    write_target(tmp_path / "t", table)
    for budget in (64, 0.01):
        report = verify_unique_keys(str(tmp_path / "t"), "id", memory_budget_mb=budget)
        assert report.passed and report.rows == 10_000 and report.duplicate_keys == 0
    empty = verify_unique_keys(str(tmp_path / "missing"), "id")
    assert empty.passed and empty.rows == 0


def test_a_missing_key_column_is_named(tmp_path: Path) -> None:
    write_target(tmp_path / "t", pa.table({"id": [1, 2]}), files=1)
    with pytest.raises(ValueError, match=r"key column\(s\) \['customer'\] missing"):
        verify_unique_keys(str(tmp_path / "t"), "customer")


def test_the_hash_is_the_same_for_equal_keys_in_any_chunk_or_slice() -> None:
    values = pa.array([f"v{i % 50}" * (i % 4) for i in range(1_000)])
    table = pa.table({"s": values, "i": pa.array([i % 50 for i in range(1_000)], pa.int64())})
    whole = key_hash(table, ["s", "i"])
    for start, length in ((0, 10), (333, 200), (999, 1)):
        sliced = key_hash(table.slice(start, length), ["s", "i"])
        assert (sliced == whole[start : start + length]).all()
    chunked = pa.Table.from_batches(table.to_batches(max_chunksize=77))
    assert (key_hash(chunked, ["s", "i"]) == whole).all()
    # Equal keys collide on purpose; distinct keys spread over the buckets.
    ids = pa.table({"id": pa.array(range(100_000), pa.int64())})
    buckets = np.bincount((key_hash(ids, ["id"]) >> np.uint64(58)).astype(np.int64), minlength=64)
    assert buckets.max() < 2 * buckets.mean()


def test_key_hash_is_the_merges_key_code_mixed() -> None:
    """The check buckets by the merge's own key codes: exact for one integer-like key, hashed
    otherwise, then mixed so exact codes spread too."""
    table = pa.table(
        {
            "id": pa.array(range(-500, 500), pa.int64()),
            "region": pa.array([f"r{i % 7}" for i in range(1_000)]),
        }
    )
    for keys in (["id"], ["region", "id"], ["region"]):
        codec = KeyCodec(table.schema, keys)
        codes, valid = codec.codes(codec.key_arrays(table))
        assert valid is None
        assert (key_hash(table, keys) == mix(codes)).all(), keys
    # int32 and int64 keys of equal value (files of one target may differ) share a bucket.
    narrow = table.set_column(0, "id", table["id"].cast(pa.int32()))
    assert (key_hash(narrow, ["region", "id"]) == key_hash(table, ["region", "id"])).all()


def test_every_occurrence_of_a_key_lands_in_one_bucket() -> None:
    n = 20_000
    ids = RNG.integers(0, n // 4, n)
    table = pa.table(
        {
            "region": pa.array([f"region-{i % 13}" for i in ids], mask=RNG.random(n) < 0.01),
            "id": pa.array(ids, pa.int64(), mask=RNG.random(n) < 0.01),
        }
    )
    keys = ["region", "id"]
    shift = np.uint64(64 - 5)  # 32 buckets
    bucket_of: dict[tuple, int] = {}
    whole = (key_hash(table, keys) >> shift).astype(np.int64)
    rows = list(zip(table["region"].to_pylist(), table["id"].to_pylist(), strict=True))
    for key, bucket in zip(rows, whole.tolist(), strict=True):
        assert bucket_of.setdefault(key, bucket) == bucket, key
    # The same keys hashed in another slicing land where they did.
    for start in range(0, n, 3_001):
        part = (key_hash(table.slice(start, 3_001), keys) >> shift).astype(np.int64)
        assert (part == whole[start : start + 3_001]).all()
    # Rows with a null in either key column share one bucket; the rest spread.
    nulls = [i for i, r in enumerate(rows) if None in r]
    assert nulls and len({int(whole[i]) for i in nulls}) == 1
    assert np.bincount(whole, minlength=32).max() < 2 * n / 32


def test_spilled_counts_of_planted_duplicates_match_python(tmp_path: Path) -> None:
    """Positive control: duplicates planted across files and chunks are all found when the keys
    are spilled into many buckets, with composite string keys, exactly as Python counts them."""
    n = 6_000
    region = [f"region-{'x' * (i % 9)}-{i % 11}" for i in range(n)]
    table = pa.table({"region": region, "id": pa.array(range(n), pa.int64())})
    planted = table.take(pa.array([5, 17, 17, 4_000, 5_999, 2_500]))  # 17 three times in all
    target = pa.concat_tables([table.slice(0, 3_000), planted, table.slice(3_000)])
    write_target(tmp_path / "t", target, files=4)
    expected = oracle(target, ["region", "id"])
    assert expected == (5, 11, 0)
    report = verify_unique_keys(
        str(tmp_path / "t"), ["region", "id"], memory_budget_mb=0.004, chunk_size_rows=400
    )
    assert report.buckets > 16
    assert (report.duplicate_keys, report.duplicate_rows, report.null_key_rows) == expected
    assert report.rows == target.num_rows and not report.passed
    found = {(e["key"]["region"], e["key"]["id"]): e["count"] for e in report.examples}
    assert found[(region[17], 17)] == 3 and len(found) == 5


GENERATE = """
import sys
import numpy as np, pyarrow as pa, pyarrow.compute as pc, pyarrow.parquet as pq
root, rows = sys.argv[1], int(sys.argv[2])
per = rows // 4
for f in range(4):
    ids = pa.array(np.arange(f * per, (f + 1) * per))
    keys = pc.binary_join_element_wise("customer-", pc.cast(ids, pa.string()), "")
    pq.write_table(pa.table({"k": keys, "n": ids}), f"{root}/p{f}.parquet")
"""

CHECK = """
import sys
from memsafe_dagster.merge_asset import verify_unique_keys
report = verify_unique_keys(sys.argv[1], ["k"], memory_budget_mb=8)
print(report.rows, report.buckets, report.duplicate_keys)
"""


@pytest.mark.slow
def test_memory_does_not_grow_with_the_target(tmp_path: Path) -> None:
    """Child processes check 1M and 4M string keys with an 8 MB budget: the peak RSS (the
    kernel's VmHWM) grows by less than 15 %, while the keys alone grow by about 70 MB."""
    peaks = {}
    for rows in (1_000_000, 4_000_000):
        target = tmp_path / f"t{rows}"
        target.mkdir()
        # Generated in a child too: this process's allocator would keep the memory.
        made = subprocess.run(
            [sys.executable, "-c", GENERATE, str(target), str(rows)], capture_output=True, text=True
        )
        assert made.returncode == 0, made.stderr[-2000:]
        result = run_measured([sys.executable, "-c", CHECK, str(target)], timeout_s=120)
        assert result.returncode == 0, result.stderr[-2000:]
        count, buckets, duplicates = map(int, result.stdout.split())
        assert (count, duplicates) == (rows, 0) and buckets > 1
        peaks[rows] = result.peak_rss_mb
    assert peaks[4_000_000] < 1.15 * peaks[1_000_000], peaks
