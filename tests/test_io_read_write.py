"""PyarrowDatasetIO on local disk and memory://: read, stream, write modes, recovery, merge."""

import sys
import time
import types

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from fs_helpers import Where
from stream_helpers import EMERGENCY, NORMAL, SCHEMA, ScriptedMonitor, ids_of, table

from memsafe_dagster.datasets import ChunkStream, PyarrowDatasetIO, commit
from memsafe_dagster.memory import MemoryPressureError


@pytest.fixture
def io() -> PyarrowDatasetIO:
    return PyarrowDatasetIO()


def calm() -> ScriptedMonitor:
    return ScriptedMonitor([NORMAL])


def test_append_adds_files_and_read_returns_everything(io: PyarrowDatasetIO, where: Where) -> None:
    first = io.write_dataset(table(1_000), where("ds"))
    assert first.rows == 1_000 and first.mode == "append" and len(first.files) == 1
    assert where.data_files("ds")[0].startswith("part-") and first.txn in first.files[0]
    time.sleep(0.002)  # txn ids are millisecond-sortable
    second = io.write_dataset(table(500, 1_000), where("ds"), mode="append")
    assert len(where.data_files("ds")) == 2
    assert second.bytes == sum(where.fs.size(f) for f in second.files)
    back = io.read(where("ds"))
    assert isinstance(back, pa.Table)
    assert back.column("id").to_pylist() == list(range(1_500))


def test_overwrite_replaces_all_files_in_one_commit(io: PyarrowDatasetIO, where: Where) -> None:
    io.write_dataset(table(100), where("ds"))
    io.write_dataset(table(100, 100), where("ds"))
    old = where.data_files("ds")
    result = io.write_dataset(table(7, 1_000), where("ds"), mode="overwrite")
    new = where.data_files("ds")
    assert len(new) == 1 and not set(new) & set(old)
    assert sorted(result.files_removed) == sorted(where.p(f"ds/{f}") for f in old)
    assert io.read(where("ds")).column("id").to_pylist() == list(range(1_000, 1_007))


def test_overwrite_with_no_rows_keeps_the_schema(io: PyarrowDatasetIO, where: Where) -> None:
    io.write_dataset(table(10), where("ds"))
    io.write_dataset(SCHEMA.empty_table(), where("ds"), mode="overwrite")
    back = io.read(where("ds"))
    assert back.num_rows == 0 and back.schema.equals(SCHEMA)


def test_mode_is_validated_before_anything_happens(io: PyarrowDatasetIO, where: Where) -> None:
    with pytest.raises(ValueError, match=r"mode must be one of \('append', 'overwrite'\)"):
        io.write_dataset(table(1), where("ds"), mode="upsert")
    assert not where.fs.exists(where.p("ds"))


def test_append_schema_must_match(io: PyarrowDatasetIO, where: Where) -> None:
    io.write_dataset(table(10), where("ds"))
    before = where.snapshot("ds")
    wrong = table(5).set_column(0, "id", pa.array([f"k{i}" for i in range(5)]))
    with pytest.raises(ValueError, match="column 'id': string does not cast losslessly"):
        io.write_dataset(wrong, where("ds"))
    with pytest.raises(ValueError, match=r"unexpected column\(s\) \['extra'\]"):
        io.write_dataset(table(5).append_column("extra", pa.array([1] * 5)), where("ds"))
    assert where.snapshot("ds") == before
    narrow = table(5, 10).cast(
        pa.schema([("id", pa.int32()), ("x", pa.float32()), ("status", pa.string())])
    )
    io.write_dataset(narrow, where("ds"))
    assert io.dataset(where("ds")).to_table().schema.equals(SCHEMA)
    assert io.read(where("ds")).num_rows == 15


@pytest.mark.parametrize(
    "kind", ["table", "batch", "reader", "dataset", "stream", "generator", "path"]
)
def test_every_data_kind_is_written(io: PyarrowDatasetIO, where: Where, kind: str) -> None:
    t = table(3_000)
    io.write_dataset(t, where("src"))
    data = {
        "table": lambda: t,
        "batch": lambda: t.combine_chunks().to_batches()[0],
        "reader": lambda: pa.RecordBatchReader.from_batches(SCHEMA, t.to_batches(700)),
        "dataset": lambda: io.dataset(where("src")),
        "stream": lambda: ChunkStream.from_batches(t, chunk_size_rows=400),
        "generator": lambda: (b for b in t.to_batches(900)),
        "path": lambda: where("src"),
    }[kind]()
    result = io.write_dataset(data, where("dst"), chunk_size_rows=1_000, memory_monitor=calm())
    assert result.rows == 3_000
    assert io.read(where("dst")).equals(t)


def test_file_layout_options(io: PyarrowDatasetIO, where: Where) -> None:
    chunks = ChunkStream.from_batches(table(5_000), chunk_size_rows=333)
    result = io.write_dataset(
        chunks, where("ds"), row_group_size=1_000, max_rows_per_file=2_000, compression="snappy"
    )
    assert len(result.files) == 3
    layouts = []
    for f in result.files:
        with where.fs.open(f, "rb") as fh:
            meta = pq.ParquetFile(fh).metadata
        layouts.append([meta.row_group(i).num_rows for i in range(meta.num_row_groups)])
        assert meta.row_group(0).column(0).compression == "SNAPPY"
    assert layouts == [[1_000, 1_000], [1_000, 1_000], [1_000]]


def test_overwrite_from_the_same_dataset(io: PyarrowDatasetIO, where: Where) -> None:
    io.write_dataset(table(2_000), where("ds"))
    filtered = io.stream(where("ds"), filter=pc.field("status") == "active", memory_monitor=calm())
    io.write_dataset(filtered, where("ds"), mode="overwrite")
    assert io.read(where("ds")).column("id").to_pylist() == list(range(0, 2_000, 3))


def test_emergency_pressure_aborts_and_leaves_the_target(
    io: PyarrowDatasetIO, where: Where
) -> None:
    io.write_dataset(table(100), where("ds"))
    before = where.snapshot("ds")

    def slow_source():
        for batch in table(50_000).to_batches(1_000):
            time.sleep(0.003)  # slower than the 5 ms check throttle: every chunk is checked
            yield batch

    source = slow_source()
    monitor = ScriptedMonitor([NORMAL] * 3 + [EMERGENCY])
    with pytest.raises(MemoryPressureError) as info:
        io.write_dataset(
            source, where("ds"), mode="overwrite", memory_monitor=monitor, chunk_size_rows=5_000
        )
    assert info.value.status
    assert monitor.checks == 5  # the EMERGENCY was rechecked after a collection
    after = where.snapshot("ds")
    assert {k: v for k, v in after.items() if "/_memsafe/" not in k} == {
        k: v for k, v in before.items() if "/_memsafe/" not in k
    }
    assert not [k for k in after if "/_memsafe/staging/" in k and k.endswith(".parquet")]


def test_read_columns_filter_and_stream(io: PyarrowDatasetIO, where: Where) -> None:
    io.write_dataset(table(10_000), where("ds"), max_rows_per_file=3_000)
    expr = pc.field("status") == "active"
    t = io.read(where("ds"), columns=["id"], filter=expr)
    assert t.schema.names == ["id"]
    assert t.column("id").to_pylist() == list(range(0, 10_000, 3))
    done: list[tuple[int, int | None]] = []
    stream = io.read(
        where("ds"),
        as_stream=True,
        chunk_size_rows=1_000,
        memory_monitor=calm(),
        progress_callback=lambda rows, total: done.append((rows, total)),
    )
    assert isinstance(stream, ChunkStream)
    assert stream.total_rows == 10_000
    chunks = list(stream)
    assert max(c.num_rows for c in chunks) == 1_000
    assert ids_of(chunks) == list(range(10_000))
    assert done[-1] == (10_000, 10_000) and len(done) == 10
    same = io.stream(where("ds"), columns=["id", "x"], filter=expr, chunk_size_rows=500)
    assert ids_of(same) == list(range(0, 10_000, 3))


def test_read_errors(io: PyarrowDatasetIO, where: Where) -> None:
    with pytest.raises(FileNotFoundError, match="no dataset at"):
        io.read(where("missing"))
    io.write_dataset(table(10), where("ds"))
    with pytest.raises(ValueError, match=r"columns: \['nope'\]"):
        io.read(where("ds"), columns=["nope"])
    with pytest.raises(ValueError, match="filter"):
        io.read(where("ds"), filter=pc.field("nope") == 1)


def test_dataset_ignores_hidden_paths(io: PyarrowDatasetIO, where: Where) -> None:
    io.write_dataset(table(10), where("ds"))
    where.fs.makedirs(where.p("ds/_memsafe/staging/x"), exist_ok=True)
    with where.fs.open(where.p("ds/_memsafe/staging/x/part.parquet"), "wb") as fh:
        pq.write_table(table(99, 500), fh)
    with where.fs.open(where.p("ds/.hidden.parquet.tmp"), "wb") as fh:
        pq.write_table(table(99, 500), fh)
    dataset = io.dataset(where("ds"))
    assert isinstance(dataset, ds.Dataset)
    assert dataset.count_rows() == 10


def crash_after_commit_point(where: Where, name: str, rows: pa.Table) -> str:
    """Stage a file and write the commit record, then 'die' before applying it."""
    target = where.p(name)
    txn = commit.DatasetTransaction(where.fs, target, operation="write")
    txn.__enter__()
    staged = txn.new_file()
    with where.fs.open(staged, "wb") as fh:
        pq.write_table(rows, fh)
    record = commit.CommitRecord(
        txn=txn.txn,
        operation="write",
        add=tuple(txn._adds),
        remove=(),
        created_at=time.time(),
    )
    commit._write_record(where.fs, target, record, durable=False)
    txn.lock.release()  # the crashed process's lock would be broken as stale
    return txn.txn


def test_reads_see_a_crashed_commit_as_applied_without_recovering(
    io: PyarrowDatasetIO, where: Where
) -> None:
    io.write_dataset(table(10), where("ds"))
    txn = crash_after_commit_point(where, "ds", table(5, 10))
    assert commit.pending_commits(where.fs, where.p("ds")) == [txn]
    # control: the files at their final names are still the state before
    plain = [p for p in where.fs.find(where.p("ds")) if "_memsafe" not in p]
    assert sum(pq.ParquetFile(where.fs.open(p)).metadata.num_rows for p in plain) == 10
    assert io.read(where("ds")).column("id").to_pylist() == list(range(15))
    assert commit.pending_commits(where.fs, where.p("ds")) == [txn]  # read-only: no recovery
    io.recover(where("ds"))
    assert commit.pending_commits(where.fs, where.p("ds")) == []
    assert io.read(where("ds")).column("id").to_pylist() == list(range(15))


def test_writes_recover_first_and_recover_delegates(io: PyarrowDatasetIO, where: Where) -> None:
    io.write_dataset(table(10), where("ds"))
    crash_after_commit_point(where, "ds", table(5, 10))
    io.write_dataset(table(5, 15), where("ds"))
    assert sorted(io.read(where("ds")).column("id").to_pylist()) == list(range(20))
    orphan = where.p("ds/_memsafe/staging/20200101T000000000-deadbeef/part.parquet")
    where.fs.makedirs(orphan.rsplit("/", 1)[0], exist_ok=True)
    with where.fs.open(orphan, "wb") as fh:
        pq.write_table(table(3), fh)
    report = io.recover(where("ds"))
    assert report.orphans_removed == ["20200101T000000000-deadbeef"]
    assert not where.fs.exists(orphan)
    assert io.recover(where("ds")).changed is False


def test_explicit_filesystem(where: Where) -> None:
    io = PyarrowDatasetIO(filesystem=where.fs)
    io.write_dataset(table(20), where.p("ds"))
    assert io.read(where.p("ds")).num_rows == 20
    fs, path = io.resolve(where.p("ds") + "/")
    assert fs is where.fs and path == where.p("ds")


def test_merge_forwards_everything_by_name(
    io: PyarrowDatasetIO, where: Where, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[tuple, dict]] = []
    fake = types.ModuleType("memsafe_dagster.datasets.merge")

    def merge_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return "merged"

    fake.merge_dataset = merge_dataset  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "memsafe_dagster.datasets.merge", fake)
    data = table(3)
    progress = print
    monitor = calm()
    out = io.merge(
        data,
        where("target") + "/",
        strategy="delete",
        key_columns=["id"],
        merge_max_memory_mb=256,
        merge_max_process_memory_mb=512,
        merge_min_system_available_mb=128,
        merge_chunk_size_rows=10_000,
        enable_streaming_merge=False,
        merge_progress_callback=progress,
        memory_monitor=monitor,
        on_duplicate_keys="last",
        row_group_size=4_096,
    )
    assert out == "merged"
    ((args, kwargs),) = calls
    assert args[0] is data and args[1] == where.p("target")
    assert kwargs.pop("fs") is where.fs or type(kwargs["fs"]) is type(where.fs)
    assert kwargs == {
        "strategy": "delete",
        "key_columns": ["id"],
        "merge_max_memory_mb": 256,
        "merge_max_process_memory_mb": 512,
        "merge_min_system_available_mb": 128,
        "merge_chunk_size_rows": 10_000,
        "enable_streaming_merge": False,
        "merge_progress_callback": progress,
        "memory_monitor": monitor,
        "on_duplicate_keys": "last",
        "row_group_size": 4_096,
        "storage_options": io.storage_options,  # for a source given as a URL
    }


def test_merge_smoke_with_the_real_engine(io: PyarrowDatasetIO, where: Where) -> None:
    io.write_dataset(table(100), where("target"))
    source = table(20, 90).set_column(1, "x", pa.array([-1.0] * 20))
    result = io.merge(source, where("target"), strategy="upsert", key_columns=["id"])
    assert result.inserted == 10 and result.updated == 10
    back = io.read(where("target")).sort_by("id")
    assert back.num_rows == 110
    assert back.column("x").to_pylist()[90:] == [-1.0] * 20
