"""ChunkStream: lazy wrapping, exact re-chunking, live chunk size, schema rules, lifecycle."""

import pyarrow as pa
import pytest
from stream_helpers import SCHEMA, ids_of, table

from memsafe_dagster.datasets import ChunkStream
from memsafe_dagster.datasets.schema import is_lossless_cast


def batches(sizes: list[int]) -> list[pa.RecordBatch]:
    out, start = [], 0
    for n in sizes:
        out.extend(table(n, start).to_batches())
        start += n
    return out


def test_rechunks_to_exact_sizes_in_order() -> None:
    stream = ChunkStream.from_batches(batches([7, 3, 25, 1]), chunk_size_rows=10)
    chunks = list(stream)
    assert [c.num_rows for c in chunks] == [10, 10, 10, 6]
    assert ids_of(chunks) == list(range(36))
    assert stream.stats.chunks == 4
    assert stream.stats.rows == 36
    assert stream.stats.largest_chunk_rows == 10


def test_from_batches_is_lazy_and_schema_peeks_only_one_item() -> None:
    pulled: list[int] = []

    def gen():
        for i in range(5):
            pulled.append(i)
            yield table(4, i * 4)

    stream = ChunkStream.from_batches(gen(), chunk_size_rows=4)
    assert pulled == []
    assert stream.schema.equals(SCHEMA)
    assert pulled == [0]
    first = next(stream)
    assert first.num_rows == 4 and pulled == [0]
    assert ids_of(stream) == list(range(4, 20))


def test_chunk_size_change_applies_to_the_next_chunk() -> None:
    stream = ChunkStream.from_batches(table(100), chunk_size_rows=30)
    assert next(stream).num_rows == 30
    stream.chunk_size_rows = 8
    assert next(stream).num_rows == 8
    stream.chunk_size_rows = 50
    rest = [c.num_rows for c in stream]
    assert rest == [50, 12]
    assert stream.stats.resizes == 2
    assert stream.stats.sizes == [30, 8, 50, 50]
    assert stream.stats.min_chunk_size_rows == 8
    assert stream.stats.max_chunk_size_rows == 50


@pytest.mark.parametrize("bad", [0, -5, 1.5, True, "10"])
def test_chunk_size_must_be_a_positive_int(bad: object) -> None:
    with pytest.raises(ValueError, match="chunk_size_rows"):
        ChunkStream([], chunk_size_rows=bad)  # type: ignore[arg-type]
    stream = ChunkStream.from_batches(table(3))
    with pytest.raises(ValueError, match="chunk_size_rows"):
        stream.chunk_size_rows = bad  # type: ignore[assignment]


def test_single_pass() -> None:
    stream = ChunkStream.from_batches(table(5), chunk_size_rows=2)
    assert not stream.consumed
    assert sum(c.num_rows for c in stream) == 5
    assert stream.consumed
    assert list(stream) == []


def test_items_are_cast_losslessly_to_the_declared_schema() -> None:
    narrow = pa.table({"id": pa.array([1, 2], pa.int32()), "x": pa.array([0.5, 1.5], pa.float32())})
    schema = pa.schema([("x", pa.float64()), ("id", pa.int64())])
    out = ChunkStream.from_batches([narrow], schema=schema).read_all()
    assert out.schema.equals(schema)
    assert out.column("id").to_pylist() == [1, 2]


@pytest.mark.parametrize(
    ("item", "message"),
    [
        (pa.table({"id": ["1"], "x": [1.0]}), "column 'id': string does not cast losslessly"),
        (pa.table({"id": [2**40], "x": [1.0]}), "column 'id': cannot cast int64"),
        (pa.table({"id": pa.array([1], pa.int32())}), r"missing column\(s\) \['x'\]"),
        (pa.table({"id": [1], "x": [1.0], "z": [0]}), r"unexpected column\(s\) \['z'\]"),
        (pa.table({"id": [1], "x": [1.0]}), "column 'x': double does not cast losslessly"),
    ],
)
def test_items_that_do_not_fit_raise_naming_the_column(item: pa.Table, message: str) -> None:
    schema = pa.schema([("id", pa.int32()), ("x", pa.float32())])
    stream = ChunkStream.from_batches([item], schema=schema)
    with pytest.raises(ValueError, match=message):
        list(stream)


def test_nulls_in_a_non_nullable_column_are_refused() -> None:
    schema = pa.schema([pa.field("id", pa.int64(), nullable=False)])
    stream = ChunkStream.from_batches([pa.table({"id": [1, None]})], schema=schema)
    with pytest.raises(ValueError, match="column 'id': 1 null"):
        list(stream)


@pytest.mark.parametrize(
    ("src", "dst", "ok"),
    [
        (pa.int32(), pa.int64(), True),
        (pa.int64(), pa.int32(), True),  # values are range-checked by the cast itself
        (pa.int32(), pa.float64(), True),
        (pa.float32(), pa.float64(), True),
        (pa.float64(), pa.float32(), False),
        (pa.string(), pa.int64(), False),
        (pa.int64(), pa.string(), False),
        (pa.bool_(), pa.int8(), False),
        (pa.string(), pa.large_string(), True),
        (pa.dictionary(pa.int32(), pa.string()), pa.string(), True),
        (pa.timestamp("ns"), pa.timestamp("us"), True),
        (pa.timestamp("us"), pa.timestamp("us", tz="UTC"), False),
        (pa.date32(), pa.date64(), True),
        (pa.decimal128(10, 2), pa.decimal128(12, 2), True),
        (pa.decimal128(10, 2), pa.decimal128(10, 4), False),
        (pa.list_(pa.int32()), pa.large_list(pa.int64()), True),
        (pa.list_(pa.float64()), pa.list_(pa.float32()), False),
        (pa.struct([("a", pa.int32())]), pa.struct([("a", pa.int64())]), True),
        (pa.struct([("a", pa.int32())]), pa.struct([("b", pa.int32())]), False),
        (pa.null(), pa.string(), True),
    ],
)
def test_lossless_cast_rules(src: pa.DataType, dst: pa.DataType, ok: bool) -> None:
    assert is_lossless_cast(src, dst) is ok


def test_close_closes_the_source_generator_and_runs_close_hooks_once() -> None:
    closed: list[str] = []

    def gen():
        try:
            for i in range(100):
                yield table(10, i * 10)
        finally:
            closed.append("generator")

    stream = ChunkStream(gen(), chunk_size_rows=10, on_close=lambda: closed.append("hook"))
    next(stream)
    stream.close()
    stream.close()
    assert closed == ["generator", "hook"]
    assert list(stream) == []


def test_context_manager_closes_early_exit() -> None:
    closed: list[bool] = []
    with ChunkStream.from_batches(table(50), chunk_size_rows=10) as stream:
        stream.add_hooks(on_close=lambda: closed.append(True))
        next(stream)
    assert closed == [True]


def test_source_error_closes_the_stream() -> None:
    closed: list[bool] = []

    def gen():
        yield table(5)
        raise OSError("disk gone")

    stream = ChunkStream(gen(), chunk_size_rows=5, on_close=lambda: closed.append(True))
    assert next(stream).num_rows == 5
    with pytest.raises(OSError, match="disk gone"):
        next(stream)
    assert closed == [True]


def test_after_hook_error_closes_the_stream() -> None:
    closed: list[bool] = []

    def fail(_stream: ChunkStream, _chunk: pa.Table) -> None:
        raise RuntimeError("progress sink broke")

    stream = ChunkStream.from_batches(table(20), chunk_size_rows=5)
    stream.add_hooks(after_chunk=fail, on_close=lambda: closed.append(True))
    with pytest.raises(RuntimeError, match="progress sink broke"):
        next(stream)
    assert closed == [True]
    assert list(stream) == []


def test_schema_of_a_closed_undeclared_stream_is_empty_not_an_error() -> None:
    stream = ChunkStream(iter([table(3)]))
    stream.close()
    assert stream.schema == pa.schema([])


def test_empty_source() -> None:
    stream = ChunkStream(iter([]))
    assert stream.schema == pa.schema([])
    assert list(stream) == []
    declared = ChunkStream(iter([]), SCHEMA)
    assert declared.read_all().schema.equals(SCHEMA)


def test_to_reader_and_read_all() -> None:
    reader = ChunkStream.from_batches(table(25), chunk_size_rows=10).to_reader()
    assert isinstance(reader, pa.RecordBatchReader)
    assert reader.schema.equals(SCHEMA)
    assert reader.read_all().column("id").to_pylist() == list(range(25))
    whole = ChunkStream.from_batches(batches([4, 4]), chunk_size_rows=3).read_all()
    assert whole.num_rows == 8


def test_from_batches_sources() -> None:
    t = table(12)
    from_table = ChunkStream.from_batches(t, chunk_size_rows=5)
    assert from_table.total_rows == 12
    assert [c.num_rows for c in from_table] == [5, 5, 2]
    reader = pa.RecordBatchReader.from_batches(SCHEMA, t.to_batches(max_chunksize=4))
    from_reader = ChunkStream.from_batches(reader, chunk_size_rows=5)
    assert from_reader.schema.equals(SCHEMA)
    assert ids_of(from_reader) == list(range(12))
    one = ChunkStream.from_batches(t.to_batches()[0], chunk_size_rows=100)
    assert one.read_all().num_rows == 12
    passthrough = ChunkStream.from_batches(t)
    assert ChunkStream.from_batches(passthrough, chunk_size_rows=7) is passthrough
    assert passthrough.chunk_size_rows == 7


def test_items_must_be_arrow() -> None:
    stream = ChunkStream(iter([{"id": 1}]))  # type: ignore[list-item]
    with pytest.raises(TypeError, match="RecordBatch or Table"):
        list(stream)
