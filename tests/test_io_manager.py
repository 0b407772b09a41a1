"""ChunkedParquetIOManager against real Dagster instances: the streaming graph, every output and
input type, pushdown, the Table budget, partitions, EMERGENCY and retries.

No ``from __future__ import annotations`` here: this module defines assets.
"""

import math
from pathlib import Path
from typing import Any

import dagster as dg
import dagster_defs_streaming as graph
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from dagster_helpers import (
    data_files,
    events_of_type,
    failure_data,
    latest_metadata,
    numbers,
    step_failures,
)

from memsafe_dagster import metadata as md
from memsafe_dagster.datasets import ChunkStream, adaptive
from memsafe_dagster.io_managers import (
    ChunkedParquetIOManager,
    estimate_table_bytes,
    to_expression,
)
from memsafe_dagster.memory import detect_memory_limits
from memsafe_dagster.resources import MemoryMonitorResource

IMPOSSIBLE = {"max_process_memory_mb": 1}
# The container "short of memory": a smaller chunk might fit, so the Failure allows retries
# (a process budget below what the process held at the start does not: test_failure_messages).
RETRYABLE = {"min_system_available_mb": 10**9}


def io_manager(base: Path | str, **kwargs: Any) -> ChunkedParquetIOManager:
    memory = kwargs.pop("memory", None)
    return ChunkedParquetIOManager(
        base_path=str(base),
        memory=MemoryMonitorResource(**memory) if memory else None,
        **kwargs,
    )


def read_dir(path: Path) -> pa.Table:
    return ds.dataset(str(path), format="parquet").to_table()


def run(assets: list, base: Path | str, instance: dg.DagsterInstance | None = None, **kwargs: Any):
    raise_on_error = kwargs.pop("raise_on_error", True)
    selection = kwargs.pop("selection", None)
    partition_key = kwargs.pop("partition_key", None)
    return dg.materialize(
        assets,
        resources={"io_manager": io_manager(base, **kwargs)},
        instance=instance or dg.DagsterInstance.ephemeral(),
        raise_on_error=raise_on_error,
        selection=selection,
        partition_key=partition_key,
    )


# -- the acceptance graph ------------------------------------------------------------------------


def test_streaming_graph_materializes_with_memsafe_metadata(tmp_path: Path) -> None:
    graph.PRODUCED_BATCHES.clear()
    graph.SEEN_CHUNK_ROWS.clear()
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize(
        graph.ASSETS, resources=graph.resources(str(tmp_path)), instance=instance
    )
    assert result.success
    assert list(range(graph.BATCHES)) == graph.PRODUCED_BATCHES
    # The ChunkStream consumer saw the upstream dataset chunk by chunk, never all of it.
    assert sum(graph.SEEN_CHUNK_ROWS) == graph.ROWS
    assert max(graph.SEEN_CHUNK_ROWS) <= graph.CHUNK_ROWS
    assert len(graph.SEEN_CHUNK_ROWS) == math.ceil(graph.ROWS / graph.CHUNK_ROWS)

    assert read_dir(tmp_path / "raw_events").num_rows == graph.ROWS
    positive = read_dir(tmp_path / "positive_events")
    assert positive.num_rows == graph.POSITIVE_ROWS
    assert pc.min(positive["amount"]).as_py() == 1
    large = read_dir(tmp_path / "large_amounts")
    assert large.schema.names == ["id", "amount"] and large.num_rows == graph.LARGE_ROWS
    summary = read_dir(tmp_path / "amount_summary").to_pylist()
    assert summary == [{"rows": graph.LARGE_ROWS, "total_amount": graph.LARGE_TOTAL}]

    assert_graph_metadata(instance, tmp_path)


def assert_graph_metadata(instance: dg.DagsterInstance, base: Path) -> None:
    """What every output of the graph records, asserted by name and plausible value."""
    limits = detect_memory_limits()
    expected = {
        "raw_events": (graph.ROWS, ["id", "amount", "label"]),
        "positive_events": (graph.POSITIVE_ROWS, ["id", "amount", "label"]),
        "large_amounts": (graph.LARGE_ROWS, ["id", "amount"]),
        "amount_summary": (1, ["rows", "total_amount"]),
    }
    for asset, (rows, columns) in expected.items():
        meta = latest_metadata(instance, asset)
        assert meta[md.ROW_COUNT] == rows, asset
        schema = meta[md.COLUMN_SCHEMA]
        assert [c.name for c in schema.columns] == columns, asset
        assert schema.columns[0].type == "int64"
        assert meta[md.CHUNKS] == max(1, math.ceil(rows / graph.CHUNK_ROWS)), asset
        assert meta[md.PRESSURE] in {"normal", "warning"}, asset
        assert 20 < meta[md.PEAK_RSS_MB] < limits.limit_mb, asset
        assert 0 <= meta[md.PEAK_PYARROW_MB] < meta[md.PEAK_RSS_MB], asset
        assert meta[md.LIMIT_MB] == pytest.approx(limits.limit_mb, abs=0.01)
        assert meta[md.LIMIT_SOURCE] == limits.source
        assert meta[md.HEADROOM_MB] == pytest.approx(
            meta[md.LIMIT_MB] - meta[md.PEAK_RSS_MB], abs=0.02
        )
        assert meta[md.CHUNK_SIZE_ROWS] == graph.CHUNK_ROWS and meta[md.RETRY_NUMBER] == 0
        assert Path(meta[md.PATH]) == base / asset
        assert data_files(base / asset), asset


def test_rematerializing_replaces_the_dataset(tmp_path: Path) -> None:
    instance = dg.DagsterInstance.ephemeral()
    for _ in range(2):
        assert dg.materialize(
            graph.ASSETS[:2], resources=graph.resources(str(tmp_path)), instance=instance
        ).success
    files = [p for p in data_files(tmp_path / "raw_events") if "_memsafe" not in p.parts]
    assert len(files) == 1
    assert read_dir(tmp_path / "raw_events").num_rows == graph.ROWS
    assert read_dir(tmp_path / "positive_events").num_rows == graph.POSITIVE_ROWS


# -- outputs -------------------------------------------------------------------------------------


def _dataset_of(path: Path, table: pa.Table) -> ds.Dataset:
    path.mkdir(parents=True)
    pq.write_table(table.slice(0, 3000), path / "a.parquet")
    pq.write_table(table.slice(3000), path / "b.parquet")
    return ds.dataset(str(path), format="parquet")


@pytest.mark.parametrize("kind", ["table", "batch", "reader", "dataset", "list", "stream"])
def test_every_output_type_is_written_chunk_by_chunk(tmp_path: Path, kind: str) -> None:
    source = numbers(5_000)

    @dg.asset
    def out():
        if kind == "table":
            return source
        if kind == "batch":
            return source.combine_chunks().to_batches()[0]
        if kind == "reader":
            return pa.RecordBatchReader.from_batches(source.schema, source.to_batches(700))
        if kind == "dataset":
            return _dataset_of(tmp_path / "src", source)
        if kind == "list":
            return source.to_batches(1_000)
        return ChunkStream.from_batches(b for b in source.to_batches(300))

    instance = dg.DagsterInstance.ephemeral()
    assert run([out], tmp_path / "base", instance, chunk_size_rows=1_200).success
    written = read_dir(tmp_path / "base" / "out").sort_by("id")
    assert written.equals(source)
    meta = latest_metadata(instance, "out")
    assert meta[md.ROW_COUNT] == 5_000
    assert meta[md.CHUNKS] == 5  # 4 x 1200 + 200
    assert meta["memsafe/chunk_size_rows_max"] == 1_200


def test_row_groups_and_file_rolling_follow_the_config(tmp_path: Path) -> None:
    @dg.asset
    def rolled() -> ChunkStream:
        return ChunkStream.from_batches(numbers(5_000).to_batches(333))

    instance = dg.DagsterInstance.ephemeral()
    assert run(
        [rolled],
        tmp_path,
        instance,
        chunk_size_rows=1_000,
        row_group_size=500,
        max_rows_per_file=2_000,
        compression="snappy",
    ).success
    files = [p for p in data_files(tmp_path / "rolled") if "_memsafe" not in p.parts]
    assert [pq.ParquetFile(f).metadata.num_rows for f in files] == [2_000, 2_000, 1_000]
    meta = pq.ParquetFile(files[0]).metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [500] * 4
    assert meta.row_group(0).column(0).compression == "SNAPPY"
    assert latest_metadata(instance, "rolled")["memsafe/files"] == 3


def test_an_empty_output_keeps_its_schema(tmp_path: Path) -> None:
    @dg.asset
    def nothing() -> ChunkStream:
        return ChunkStream.from_batches([], schema=numbers(1).schema)

    @dg.asset
    def after(nothing: pa.Table) -> pa.Table:
        assert nothing.num_rows == 0 and nothing.schema.names == ["id", "value", "name"]
        return nothing

    instance = dg.DagsterInstance.ephemeral()
    assert run([nothing, after], tmp_path, instance).success
    meta = latest_metadata(instance, "nothing")
    assert meta[md.ROW_COUNT] == 0 and meta[md.CHUNKS] == 0
    assert [c.name for c in meta[md.COLUMN_SCHEMA].columns] == ["id", "value", "name"]


def test_an_unsupported_output_is_a_clear_error(tmp_path: Path) -> None:
    @dg.asset
    def wrong() -> dict:
        return {"id": [1, 2]}

    result = run([wrong], tmp_path, raise_on_error=False)
    [failure] = step_failures(result)
    message = str(failure.step_failure_data.error.to_string())
    assert "cannot write output 'result' of type dict" in message
    assert "ChunkStream.from_batches" in message
    assert not data_files(tmp_path)


# -- inputs --------------------------------------------------------------------------------------


@dg.asset
def source_numbers() -> pa.Table:
    return numbers(5_000)


def consumer_of(
    upstream: dg.AssetKey | str,
    annotation: Any,
    seen: list,
    *,
    name: str = "consumer",
    metadata: dict | None = None,
) -> dg.AssetsDefinition:
    """An asset whose one input ``upstream`` is annotated ``annotation`` (None: unannotated);
    it records what it was given (and drains streams and readers into ``seen``)."""

    def body(upstream):
        seen.append(upstream)
        if isinstance(upstream, ChunkStream):
            seen.append(list(upstream))
        elif isinstance(upstream, pa.RecordBatchReader):
            seen.append(upstream.read_all())

    body.__annotations__ = {"return": None}
    if annotation is not None:
        body.__annotations__["upstream"] = annotation
    key = dg.AssetKey(upstream) if isinstance(upstream, str) else upstream
    ins = {"upstream": dg.AssetIn(key=key, metadata=metadata)}
    return dg.asset(name=name, ins=ins)(body)


def _consumer(annotation: Any, seen: list, metadata: dict | None = None) -> dg.AssetsDefinition:
    return consumer_of("source_numbers", annotation, seen, metadata=metadata)


@pytest.mark.parametrize(
    ("annotation", "loaded_type"),
    [
        (ds.Dataset, ds.Dataset),
        (pa.RecordBatchReader, pa.RecordBatchReader),
        (ChunkStream, ChunkStream),
        (pa.Table, pa.Table),
        (pa.Table | None, pa.Table),
        (None, ds.Dataset),  # no annotation: the lazy Dataset, never a surprise load
    ],
)
def test_inputs_load_by_annotation(tmp_path: Path, annotation: Any, loaded_type: type) -> None:
    seen: list = []
    consumer = _consumer(annotation, seen)
    assert run([source_numbers, consumer], tmp_path, chunk_size_rows=1_500).success
    loaded = seen[0]
    assert isinstance(loaded, loaded_type)
    if loaded_type is ds.Dataset:
        assert loaded.count_rows() == 5_000
    elif loaded_type is pa.Table:
        assert loaded.sort_by("id").equals(numbers(5_000))
    elif loaded_type is ChunkStream:
        assert [len(t) for t in seen[1]] == [1_500, 1_500, 1_500, 500]
    else:
        assert seen[1].num_rows == 5_000


def test_an_unsupported_input_annotation_names_the_supported_ones(tmp_path: Path) -> None:
    consumer = _consumer(int, [])
    result = run([source_numbers, consumer], tmp_path, raise_on_error=False)
    [failure] = step_failures(result)
    message = failure.step_failure_data.error.to_string()
    assert "cannot load input 'upstream' annotated int" in message
    assert "ChunkStream" in message and "RecordBatchReader" in message


@pytest.mark.parametrize("annotation", [ds.Dataset, pa.RecordBatchReader, ChunkStream, pa.Table])
@pytest.mark.parametrize(
    ("row_filter", "expected_ids"),
    [
        ([("id", "<", 10)], list(range(10))),
        ([("id", ">=", 100), ("id", "<", 103)], [100, 101, 102]),
        ([[("id", "=", 7)], [("id", "=", 4_000)]], [7, 4_000]),
        ([("id", "in", [1, 2, 3])], [1, 2, 3]),
    ],
)
def test_columns_and_filter_are_pushed_down(
    tmp_path: Path, annotation: Any, row_filter: list, expected_ids: list
) -> None:
    seen: list = []
    consumer = _consumer(annotation, seen, {"columns": ["id", "value"], "filter": row_filter})
    assert run([source_numbers, consumer], tmp_path).success
    loaded = seen[0]
    if isinstance(loaded, ds.Dataset):
        table = loaded.to_table()
    elif isinstance(loaded, pa.Table):
        table = loaded
    elif isinstance(loaded, ChunkStream):
        table = pa.concat_tables(seen[1]) if seen[1] else loaded.schema.empty_table()
    else:
        table = seen[1]
    assert table.schema.names == ["id", "value"]
    assert sorted(table["id"].to_pylist()) == expected_ids


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ({"filter": "id > 3"}, "must be a non-empty list of (column, op, value) tuples"),
        ({"filter": [("id", ">")]}, "is not a (column, op, value) predicate"),
        ({"columns": "id"}, "'columns' must be a list of column names"),
        ({"columns": ["nope"]}, "nope"),
    ],
)
def test_bad_input_metadata_is_a_clear_error(tmp_path: Path, metadata: dict, message: str) -> None:
    consumer = _consumer(pa.Table, [], metadata)
    result = run([source_numbers, consumer], tmp_path, raise_on_error=False)
    [failure] = step_failures(result)
    assert message in failure.step_failure_data.error.to_string()


def test_a_table_input_that_would_not_fit_is_refused_with_the_streaming_annotations(
    tmp_path: Path,
) -> None:
    @dg.asset
    def wide() -> ChunkStream:
        # 400k rows x (8 + 8 + ~6) bytes: about 9 MB uncompressed, far more than 3 MB.
        return ChunkStream.from_batches(numbers(400_000).to_batches(50_000))

    @dg.asset
    def eager(wide: pa.Table) -> None:
        raise AssertionError("must not be called")

    # 3 MB of PyArrow budget beyond what this process already holds (earlier tests).
    pa.default_memory_pool().release_unused()
    memory = {"max_pyarrow_mb": math.ceil(pa.total_allocated_bytes() / 2**20) + 3}
    instance = dg.DagsterInstance.ephemeral()
    assert run([wide], tmp_path, instance, memory={"max_pyarrow_mb": 4096}).success
    result = run(
        [wide, eager], tmp_path, instance, memory=memory, selection=[eager], raise_on_error=False
    )
    [failure] = step_failures(result)
    description, metadata = failure_data(failure)
    assert description.startswith("memsafe: input 'wide' from asset wide would take about")
    for name in ("pyarrow.dataset.Dataset", "RecordBatchReader", "ChunkStream"):
        assert name in description
    # Refused because the estimate exceeds the room left in the budget (the room is the budget
    # minus what PyArrow holds at the check, so it moves by what earlier work released).
    assert metadata["memsafe/estimated_mb"] > 4
    assert metadata["memsafe/available_budget_mb"] <= memory["max_pyarrow_mb"]
    assert metadata["memsafe/available_budget_mb"] < metadata["memsafe/estimated_mb"]

    seen: list = []

    @dg.asset(ins={"wide": dg.AssetIn(metadata={"columns": ["id"], "filter": [("id", "<", 10)]})})
    def narrow(wide: pa.Table) -> None:
        seen.append(wide.num_rows)

    assert run([wide, narrow], tmp_path, instance, memory=memory, selection=[narrow]).success
    assert seen == [10]


# -- partitions ----------------------------------------------------------------------------------

REGIONS = dg.StaticPartitionsDefinition(["eu", "us", "apac"])
DAYS = dg.DailyPartitionsDefinition(start_date="2024-01-01", end_date="2024-01-04")
DAYS_BY_REGION = dg.MultiPartitionsDefinition({"date": DAYS, "region": REGIONS})


def _rows_for(key: str) -> pa.Table:
    n = 100 + 10 * (sum(map(ord, key)) % 7)
    table = numbers(n)
    return table.append_column("key", pa.array([key] * n))


@dg.asset(partitions_def=REGIONS)
def by_region(context: dg.AssetExecutionContext) -> ChunkStream:
    return ChunkStream.from_batches(_rows_for(context.partition_key).to_batches(40))


@dg.asset(partitions_def=DAYS)
def by_day(context: dg.AssetExecutionContext) -> pa.Table:
    return _rows_for(context.partition_key)


@dg.asset(partitions_def=DAYS_BY_REGION)
def by_day_and_region(context: dg.AssetExecutionContext) -> pa.Table:
    return _rows_for(context.partition_key)


@pytest.mark.parametrize(
    ("asset", "partitions_def", "relative"),
    [
        (by_region, REGIONS, lambda k: k),
        (by_day, DAYS, lambda k: k),
        (by_day_and_region, DAYS_BY_REGION, lambda k: "/".join(k.split("|"))),
    ],
)
def test_partitions_are_one_dataset_each_and_load_as_one_or_a_dict(
    tmp_path: Path, asset: Any, partitions_def: Any, relative: Any
) -> None:
    name = asset.key.path[-1]
    keys = partitions_def.get_partition_keys()
    instance = dg.DagsterInstance.ephemeral()
    for key in keys:
        assert run([asset], tmp_path, instance, partition_key=key, chunk_size_rows=64).success
        written = read_dir(tmp_path / name / relative(key))
        assert written.num_rows == _rows_for(key).num_rows
        assert set(written["key"].to_pylist()) == {key}
        meta = latest_metadata(instance, name, partition=key)
        assert meta[md.ROW_COUNT] == meta[md.PARTITION_ROW_COUNT] == written.num_rows
        assert meta[md.CHUNKS] == math.ceil(written.num_rows / 64)
        assert Path(meta[md.PATH]) == tmp_path / name / relative(key)

    total = sum(_rows_for(k).num_rows for k in keys)
    one: list = []
    per_key: list = []
    combined = consumer_of(asset.key, ds.Dataset, one, name="combined")
    split = consumer_of(asset.key, dict[str, pa.Table], per_key, name="per_partition")
    assert run([asset, combined, split], tmp_path, instance, selection=[combined, split]).success
    assert one[0].count_rows() == total
    assert set(per_key[0]) == set(keys)
    for key, table in per_key[0].items():
        assert set(table["key"].to_pylist()) == {key}


def test_rematerializing_a_partition_leaves_the_others(tmp_path: Path) -> None:
    instance = dg.DagsterInstance.ephemeral()
    for key in ("eu", "us", "eu"):
        assert run([by_region], tmp_path, instance, partition_key=key).success
    for key in ("eu", "us"):
        files = [p for p in data_files(tmp_path / "by_region" / key) if "_memsafe" not in p.parts]
        assert len(files) == 1
        assert read_dir(tmp_path / "by_region" / key).num_rows == _rows_for(key).num_rows


def test_a_missing_partition_is_an_error_unless_allowed(tmp_path: Path) -> None:
    instance = dg.DagsterInstance.ephemeral()
    assert run([by_region], tmp_path, instance, partition_key="eu").success
    strict = consumer_of("by_region", pa.Table, [], name="strict")
    result = run([by_region, strict], tmp_path, instance, selection=[strict], raise_on_error=False)
    [failure] = step_failures(result)
    assert "partition us of asset by_region" in failure.step_failure_data.error.to_string()
    assert "has no data" in failure.step_failure_data.error.to_string()

    seen: list = []
    lenient = consumer_of(
        "by_region",
        dict[str, pa.Table],
        seen,
        name="lenient",
        metadata={"allow_missing_partitions": True},
    )
    assert run([by_region, lenient], tmp_path, instance, selection=[lenient]).success
    assert list(seen[0]) == ["eu"]


# -- EMERGENCY and retries -----------------------------------------------------------------------


def test_emergency_fails_the_step_and_leaves_no_partial_output(tmp_path: Path) -> None:
    produced: list[int] = []

    def batches():
        for i in range(20):
            produced.append(i)
            yield numbers(500, start=i * 500).to_batches()[0]

    @dg.asset
    def doomed() -> ChunkStream:
        return ChunkStream.from_batches(batches())

    result = run([doomed], tmp_path, memory=IMPOSSIBLE, chunk_size_rows=1_000, raise_on_error=False)
    assert not result.success
    [failure] = step_failures(result)
    description, metadata = failure_data(failure)
    assert description.startswith("memsafe: memory pressure EMERGENCY during writing asset doomed")
    assert "process RSS" in description and ">= max_process_memory_mb 1" in description
    assert "Peak RSS" in description and "limit" in description
    assert metadata[md.PRESSURE] == "emergency"
    for key in md.MEMORY_KEYS:
        assert key in metadata
    assert metadata[md.CHUNK_SIZE_ROWS] == 1_000 and metadata[md.RETRY_NUMBER] == 0
    assert data_files(tmp_path) == []  # nothing published, nothing left in staging
    assert len(produced) <= 2  # stopped at the first check, not after streaming everything

    # With a previous version, a failed step leaves it byte for byte.
    instance = dg.DagsterInstance.ephemeral()
    assert run([doomed], tmp_path, instance, chunk_size_rows=1_000).success
    before = {p: p.read_bytes() for p in data_files(tmp_path)}
    result = run([doomed], tmp_path, instance, memory=IMPOSSIBLE, raise_on_error=False)
    assert not result.success
    assert {p: p.read_bytes() for p in data_files(tmp_path)} == before


@pytest.mark.parametrize("annotation", [ChunkStream, pa.RecordBatchReader])
def test_emergency_while_the_body_drains_a_loaded_stream_is_the_memsafe_failure(
    tmp_path: Path, annotation: Any
) -> None:
    drained: list[int] = []

    @dg.asset
    def counts(source_numbers: annotation) -> None:  # type: ignore[valid-type]
        for chunk in source_numbers:
            drained.append(chunk.num_rows)

    instance = dg.DagsterInstance.ephemeral()
    assert run([source_numbers], tmp_path, instance).success
    result = run(
        [source_numbers, counts],
        tmp_path,
        instance,
        memory=IMPOSSIBLE,
        selection=[counts],
        raise_on_error=False,
    )
    assert not result.success
    [failure] = step_failures(result)
    description, metadata = failure_data(failure)
    assert description.startswith(
        "memsafe: memory pressure EMERGENCY during loading input 'source_numbers'"
    )
    assert "(consumed by the asset)" in description
    assert metadata[md.PRESSURE] == "emergency"
    for key in md.MEMORY_KEYS:
        assert key in metadata
    assert drained == []


def test_a_retried_write_streams_with_half_the_chunk_size(tmp_path: Path) -> None:
    @dg.asset(retry_policy=dg.RetryPolicy(max_retries=2))
    def retried() -> ChunkStream:
        return ChunkStream.from_batches(numbers(5_000).to_batches(500))

    instance = dg.DagsterInstance.ephemeral()
    result = run(
        [retried],
        tmp_path,
        instance,
        memory=RETRYABLE,
        chunk_size_rows=1_000,
        raise_on_error=False,
    )
    assert not result.success
    retries = events_of_type(instance, result.run_id, dg.DagsterEventType.STEP_UP_FOR_RETRY)
    assert len(retries) == 2
    texts = [e.event_specific_data.error.to_string() for e in retries]
    assert "chunk_size_rows=1000, retry 0" in texts[0]
    assert "chunk_size_rows=500, retry 1" in texts[1]
    [failure] = step_failures(result)
    description, metadata = failure_data(failure)
    assert description.startswith("memsafe: memory pressure EMERGENCY")
    assert metadata[md.CHUNK_SIZE_ROWS] == 250 and metadata[md.RETRY_NUMBER] == 2
    assert data_files(tmp_path) == []


def test_a_retried_step_loads_its_stream_with_half_the_chunk_size(tmp_path: Path) -> None:
    seen: list[tuple[int, int]] = []

    @dg.asset(retry_policy=dg.RetryPolicy(max_retries=2))
    def flaky(context: dg.AssetExecutionContext, source_numbers: ChunkStream) -> ChunkStream:
        seen.append((context.retry_number, source_numbers.chunk_size_rows))
        if context.retry_number < 2:
            raise RuntimeError("transient")
        return source_numbers

    instance = dg.DagsterInstance.ephemeral()
    assert run([source_numbers, flaky], tmp_path, instance, chunk_size_rows=1_000).success
    assert seen == [(0, 1_000), (1, 500), (2, 250)]
    meta = latest_metadata(instance, "flaky")
    assert meta[md.RETRY_NUMBER] == 2 and meta[md.CHUNK_SIZE_ROWS] == 250
    assert meta[md.ROW_COUNT] == 5_000 and meta[md.CHUNKS] == 20


def _record_sizers(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int, int]]:
    """(sizer, stream, monitor) ids of every adaptive sizer check made from now on."""
    calls: list[tuple[int, int, int]] = []

    class Recording(adaptive.AdaptiveChunkSizer):
        def __call__(self, stream: ChunkStream) -> None:
            calls.append((id(self), id(stream), id(self.monitor)))
            super().__call__(stream)

    monkeypatch.setattr(adaptive, "AdaptiveChunkSizer", Recording)
    return calls


@pytest.mark.parametrize("wrapped", [False, True])
def test_a_stream_through_the_io_manager_has_one_sizer_on_one_monitor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, wrapped: bool
) -> None:
    @dg.asset
    def passed_on(source_numbers: ChunkStream) -> ChunkStream:
        if wrapped:  # the streaming idiom: a second stream over the loaded one
            return ChunkStream.from_batches(t.filter(pc.field("id") >= 0) for t in source_numbers)
        return source_numbers

    instance = dg.DagsterInstance.ephemeral()
    assert run([source_numbers], tmp_path, instance).success
    calls = _record_sizers(monkeypatch)
    result = run(
        [source_numbers, passed_on], tmp_path, instance, selection=[passed_on], chunk_size_rows=500
    )
    assert result.success
    assert read_dir(tmp_path / "passed_on").num_rows == 5_000
    sizers_per_stream: dict[int, set[int]] = {}
    for sizer, stream, _monitor in calls:
        sizers_per_stream.setdefault(stream, set()).add(sizer)
    assert len(sizers_per_stream) == (2 if wrapped else 1)
    assert all(len(sizers) == 1 for sizers in sizers_per_stream.values())
    assert len({monitor for *_, monitor in calls}) == 1


# -- where data lives ----------------------------------------------------------------------------


def test_default_base_path_is_the_instance_storage_directory(tmp_path: Path) -> None:
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        result = dg.materialize(
            [source_numbers],
            resources={"io_manager": ChunkedParquetIOManager()},
            instance=instance,
        )
        assert result.success
        storage = Path(instance.storage_directory())
        assert storage.is_relative_to(tmp_path)
        assert read_dir(storage / "source_numbers").num_rows == 5_000


def test_any_fsspec_url_is_a_base_path() -> None:
    import fsspec

    base = "memory://memsafe-io-manager-test"
    seen: list = []
    consumer = _consumer(ChunkStream, seen)
    assert run([source_numbers, consumer], base, chunk_size_rows=2_000).success
    fs = fsspec.filesystem("memory")
    files = [f for f in fs.find("/memsafe-io-manager-test/source_numbers") if "_memsafe" not in f]
    assert len(files) == 1
    assert [len(t) for t in seen[1]] == [2_000, 2_000, 1_000]
    fs.rm("/memsafe-io-manager-test", recursive=True)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"chunk_size_rows": 0}, "chunk_size_rows must be a positive integer, got 0"),
        ({"row_group_size": -1}, "row_group_size must be a positive integer"),
        ({"compression": "zip"}, "compression must be one of"),
    ],
)
def test_bad_io_manager_config_is_rejected_by_name(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ChunkedParquetIOManager(**kwargs)


# -- pure helpers --------------------------------------------------------------------------------


def test_filter_metadata_forms_become_expressions() -> None:
    table = numbers(20)
    cases = [
        ([("id", "<", 3)], [0, 1, 2]),
        ([["id", ">", 17]], [18, 19]),  # lists, as Dagster's event log stores tuples
        ([[("id", "=", 1)], [("id", "=", 5), ("name", "==", "n5")]], [1, 5]),
        (
            [("id", "not in", [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16])],
            [17, 18, 19],
        ),
        (pc.field("id") == 4, [4]),
    ]
    for value, ids in cases:
        expression = to_expression(value)
        assert isinstance(expression, pc.Expression)
        assert table.filter(expression)["id"].to_pylist() == ids, value
    assert to_expression(None) is None
    with pytest.raises(ValueError, match="non-empty list"):
        to_expression([])


def test_estimate_of_a_table_load_is_close_to_its_real_size(tmp_path: Path) -> None:
    table = numbers(200_000)
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=50_000)
    dataset = ds.dataset(str(tmp_path / "a.parquet"))
    estimate = estimate_table_bytes(dataset, None, None)
    assert 0.5 * table.nbytes <= estimate <= 2 * table.nbytes
    only_id = estimate_table_bytes(dataset, ["id"], None)
    assert 0.5 * table["id"].nbytes <= only_id <= 2 * table["id"].nbytes
    tenth = estimate_table_bytes(dataset, None, pc.field("id") < 20_000)
    assert tenth == pytest.approx(estimate / 10, rel=0.01)


def test_io_manager_config_comes_from_env_vars(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_MEMSAFE_CHUNK_ROWS", "700")
    monkeypatch.setenv("TEST_MEMSAFE_BASE", str(tmp_path / "from-env"))
    seen: list = []
    consumer = _consumer(ChunkStream, seen)
    manager = ChunkedParquetIOManager(
        base_path=dg.EnvVar("TEST_MEMSAFE_BASE"),
        chunk_size_rows=dg.EnvVar.int("TEST_MEMSAFE_CHUNK_ROWS"),
    )
    assert dg.materialize([source_numbers, consumer], resources={"io_manager": manager}).success
    assert [len(t) for t in seen[1]] == [700] * 7 + [100]
    assert read_dir(tmp_path / "from-env" / "source_numbers").num_rows == 5_000
