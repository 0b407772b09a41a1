"""Byte-based sizing in process: footer row widths, rows per byte budget, the refusal message,
chunks of wide rows, filters on the pulled Parquet path, and merge progress counted in rows."""

import itertools

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from memsafe_dagster.datasets import PyarrowDatasetIO, process_in_chunks
from memsafe_dagster.datasets.reader import (
    ColumnChunkTooLargeError,
    check_column_chunks,
    filter_columns,
    row_bytes,
    rows_for_bytes,
)
from memsafe_dagster.memory import MemoryMonitor


def wide_file(path, rows: int, width: int = 1000, row_group_size: int | None = None) -> None:
    ids = np.arange(rows, dtype=np.int64)
    payload = pc.binary_join_element_wise(
        pc.cast(pa.array(ids), pa.string()), pa.scalar("x" * (width - 8)), "-"
    )
    pq.write_table(pa.table({"id": ids, "payload": payload}), path, row_group_size=row_group_size)


def test_rows_for_bytes_caps_by_bytes_and_keeps_the_row_maximum() -> None:
    assert rows_for_bytes(1_000_000, 1000.0, 100_000) == 1_000
    assert rows_for_bytes(1_000_000, 10.0, 50_000) == 50_000  # the maximum binds
    assert rows_for_bytes(10, 1000.0, 50_000, min_rows=64) == 64
    assert rows_for_bytes(10, 1000.0, 8, min_rows=64) == 8  # never above the maximum
    assert rows_for_bytes(6400, None, 1_000) == 100  # unknown width: 64 bytes a row


def test_row_bytes_come_from_uncompressed_column_chunks(tmp_path) -> None:
    path = tmp_path / "w.parquet"
    wide_file(path, 20_000, width=500)
    md = pq.ParquetFile(path).metadata
    assert 500 < row_bytes(md) < 560
    assert 7 < row_bytes(md, ["id"]) < 12
    assert row_bytes(md, ["payload"]) + row_bytes(md, ["id"]) == pytest.approx(
        row_bytes(md), rel=0.02
    )


def test_a_column_chunk_over_the_budget_is_named_with_its_row_group(tmp_path) -> None:
    path = tmp_path / "w.parquet"
    wide_file(tmp_path / "small.parquet", 300, width=1000)
    wide_file(tmp_path / "large.parquet", 1_000, width=1000)
    parts = [pq.read_table(tmp_path / n) for n in ("small.parquet", "large.parquet")]
    with pq.ParquetWriter(path, parts[0].schema) as writer:
        for part in parts:  # row group 0: 300 rows, row group 1: 1000 rows (~1 MB)
            writer.write_table(part)
    md = pq.ParquetFile(path).metadata
    check_column_chunks(str(path), md, 2 * 2**20)  # positive control: 1 MB fits 2 MB
    with pytest.raises(ColumnChunkTooLargeError) as info:
        check_column_chunks(str(path), md, 512 * 1024)
    message = str(info.value)
    assert str(path) in message and "row group 1 " in message and "'payload'" in message
    assert "column chunk of 1.0MB" in message and "memory budget of 0.5MB" in message


def test_wide_rows_come_in_fewer_rows_than_asked(tmp_path) -> None:
    wide, narrow = tmp_path / "wide.parquet", tmp_path / "narrow.parquet"
    wide_file(wide, 60_000, width=1000)
    pq.write_table(pa.table({"id": np.arange(60_000)}), narrow)
    monitor = MemoryMonitor(max_pyarrow_mb=128, min_system_available_mb=1)
    wide_chunks = [c.num_rows for c in process_in_chunks(str(wide), 50_000, memory_monitor=monitor)]
    assert sum(wide_chunks) == 60_000
    # 128 MB budget, 1/16 per chunk: 8 MB of ~1 KB rows.
    assert max(wide_chunks) <= 8_500
    narrow_chunks = [
        c.num_rows for c in process_in_chunks(str(narrow), 50_000, memory_monitor=monitor)
    ]
    assert narrow_chunks == [50_000, 10_000]  # control: narrow rows get the rows asked for


def test_filters_on_the_pulled_parquet_path(tmp_path) -> None:
    root = tmp_path / "d"
    root.mkdir()
    schema = pa.schema([("x", pa.int64()), ("s", pa.string())])
    pq.write_table(pa.table({"x": [1, 2, 3, 4], "s": ["a", "b", "a", "c"]}), root / "a.parquet")
    pq.write_table(schema.empty_table(), root / "b.parquet")  # an empty file
    pq.write_table(pa.table({"x": [5, 6], "s": ["a", "z"]}), root / "c.parquet")
    assert filter_columns(schema, pc.field("s") == "a") == ["s"]
    dataset = ds.dataset(root)
    # The filter's column is not projected: it is read, used and dropped.
    got = pa.concat_tables(
        process_in_chunks(dataset, columns=["x"], filter=pc.field("s").isin(["a"]))
    )
    assert got.column_names == ["x"] and got.column("x").to_pylist() == [1, 3, 5]
    none = list(process_in_chunks(dataset, filter=pc.field("x") > 100))
    assert sum(c.num_rows for c in none) == 0
    # A filtered Dataset hides its fragments: it is scanned instead.
    filtered = dataset.filter(pc.field("x") > 2)
    rows = pa.concat_tables(process_in_chunks(filtered)).column("x").to_pylist()
    assert sorted(rows) == [3, 4, 5, 6]
    # Per-chunk filters with chunked-array masks over multi-batch chunks.
    for chunk in process_in_chunks(dataset, chunk_size_rows=3):
        mask = pc.greater(chunk.column("x"), 2)
        assert chunk.filter(mask).num_rows == sum(v > 2 for v in chunk.column("x").to_pylist())


def test_merge_progress_counts_rows(tmp_path) -> None:
    target, source = tmp_path / "t", tmp_path / "s"
    target.mkdir()
    source.mkdir()
    for f in range(3):
        ids = np.arange(f * 10_000, (f + 1) * 10_000, dtype=np.int64)
        pq.write_table(pa.table({"id": ids, "v": ids}), target / f"part-{f}.parquet")
    src_ids = np.arange(25_000, 35_000, dtype=np.int64)
    pq.write_table(pa.table({"id": src_ids, "v": -src_ids}), source / "s.parquet")
    calls: list[tuple[int, int]] = []
    result = PyarrowDatasetIO().merge(
        str(source),
        str(target),
        "upsert",
        ["id"],
        merge_chunk_size_rows=2_000,
        merge_progress_callback=lambda done, total: calls.append((done, total)),
    )
    assert result.updated == 5_000 and result.inserted == 5_000
    done = [d for d, _ in calls]
    assert done == sorted(done) and calls[-1][0] == calls[-1][1]
    # Each figure once: the end is reported once, not once per finished phase.
    assert all(a != b for a, b in itertools.pairwise(calls)), calls
    # Rows, not files or batches: the source is ingested and rewritten, the target scanned.
    assert calls[-1][0] >= result.source_count + result.target_count_before
    assert len(calls) > 10
