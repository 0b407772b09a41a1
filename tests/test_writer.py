"""ChunkedParquetWriter on local disk and memory://: atomic publish, exact row groups, rolling."""

import gc
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fs_helpers import Where
from stream_helpers import SCHEMA, table

from memsafe_dagster.datasets import ChunkedParquetWriter, ChunkStream, DatasetLockedError
from memsafe_dagster.datasets.writer import WriteResult


def chunks_of(t: pa.Table, sizes: list[int]) -> list[pa.Table]:
    out, start = [], 0
    for n in sizes:
        out.append(t.slice(start, n))
        start += n
    assert start == t.num_rows
    return out


IRREGULAR = [1, 999, 7, 3_000, 13, 1_480, 500, 4_000]  # 10,000 rows


def test_nothing_appears_until_a_clean_close(where: Where) -> None:
    data = table(10_000)
    with ChunkedParquetWriter(where("out.parquet")) as writer:
        for chunk in chunks_of(data, IRREGULAR):
            writer.write(chunk)
        listing = where.listing()
        assert "out.parquet" not in listing
        assert len(listing) == 1 and listing[0].startswith(".out.parquet.memsafe-")
    assert where.listing() == ["out.parquet"]
    assert where.read("out.parquet").equals(data)
    assert writer.closed


def test_an_exception_leaves_no_file(where: Where) -> None:
    with pytest.raises(RuntimeError, match="boom"):  # noqa: SIM117
        with ChunkedParquetWriter(where("out.parquet")) as writer:
            writer.write(table(1_000))
            raise RuntimeError("boom")
    assert where.listing() == []


def test_an_existing_file_is_replaced_only_on_close(where: Where) -> None:
    old = table(5)
    with ChunkedParquetWriter(where("out.parquet")) as writer:
        writer.write(old)
    new = table(50, 100)
    with ChunkedParquetWriter(where("out.parquet")) as writer:
        writer.write(new)
        assert where.read("out.parquet").equals(old)
    assert where.read("out.parquet").equals(new)
    with pytest.raises(ValueError, match="chunk does not match"):  # noqa: SIM117
        with ChunkedParquetWriter(where("out.parquet")) as writer:
            writer.write(pa.table({"other": [1]}))
            writer.write(table(3))
    assert where.read("out.parquet").equals(new)
    assert where.listing() == ["out.parquet"]


def test_abort_and_a_dropped_writer_leave_nothing(where: Where) -> None:
    writer = ChunkedParquetWriter(where("a.parquet"))
    writer.write(table(10))
    writer.abort()
    with pytest.raises(ValueError, match="aborted"):
        writer.write(table(1))
    dropped = ChunkedParquetWriter(where("b.parquet"))
    dropped.write(table(10))
    assert len(where.listing()) == 1  # the hidden temp file of b
    del dropped
    gc.collect()
    assert where.listing() == []


def test_row_groups_are_exact_whatever_the_chunk_sizes(where: Where) -> None:
    data = table(10_000)
    with ChunkedParquetWriter(where("out.parquet"), row_group_size=1_024) as writer:
        for chunk in chunks_of(data, IRREGULAR):
            writer.write(chunk)
    assert where.row_groups("out.parquet") == [1_024] * 9 + [784]
    assert where.read("out.parquet").equals(data)
    assert writer.result is not None and writer.result.row_groups == 10


def test_without_row_group_size_each_write_is_a_row_group(where: Where) -> None:
    with ChunkedParquetWriter(where("out.parquet")) as writer:
        for chunk in chunks_of(table(10_000), IRREGULAR):
            writer.write(chunk)
        multi = pa.Table.from_batches(table(900, 10_000).to_batches(max_chunksize=100))
        assert multi.column(0).num_chunks == 9
        writer.write(multi)
    assert where.row_groups("out.parquet") == [*IRREGULAR, 900]


def test_rolled_files_are_published_together(where: Where) -> None:
    data = table(10_000)
    writer = ChunkedParquetWriter(where("ds"), row_group_size=1_000, max_rows_per_file=2_500)
    with writer:
        for chunk in chunks_of(data, IRREGULAR):
            writer.write(chunk)
        assert not any(
            p.endswith(".parquet") and not p.startswith("_") for p in where.listing("ds")
        )
    parts = [p for p in where.listing("ds") if not p.startswith("_")]
    assert parts == [f"part-{i:05d}.parquet" for i in range(4)]
    for part in parts:
        assert where.row_groups(f"ds/{part}") == [1_000, 1_000, 500]
    assert not [p for p in where.listing("ds") if p.startswith("_memsafe/commits")]
    assert not [p for p in where.listing("ds") if p.endswith(".parquet") and p.startswith("_")]
    back = pa.concat_tables(where.read(f"ds/{p}") for p in parts)
    assert back.equals(data)
    result = writer.result
    assert result is not None
    assert result.rows == 10_000 and len(result.files) == 4 and result.row_groups == 12
    assert result.mode == "overwrite"


def test_rolled_directory_replaces_its_previous_contents(where: Where) -> None:
    with ChunkedParquetWriter(where("ds"), max_rows_per_file=1_000) as writer:
        writer.write(table(5_000))
    assert len([p for p in where.listing("ds") if not p.startswith("_")]) == 5
    before = {p: where.fs.cat_file(where.p(f"ds/{p}")) for p in where.listing("ds")}
    with pytest.raises(RuntimeError):  # noqa: SIM117
        with ChunkedParquetWriter(where("ds"), max_rows_per_file=1_000) as writer:
            writer.write(table(1_500, 7))
            raise RuntimeError("half-way")
    after = {p: where.fs.cat_file(where.p(f"ds/{p}")) for p in where.listing("ds")}
    assert after == before  # untouched, byte for byte
    with ChunkedParquetWriter(where("ds"), max_rows_per_file=1_000) as writer:
        writer.write(table(1_500, 7))
    parts = [p for p in where.listing("ds") if not p.startswith("_")]
    assert parts == ["part-00000.parquet", "part-00001.parquet"]
    assert writer.result is not None
    assert sorted(writer.result.files_removed) == [
        where.p(f"ds/part-{i:05d}.parquet") for i in range(2, 5)
    ]
    rows = sum(where.read(f"ds/{p}").num_rows for p in parts)
    assert rows == 1_500


@pytest.mark.parametrize("codec", ["snappy", "gzip", "zstd", "lz4", "brotli", "none", None])
def test_compression_codecs(where: Where, codec: str | None) -> None:
    with ChunkedParquetWriter(where("out.parquet"), compression=codec) as writer:
        writer.write(table(2_000))
    with where.fs.open(where.p("out.parquet"), "rb") as fh:
        meta = pq.ParquetFile(fh).metadata
    expected = "UNCOMPRESSED" if codec in ("none", None) else codec.upper()
    assert meta.row_group(0).column(0).compression == expected


def test_compression_level(where: Where) -> None:
    data = pa.table({"s": [f"value-{i % 97}-{i // 1000}" for i in range(50_000)]})
    sizes = {}
    for level in (1, 19):
        with ChunkedParquetWriter(
            where(f"l{level}.parquet"),
            compression="zstd",
            compression_level=level,
            parquet_options={"use_dictionary": False},
        ) as writer:
            writer.write(data)
        sizes[level] = writer.bytes_written
        assert where.read(f"l{level}.parquet").equals(data)
    assert sizes[19] < sizes[1]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"compression": "zip"}, "compression must be one of"),
        ({"compression": "snappy", "compression_level": 3}, "takes no compression_level"),
        ({"compression": "zstd", "compression_level": "high"}, "compression_level must be"),
        ({"row_group_size": 0}, "row_group_size must be a positive integer"),
        ({"max_rows_per_file": -1}, "max_rows_per_file must be a positive integer"),
        ({"schema": {"id": "int64"}}, "schema must be a pyarrow.Schema"),
    ],
)
def test_bad_options_name_the_parameter(where: Where, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ChunkedParquetWriter(where("out.parquet"), **kwargs)
    assert where.listing() == []


def test_schema_casts_losslessly_or_names_the_column(where: Where) -> None:
    writer = ChunkedParquetWriter(where("out.parquet"), schema=SCHEMA)
    narrow = table(10).cast(
        pa.schema([("id", pa.int32()), ("x", pa.float32()), ("status", pa.large_string())])
    )
    writer.write(narrow)
    bad = table(5).set_column(0, "id", pa.array([str(i) for i in range(5)]))
    with pytest.raises(ValueError, match="column 'id': string does not cast losslessly"):
        writer.write(bad)
    with pytest.raises(ValueError, match=r"missing column\(s\) \['status'\]"):
        writer.write(table(5).drop_columns(["status"]))
    reordered = table(5, 10).select(["status", "x", "id"])
    writer.write(reordered)
    result = writer.close()
    back = where.read("out.parquet")
    assert back.schema.equals(SCHEMA)
    assert back.column("id").to_pylist() == list(range(15))
    assert result.rows == 15


def test_first_chunk_sets_the_schema(where: Where) -> None:
    with ChunkedParquetWriter(where("out.parquet")) as writer:
        writer.write(table(3))
        assert writer.schema is not None and writer.schema.equals(SCHEMA)
        with pytest.raises(ValueError, match="column 'x'"):
            writer.write(table(3).set_column(1, "x", pa.array(["a", "b", "c"])))
    assert where.read("out.parquet").num_rows == 3


def test_empty_outputs(where: Where) -> None:
    with ChunkedParquetWriter(where("empty.parquet"), schema=SCHEMA) as writer:
        pass
    back = where.read("empty.parquet")
    assert back.num_rows == 0 and back.schema.equals(SCHEMA)
    with ChunkedParquetWriter(where("nothing.parquet")) as writer:
        pass
    assert writer.result is not None and writer.result.files == [] and writer.result.rows == 0
    assert "nothing.parquet" not in where.listing()


def test_write_stream_sources(where: Where) -> None:
    t = table(3_000)
    with ChunkedParquetWriter(where("out.parquet"), row_group_size=1_000) as writer:
        assert (
            writer.write_stream(ChunkStream.from_batches(t.slice(0, 1_000), chunk_size_rows=300))
            == 1_000
        )
        reader = pa.RecordBatchReader.from_batches(SCHEMA, t.slice(1_000, 1_000).to_batches(70))
        assert writer.write_stream(reader) == 1_000
        assert writer.write_stream(b for b in t.slice(2_000).to_batches(333)) == 1_000
        with pytest.raises(TypeError, match="write_stream"):
            writer.write(reader)  # type: ignore[arg-type]
    assert where.read("out.parquet").equals(t)
    assert where.row_groups("out.parquet") == [1_000] * 3


def test_result_reports_rows_files_bytes(where: Where) -> None:
    writer = ChunkedParquetWriter(where("ds"), max_rows_per_file=400)
    with writer:
        writer.write(table(1_000))
    result = writer.result
    assert isinstance(result, WriteResult)
    assert result.rows == 1_000 and result.chunks == 1
    assert [f.rsplit("/", 1)[1] for f in result.files] == [
        "part-00000.parquet",
        "part-00001.parquet",
        "part-00002.parquet",
    ]
    assert result.bytes == sum(where.fs.size(f) for f in result.files)
    doc = json.loads(json.dumps(result.to_dict()))
    assert doc["schema"] == {"id": "int64", "x": "double", "status": "string"}
    assert writer.close() is result  # closing twice is harmless


def test_path_kind_is_checked(where: Where) -> None:
    where.fs.makedirs(where.p("adir"), exist_ok=True)
    where.fs.pipe_file(where.p("adir/f.parquet"), b"x")
    with pytest.raises(ValueError, match="is a directory"):
        ChunkedParquetWriter(where("adir"))
    with pytest.raises(ValueError, match="is a file, not a dataset directory"):
        ChunkedParquetWriter(where("adir/f.parquet"), max_rows_per_file=10)


def test_to_dataset_append_checks_the_existing_schema(where: Where) -> None:
    with ChunkedParquetWriter.to_dataset(where("ds"), "append") as writer:
        writer.write(table(100))
    narrow = table(10, 100).cast(
        pa.schema([("id", pa.int32()), ("x", pa.float64()), ("status", pa.string())])
    )
    with ChunkedParquetWriter.to_dataset(where("ds"), "append") as writer:
        writer.write(narrow)
    files = [p for p in where.listing("ds") if not p.startswith("_")]
    assert len(files) == 2
    assert all(where.read(f"ds/{f}").schema.equals(SCHEMA) for f in files)
    with pytest.raises(ValueError, match="column 'x': string does not cast losslessly"):  # noqa: SIM117
        with ChunkedParquetWriter.to_dataset(where("ds"), "append") as writer:
            writer.write(table(5).set_column(1, "x", pa.array(list("abcde"))))
    assert [p for p in where.listing("ds") if not p.startswith("_")] == files
    with pytest.raises(ValueError, match="mode must be one of"):
        ChunkedParquetWriter.to_dataset(where("ds"), "upsert")


def test_to_dataset_holds_the_lock_until_close(where: Where) -> None:
    first = ChunkedParquetWriter.to_dataset(where("ds"), "append")
    first.write(table(10))
    second = ChunkedParquetWriter.to_dataset(where("ds"), "append", lock_timeout_s=0.2)
    with pytest.raises(DatasetLockedError, match="locked by another writer"):
        second.write(table(10))
    first.close()
    with ChunkedParquetWriter.to_dataset(where("ds"), "append", lock_timeout_s=0.2) as third:
        third.write(table(10, 10))
    assert (
        sum(where.read(f"ds/{p}").num_rows for p in where.listing("ds") if not p.startswith("_"))
        == 20
    )


def test_missing_parent_directories_are_created(where: Where) -> None:
    with ChunkedParquetWriter(where("a/b/out.parquet")) as writer:
        writer.write(table(10))
    assert where.listing("a") == ["b/out.parquet"]
    with ChunkedParquetWriter(where("c/d/ds"), max_rows_per_file=4) as writer:
        writer.write(table(10))
    assert [p for p in where.listing("c/d/ds") if not p.startswith("_")] == [
        "part-00000.parquet",
        "part-00001.parquet",
        "part-00002.parquet",
    ]
