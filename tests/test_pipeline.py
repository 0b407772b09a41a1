"""MemoryAwarePipeline: stages on tables and streams, checks around each, reports per stage;
on streams only stages marked row_local run per chunk, the others get the whole data."""

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from stream_helpers import (
    CRITICAL,
    EMERGENCY,
    NORMAL,
    WARNING,
    ScriptedMonitor,
    ids_of,
    table,
    write_files,
)

import memsafe_dagster.pipeline as pipeline_module
from memsafe_dagster import MemoryAwarePipeline, MemoryPressureError
from memsafe_dagster.datasets import ChunkStream
from memsafe_dagster.pipeline import is_row_local, row_local


@pytest.fixture
def collections(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = pipeline_module.gc.collect

    def counting_collect(*args: int) -> int:
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(pipeline_module.gc, "collect", counting_collect)
    return calls


@row_local
def only_active(data):
    return data.filter(pc.field("status") == "active")


@row_local
def ids_and_x(data):
    return data.select(["id", "x"])


@row_local
def doubled(data):
    return data.set_column(1, "x", pc.multiply(data.column("x"), 2))


def pipeline(levels=(NORMAL,), **kw) -> MemoryAwarePipeline:
    return MemoryAwarePipeline(monitor=ScriptedMonitor(list(levels)), **kw)


def test_table_stages_run_in_order_with_reports() -> None:
    p = pipeline()
    out = p.process_pipeline([only_active, ids_and_x, doubled], data=table(3_000))
    assert isinstance(out, pa.Table)
    assert out.schema.names == ["id", "x"]
    assert out.column("id").to_pylist() == list(range(0, 3_000, 3))
    assert out.column("x").to_pylist() == [float(i) for i in range(0, 3_000, 3)]
    reports = p.stage_reports
    assert [r.name for r in reports] == ["only_active", "ids_and_x", "doubled"]
    assert [(r.rows_in, r.rows_out) for r in reports] == [
        (3_000, 1_000),
        (1_000, 1_000),
        (1_000, 1_000),
    ]
    assert all(not r.streaming and r.chunks == 1 and r.duration_s >= 0 for r in reports)
    assert all(r.rss_before_mb and r.rss_after_mb and r.peak_rss_mb for r in reports)
    assert reports[0].to_dict()["pressure_before"] == "normal"
    assert p.monitor.checks == 6  # before and after each stage


def test_initial_data_sources() -> None:
    assert pipeline(data=table(6)).process_pipeline([only_active]).num_rows == 2
    assert pipeline(data=table(6)).process_pipeline([only_active], data=table(9)).num_rows == 3

    class Loading(MemoryAwarePipeline):
        def load_initial_data(self):
            return table(12)

    assert Loading(monitor=ScriptedMonitor([NORMAL])).process_pipeline([only_active]).num_rows == 4
    with pytest.raises(ValueError, match="no initial data: pass process_pipeline"):
        pipeline().process_pipeline([only_active])


def test_seed_constructor_builds_its_monitor() -> None:
    p = MemoryAwarePipeline(memory_limit_mb=512)
    assert p.monitor.max_pyarrow_mb == 512
    assert p.gc_threshold == 0.8
    assert p.process_pipeline([ids_and_x], data=table(5)).num_columns == 2


def test_critical_collects_and_rechecks(collections: list[int]) -> None:
    p = pipeline([CRITICAL, NORMAL, NORMAL, NORMAL, NORMAL])
    out = p.process_pipeline([only_active, ids_and_x], data=table(30))
    assert out.num_rows == 10
    assert len(collections) == 1
    first = p.stage_reports[0]
    assert first.gc_collections == 1
    assert first.pressure_before is NORMAL  # after the collection
    assert first.max_pressure is NORMAL
    assert p.monitor.checks == 5


def test_warning_is_logged_not_fatal(caplog: pytest.LogCaptureFixture) -> None:
    p = pipeline([WARNING])
    with caplog.at_level("WARNING", logger="memsafe_dagster.pipeline"):
        assert p.process_pipeline([only_active], data=table(9)).num_rows == 3
    assert "memory pressure warning before stage only_active" in caplog.text
    assert p.stage_reports[0].max_pressure is WARNING


def test_emergency_before_a_stage_names_it_and_stops(collections: list[int]) -> None:
    ran: list[str] = []

    def second(data):
        ran.append("second")
        return data

    p = pipeline([NORMAL, NORMAL, EMERGENCY, EMERGENCY])
    with pytest.raises(MemoryPressureError) as info:
        p.process_pipeline([only_active, second], data=table(9))
    message = str(info.value)
    assert "EMERGENCY before pipeline stage 2/2 'second'" in message
    assert info.value.level is EMERGENCY
    assert "process_rss_mb" in info.value.status
    assert ran == []
    assert len(collections) == 1


def test_emergency_after_a_stage_names_it() -> None:
    p = pipeline([NORMAL, EMERGENCY, EMERGENCY])
    with pytest.raises(MemoryPressureError, match="after pipeline stage 1/2 'only_active'"):
        p.process_pipeline([only_active, ids_and_x], data=table(9))


def test_emergency_relieved_by_collection_continues(collections: list[int]) -> None:
    p = pipeline([EMERGENCY, NORMAL])
    assert p.process_pipeline([only_active], data=table(9)).num_rows == 3
    assert len(collections) == 1


def test_gc_threshold_collects_between_warning_and_critical(collections: list[int]) -> None:
    hold = pa.array(range(1_000_000), pa.int64())  # about 8 MB held by PyArrow
    budget_mb = pa.total_allocated_bytes() / 2**20 / 0.85
    low = MemoryAwarePipeline(monitor=ScriptedMonitor([WARNING], max_pyarrow_mb=budget_mb))
    low.process_pipeline([ids_and_x], data=table(3))
    assert len(collections) == 2  # 85 % of the budget is over the 80 % threshold
    high = MemoryAwarePipeline(
        monitor=ScriptedMonitor([WARNING], max_pyarrow_mb=budget_mb), gc_threshold=0.9
    )
    high.process_pipeline([ids_and_x], data=table(3))
    assert len(collections) == 2
    assert len(hold) == 1_000_000


def test_stage_errors_carry_the_stage_name() -> None:
    def broken(data):
        return data.select(["missing"])

    with pytest.raises(KeyError) as info:
        pipeline().process_pipeline([only_active, broken], data=table(3))
    assert "in MemoryAwarePipeline stage 2/2 'broken'" in info.value.__notes__


@pytest.mark.parametrize("stages", [[], [only_active, "not a stage"]])
def test_stages_are_validated(stages: list) -> None:
    with pytest.raises(ValueError, match="stage"):
        pipeline().process_pipeline(stages, data=table(3))


def test_streams_run_stages_per_chunk_lazily() -> None:
    calls: list[int] = []

    @row_local
    def counted(chunk):
        calls.append(chunk.num_rows)
        return only_active(chunk)

    p = pipeline()
    source = ChunkStream.from_batches(table(10_000), chunk_size_rows=1_000)
    out = p.process_pipeline([counted, ids_and_x, doubled], data=source)
    assert isinstance(out, ChunkStream)
    assert calls == []  # nothing runs until the stream is consumed
    chunks = list(out)
    assert calls == [1_000] * 10
    assert ids_of(chunks) == list(range(0, 10_000, 3))
    assert all(c.schema.names == ["id", "x"] for c in chunks)
    first, _, last = p.stage_reports
    assert first.streaming and first.chunks == 10
    assert (first.rows_in, first.rows_out) == (10_000, 3_334)
    assert (last.rows_in, last.rows_out) == (3_334, 3_334)


def test_paths_are_streamed(tmp_path: Path) -> None:
    write_files(tmp_path / "d", files=2, rows_per_file=5_000)
    p = pipeline(chunk_size_rows=2_000)
    out = p.process_pipeline([only_active], data=str(tmp_path / "d"))
    assert isinstance(out, ChunkStream)
    assert ids_of(out) == list(range(0, 10_000, 3))


def test_stream_emergency_names_the_stage() -> None:
    p = MemoryAwarePipeline(monitor=ScriptedMonitor([NORMAL] * 4 + [EMERGENCY]), check_interval_s=0)
    source = ChunkStream.from_batches(table(10_000), chunk_size_rows=1_000)
    out = p.process_pipeline([only_active, ids_and_x], data=source)
    with pytest.raises(MemoryPressureError, match="pipeline stage 1/2 'only_active'"):
        list(out)


def test_stream_stage_must_return_arrow() -> None:
    p = pipeline()
    out = p.process_pipeline(
        [row_local(lambda chunk: chunk.num_rows)], data=ChunkStream.from_batches(table(10))
    )
    with pytest.raises(TypeError, match="per-chunk stages must return a pyarrow Table"):
        list(out)


def test_output_chunks_follow_the_upstream_size() -> None:
    p = pipeline()
    source = ChunkStream.from_batches(table(10_000), chunk_size_rows=2_000)
    out = p.process_pipeline([ids_and_x], data=source)
    assert next(out).num_rows == 2_000
    source.chunk_size_rows = 500
    assert max(c.num_rows for c in out) == 500


# -- stages that are not row-local ------------------------------------------------------------


def by_status(data):
    return data.group_by("status").aggregate([("x", "sum"), ("id", "count")])


def expected_by_status(rows: int) -> dict[str, tuple[float, int]]:
    whole = table(rows)
    return {
        r["status"]: (r["x_sum"], r["id_count"])
        for r in whole.group_by("status").aggregate([("x", "sum"), ("id", "count")]).to_pylist()
    }


def test_a_stage_that_is_not_row_local_gets_the_whole_streamed_data(tmp_path: Path) -> None:
    """The aggregate of a path streamed in chunks is the aggregate of all rows (run per chunk,
    it returned one row per group and chunk)."""
    write_files(tmp_path / "d", files=6, rows_per_file=1_000)
    p = pipeline(chunk_size_rows=400)
    out = p.process_pipeline([ids_and_x_status, by_status], data=str(tmp_path / "d"))
    assert isinstance(out, pa.Table) and out.num_rows == len(expected_by_status(6_000))
    got = {r["status"]: (r["x_sum"], r["id_count"]) for r in out.to_pylist()}
    assert got == expected_by_status(6_000)
    first, second = p.stage_reports
    assert first.streaming and first.chunks > 6  # the projection ran per chunk
    assert not second.streaming and (second.rows_in, second.chunks) == (6_000, 1)


@row_local
def ids_and_x_status(data):
    return data.select(["id", "x", "status"])


def test_after_a_whole_data_stage_the_rest_run_on_the_table() -> None:
    source = ChunkStream.from_batches(table(3_000), chunk_size_rows=500)
    p = pipeline()
    out = p.process_pipeline(
        [only_active, by_status, row_local(lambda t: t.slice(0, 1))], data=source
    )
    assert isinstance(out, pa.Table) and out.num_rows == 1
    assert [r.streaming for r in p.stage_reports] == [True, False, False]


def test_unmarked_stages_on_a_stream_are_not_run_per_chunk() -> None:
    calls: list[int] = []

    def whole(data):
        calls.append(data.num_rows)
        return data

    p = pipeline()
    out = p.process_pipeline(
        [whole], data=ChunkStream.from_batches(table(5_000), chunk_size_rows=1_000)
    )
    assert calls == [5_000] and out.num_rows == 5_000
    assert not is_row_local(whole) and is_row_local(only_active)


def test_gathering_for_a_whole_data_stage_is_refused_at_emergency() -> None:
    p = pipeline([NORMAL, NORMAL, EMERGENCY, EMERGENCY])
    source = ChunkStream.from_batches(table(5_000), chunk_size_rows=1_000)
    with pytest.raises(MemoryPressureError) as info:
        p.process_pipeline([by_status], data=source)
    message = str(info.value)
    assert "pipeline stage 1/1 'by_status' is not row-local, so it needs the whole data" in message
    assert "after 3,000 rows" in message and "row_local" in message


def test_row_local_wraps_callables_without_attributes() -> None:
    marked = row_local(len)
    assert is_row_local(marked) and marked(table(4)) == 4
    with pytest.raises(TypeError, match="callable"):
        row_local("stage")
