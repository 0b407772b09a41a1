"""metadata.py: the memsafe keys, table/stream/merge metadata and the EMERGENCY Failure text."""

import dagster as dg
import pyarrow as pa
import pytest
from dagster_helpers import MiB, fixed_limits, plain
from memory_helpers import reading

from memsafe_dagster import metadata as md
from memsafe_dagster.datasets import ChunkStream, MergeResult
from memsafe_dagster.memory import MemoryMonitor, MemoryPressureLevel, PeakWindow


def test_keys_are_the_design_names() -> None:
    assert md.MEMORY_KEYS == (
        "memsafe/pressure",
        "memsafe/peak_rss_mb",
        "memsafe/peak_pyarrow_mb",
        "memsafe/limit_mb",
        "memsafe/limit_source",
        "memsafe/headroom_mb",
    )
    assert (md.CHUNKS, md.MERGE, md.INSERTED, md.UPDATED, md.DELETED) == (
        "memsafe/chunks",
        "memsafe/merge",
        "memsafe/inserted",
        "memsafe/updated",
        "memsafe/deleted",
    )
    assert (md.ROW_COUNT, md.COLUMN_SCHEMA) == ("dagster/row_count", "dagster/column_schema")


def test_memory_metadata_types_and_values() -> None:
    figures = md.MemoryFigures(
        pressure=MemoryPressureLevel.CRITICAL,
        peak_rss_bytes=300 * MiB,
        peak_pyarrow_bytes=120 * MiB + MiB // 2,
        limit_bytes=1024 * MiB,
        limit_source="cgroup-v2",
    )
    out = md.memory_metadata(figures, chunks=7)
    assert isinstance(out[md.PRESSURE], dg.TextMetadataValue)
    assert isinstance(out[md.PEAK_RSS_MB], dg.FloatMetadataValue)
    assert isinstance(out[md.CHUNKS], dg.IntMetadataValue)
    assert plain(out) == {
        md.PRESSURE: "critical",
        md.PEAK_RSS_MB: 300.0,
        md.PEAK_PYARROW_MB: 120.5,
        md.LIMIT_MB: 1024.0,
        md.LIMIT_SOURCE: "cgroup-v2",
        md.HEADROOM_MB: 724.0,
        md.CHUNKS: 7,
    }
    assert md.CHUNKS not in md.memory_metadata(figures)


def test_memory_metadata_from_a_monitor_uses_its_limit_and_worst_level() -> None:
    monitor = MemoryMonitor(
        max_pyarrow_mb=4096, limits=fixed_limits(2048, "env:MEMSAFE_MEMORY_LIMIT")
    )
    monitor.check_memory_pressure()
    out = plain(md.memory_metadata(monitor))
    assert out[md.LIMIT_MB] == 2048.0
    assert out[md.LIMIT_SOURCE] == "env:MEMSAFE_MEMORY_LIMIT"
    assert out[md.PRESSURE] == monitor.max_pressure.value
    assert out[md.PEAK_RSS_MB] > 10  # a Python process with pyarrow loaded


def test_table_metadata_schema_and_counts() -> None:
    schema = pa.schema(
        [
            pa.field("id", pa.int64(), nullable=False),
            pa.field("name", pa.string()),
            pa.field("at", pa.timestamp("us", tz="UTC")),
        ]
    )
    out = plain(md.table_metadata(schema, 12_345_678_901))
    assert out[md.ROW_COUNT] == 12_345_678_901
    columns = out[md.COLUMN_SCHEMA].columns
    assert [(c.name, c.type, c.constraints.nullable) for c in columns] == [
        ("id", "int64", False),
        ("name", "string", True),
        ("at", "timestamp[us, tz=UTC]", True),
    ]
    assert md.PARTITION_ROW_COUNT not in out
    partitioned = plain(md.table_metadata(schema, 5, partitioned=True))
    assert partitioned[md.PARTITION_ROW_COUNT] == 5 and partitioned[md.ROW_COUNT] == 5


def test_stream_metadata_from_real_stream_stats() -> None:
    stream = ChunkStream.from_batches(
        (pa.record_batch({"x": list(range(i * 10, i * 10 + 10))}) for i in range(10)),
        chunk_size_rows=25,
    )
    for i, _chunk in enumerate(stream):
        if i == 1:
            stream.chunk_size_rows = 10
    out = plain(md.stream_metadata(stream.stats))
    assert out[md.CHUNKS] == stream.stats.chunks == 2 + 5  # 25, 25, then 5 x 10
    assert out["memsafe/chunk_size_rows_max"] == 25
    assert out["memsafe/chunk_size_rows_min"] == 10
    assert out["memsafe/chunk_resizes"] == 1


def test_merge_metadata_from_a_real_merge_result() -> None:
    fields = dict(
        strategy="upsert",
        source_count=10,
        target_count_before=100,
        target_count_after=104,
        inserted=4,
        updated=6,
        deleted=0,
        files_rewritten=1,
        files_added=1,
        files_removed=1,
        files_untouched=3,
        duration_s=0.5,
        peak_rss_mb=250.0,
        peak_pyarrow_mb=40.0,
        max_pressure=MemoryPressureLevel.WARNING,
    )
    result = MergeResult(**fields)
    monitor = MemoryMonitor(limits=fixed_limits(1000, "cgroup-v1"))
    out = plain(md.merge_metadata(result, monitor))
    assert (out[md.INSERTED], out[md.UPDATED], out[md.DELETED]) == (4, 6, 0)
    assert out[md.MERGE]["strategy"] == "upsert"
    assert out[md.MERGE]["target_count_after"] == 104
    assert out[md.PRESSURE] == "warning"
    assert out[md.PEAK_RSS_MB] == 250.0 and out[md.HEADROOM_MB] == 750.0
    assert out[md.LIMIT_SOURCE] == "cgroup-v1"


@pytest.mark.parametrize(
    ("signals", "expected"),
    [
        (dict(pyarrow_mb=120), "PyArrow allocation 120.0 MB >= max_pyarrow_mb 100"),
        (dict(rss_mb=250), "process RSS 250.0 MB >= max_process_memory_mb 200"),
        (dict(available_mb=20), "available 20.0 MB < min_system_available_mb 50"),
    ],
)
def test_pressure_failure_names_stage_signal_peak_and_limit(signals: dict, expected: str) -> None:
    monitor = MemoryMonitor(
        max_pyarrow_mb=100,
        max_process_memory_mb=200,
        min_system_available_mb=50,
        limits=fixed_limits(512, "cgroup-v2"),
    )
    failure = md.pressure_failure(
        "writing asset sales", monitor, reading=reading(**signals), extra={md.CHUNK_SIZE_ROWS: 500}
    )
    assert isinstance(failure, dg.Failure) and failure.allow_retries
    text = failure.description
    assert text.startswith("memsafe: memory pressure EMERGENCY during writing asset sales: ")
    assert expected in text
    assert "Peak RSS" in text and "limit 512.0 MB (cgroup-v2)" in text
    meta = plain(failure.metadata)
    assert meta[md.PRESSURE] == "emergency"
    assert meta[md.LIMIT_MB] == 512.0 and meta[md.LIMIT_SOURCE] == "cgroup-v2"
    assert meta[md.STAGE] == "writing asset sales"
    assert meta[md.CHUNK_SIZE_ROWS] == 500
    assert meta[md.PEAK_RSS_MB] >= signals.get("rss_mb", 0)


def test_merge_metadata_takes_its_memory_from_the_steps_figures_when_given() -> None:
    result = MergeResult(
        strategy="upsert",
        inserted=1,
        peak_rss_mb=250.0,
        peak_pyarrow_mb=40.0,
        max_pressure=MemoryPressureLevel.NORMAL,
    )
    monitor = MemoryMonitor(limits=fixed_limits(1000, "cgroup-v1"))
    step = md.MemoryFigures(
        pressure=MemoryPressureLevel.WARNING,
        peak_rss_bytes=300 * MiB,
        peak_pyarrow_bytes=60 * MiB,
        limit_bytes=1000 * MiB,
        limit_source="cgroup-v1",
    )
    out = plain(md.merge_metadata(result, monitor, figures=step, chunks=7))
    assert out[md.INSERTED] == 1 and out[md.MERGE]["peak_rss_mb"] == 250.0
    assert (out[md.PRESSURE], out[md.PEAK_RSS_MB], out[md.PEAK_PYARROW_MB]) == ("warning", 300, 60)
    assert out[md.HEADROOM_MB] == 700.0 and out[md.CHUNKS] == 7


def test_memory_metadata_of_a_window() -> None:
    monitor = MemoryMonitor(limits=fixed_limits(1000, "cgroup-v1"))
    with PeakWindow(monitor) as window:
        monitor.sample()
    out = plain(md.memory_metadata(window))
    assert out == plain(md.memory_metadata(md.MemoryFigures.from_window(window)))
    assert out[md.PEAK_RSS_MB] == round(window.peak_rss_mb, 2) and out[md.LIMIT_MB] == 1000
