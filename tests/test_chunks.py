"""process_in_chunks: every source kind, pushdown, exact sizes, progress, validation."""

import fcntl
import os
import struct
import sys
import termios
import uuid
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from stream_helpers import NORMAL, SCHEMA, ScriptedMonitor, ids_of, table, write_files

from memsafe_dagster.datasets import ChunkStream, process_in_chunks
from memsafe_dagster.datasets.chunks import default_monitor


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return write_files(tmp_path / "data", files=3, rows_per_file=7_000, row_group_size=3_000)


@pytest.fixture
def memfs():
    fs = fsspec.filesystem("memory")
    root = f"/chunks-{uuid.uuid4().hex[:8]}"
    fs.makedirs(root, exist_ok=True)
    yield fs, root
    fs.rm(root, recursive=True)


def calm() -> ScriptedMonitor:
    return ScriptedMonitor([NORMAL])


def test_local_directory_exact_sizes_in_order(data_dir: Path) -> None:
    stream = process_in_chunks(str(data_dir), chunk_size_rows=2_500, memory_monitor=calm())
    assert isinstance(stream, ChunkStream)
    assert stream.schema.equals(SCHEMA)
    assert stream.total_rows is None  # only counted when progress is asked for
    chunks = list(stream)
    assert all(c.num_rows <= 2_500 for c in chunks)
    assert [c.num_rows for c in chunks[:-1]] == [2_500] * (len(chunks) - 1)
    assert ids_of(chunks) == list(range(21_000))
    assert stream.stats.rows == 21_000


def test_memory_url_and_explicit_filesystem(memfs) -> None:
    fs, root = memfs
    for i in range(2):
        with fs.open(f"{root}/data/part-{i}.parquet", "wb") as fh:
            pq.write_table(table(1_000, i * 1_000), fh)
    via_url = process_in_chunks(f"memory://{root}/data", 300, memory_monitor=calm())
    assert ids_of(via_url) == list(range(2_000))
    via_fs = process_in_chunks(f"{root}/data", 700, memory_monitor=calm(), filesystem=fs)
    assert [c.num_rows for c in via_fs] == [700, 700, 600]


def test_list_of_paths_and_dataset(data_dir: Path) -> None:
    files = sorted(str(p) for p in data_dir.glob("*.parquet"))
    stream = process_in_chunks(files[1:], 5_000, memory_monitor=calm())
    assert ids_of(stream) == list(range(7_000, 21_000))
    dataset = ds.dataset(str(data_dir))
    assert sum(c.num_rows for c in process_in_chunks(dataset, 4_000, memory_monitor=calm())) == (
        21_000
    )


def test_hidden_paths_are_skipped(data_dir: Path) -> None:
    staging = data_dir / "_memsafe" / "staging" / "txn"
    staging.mkdir(parents=True)
    pq.write_table(table(10, 10**6), staging / "part-x.parquet")
    pq.write_table(table(10, 10**6), data_dir / ".part-3.parquet.memsafe-1.tmp")
    assert ids_of(process_in_chunks(str(data_dir), memory_monitor=calm())) == list(range(21_000))


def test_columns_and_filter_pushdown_on_a_dataset(data_dir: Path) -> None:
    expr = (pc.field("status") == "active") & (pc.field("id") >= 10_000)
    stream = process_in_chunks(
        str(data_dir), 1_000, columns=["id"], filter=expr, memory_monitor=calm()
    )
    assert stream.schema.names == ["id"]
    assert stream.total_rows is None  # not counted without progress
    got = ids_of(stream)
    assert got == [i for i in range(10_000, 21_000) if i % 3 == 0]
    counted = process_in_chunks(
        str(data_dir), 1_000, filter=expr, progress_callback=lambda *_: None, memory_monitor=calm()
    )
    assert counted.total_rows == len(got)


@pytest.mark.parametrize("kind", ["table", "batch", "reader", "generator", "stream"])
def test_in_memory_sources_with_filter_and_columns(kind: str) -> None:
    t = table(5_000)
    source = {
        "table": lambda: t,
        "batch": lambda: t.combine_chunks().to_batches()[0],
        "reader": lambda: pa.RecordBatchReader.from_batches(SCHEMA, t.to_batches(1_234)),
        "generator": lambda: (b for b in t.to_batches(999)),
        "stream": lambda: ChunkStream.from_batches(t, chunk_size_rows=800),
    }[kind]()
    stream = process_in_chunks(
        source,
        600,
        columns=["id", "x"],
        filter=pc.field("status") == "active",
        memory_monitor=calm(),
    )
    chunks = list(stream)
    assert all(c.num_rows <= 600 for c in chunks)
    assert all(c.schema.names == ["id", "x"] for c in chunks)
    assert ids_of(chunks) == [i for i in range(5_000) if i % 3 == 0]


def test_unfiltered_sources_pass_through() -> None:
    t = table(2_500)
    assert process_in_chunks(t, 1_000, memory_monitor=calm()).total_rows == 2_500
    stream = ChunkStream.from_batches(t, chunk_size_rows=50)
    same = process_in_chunks(stream, 1_000, memory_monitor=calm())
    assert same is stream
    assert [c.num_rows for c in same] == [1_000, 1_000, 500]


def test_reader_source_stops_with_the_stream() -> None:
    pulled: list[int] = []

    def gen():
        for i in range(10):
            pulled.append(i)
            yield table(100, i * 100).to_batches()[0]

    reader = pa.RecordBatchReader.from_batches(SCHEMA, gen())
    stream = process_in_chunks(reader, 100, memory_monitor=calm())
    next(stream)
    stream.close()
    assert list(stream) == []
    assert len(pulled) <= 3  # nothing more is pulled from the reader


def test_chunk_size_change_mid_stream_applies_below_the_scanner_batch(data_dir: Path) -> None:
    stream = process_in_chunks(str(data_dir), 4_000, memory_monitor=calm(), adaptive=False)
    assert next(stream).num_rows == 4_000
    stream.chunk_size_rows = 300
    rest = [c.num_rows for c in stream]
    assert max(rest) == 300
    assert sum(rest) == 17_000


def test_progress_callback_after_every_chunk(data_dir: Path) -> None:
    calls: list[tuple[int, int | None]] = []
    stream = process_in_chunks(
        str(data_dir),
        5_000,
        progress_callback=lambda done, total: calls.append((done, total)),
        memory_monitor=calm(),
    )
    list(stream)
    assert calls == [
        (5_000, 21_000),
        (10_000, 21_000),
        (15_000, 21_000),
        (20_000, 21_000),
        (21_000, 21_000),
    ]


def test_progress_bar_is_quiet_without_a_terminal(data_dir: Path, capfd) -> None:
    list(process_in_chunks(str(data_dir), 5_000, enable_progress=True, memory_monitor=calm()))
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""


def test_progress_bar_draws_on_a_terminal(data_dir: Path, monkeypatch) -> None:
    master, slave = os.openpty()
    # A fresh pty reports 0 columns; give it a real width as a terminal would.
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    tty = os.fdopen(slave, "w", buffering=1)
    try:
        monkeypatch.setattr(sys, "stderr", tty)
        stream = process_in_chunks(
            str(data_dir), 5_000, enable_progress=True, memory_monitor=calm()
        )
        assert sum(c.num_rows for c in stream) == 21_000
        tty.flush()
        drawn = os.read(master, 65536).decode("utf-8", "replace")
    finally:
        monkeypatch.undo()
        tty.close()
        os.close(master)
    assert "memsafe" in drawn
    assert "21.0k" in drawn and "rows" in drawn


def test_default_monitor_is_container_aware() -> None:
    monitor = default_monitor(256)
    assert monitor.max_pyarrow_mb == 256
    assert monitor.min_system_available_mb == pytest.approx(min(512, monitor.limits.limit_mb * 0.1))
    stream = process_in_chunks(table(10), 5, max_memory_mb=64)
    assert sum(c.num_rows for c in stream) == 10
    assert stream.stats.peak_rss_mb > 0


def test_filter_matching_nothing(data_dir: Path) -> None:
    stream = process_in_chunks(
        str(data_dir), 1_000, filter=pc.field("id") < 0, memory_monitor=calm()
    )
    assert list(stream) == []
    assert stream.schema.equals(SCHEMA)


def test_hive_partitioning(tmp_path: Path) -> None:
    for day in ("2024-01-01", "2024-01-02"):
        part = tmp_path / "ds" / f"day={day}"
        part.mkdir(parents=True)
        pq.write_table(table(100), part / "data.parquet")
    stream = process_in_chunks(
        str(tmp_path / "ds"),
        partitioning="hive",
        filter=pc.field("day") == "2024-01-02",
        memory_monitor=calm(),
    )
    out = stream.read_all()
    assert out.num_rows == 100
    assert set(out.column("day").to_pylist()) == {"2024-01-02"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"chunk_size_rows": 0}, "chunk_size_rows must be a positive integer"),
        ({"max_memory_mb": -1}, "max_memory_mb must be a positive number"),
        ({"columns": "id"}, "columns must be a list of column names"),
        ({"columns": []}, "columns must name at least one column"),
        ({"columns": ["id", "nope"]}, r"columns: \['nope'\] not in"),
        ({"filter": "id > 3"}, "filter must be a pyarrow.compute.Expression"),
        ({"filter": pc.field("nope") > 3}, "filter: No match for FieldRef.Name\\(nope\\)"),
        ({"filter": pc.field("id") + 1}, "filter: .*must evaluate to bool"),
        ({"progress_callback": 3}, "progress_callback must be callable"),
    ],
)
@pytest.mark.parametrize("source", ["path", "table"])
def test_bad_arguments_name_the_parameter(
    data_dir: Path, source: str, kwargs: dict, message: str
) -> None:
    data = str(data_dir) if source == "path" else table(10)
    with pytest.raises(ValueError, match=message):
        process_in_chunks(data, **kwargs)


def test_bad_sources() -> None:
    with pytest.raises(ValueError, match="dataset must be a path"):
        process_in_chunks(42)  # type: ignore[arg-type]
    stream = ChunkStream.from_batches(table(10))
    list(stream)
    with pytest.raises(ValueError, match="already iterated"):
        process_in_chunks(stream)
    with pytest.raises(FileNotFoundError):
        process_in_chunks("/nonexistent/memsafe/data")
