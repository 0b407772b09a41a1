"""build_merge_asset against real Dagster instances: upstream and inbox sources, every strategy,
partitions, checks, updates on a second run, EMERGENCY with the target unchanged, retries,
the pool and the dataset lock.

No ``from __future__ import annotations`` here: this module defines assets.
"""

import re
import threading
import time
from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from dagster_helpers import events_of_type, failure_data, latest_metadata, step_failures
from merge_helpers import oracle, row_set, snapshot

from memsafe_dagster import build_merge_asset
from memsafe_dagster import metadata as md
from memsafe_dagster.datasets import ChunkStream
from memsafe_dagster.datasets.commit import DatasetLock
from memsafe_dagster.datasets.filesystem import resolve_filesystem
from memsafe_dagster.io_managers import ChunkedParquetIOManager
from memsafe_dagster.memory import MemoryMonitor, MemoryPressureLevel, detect_memory_limits
from memsafe_dagster.merge_asset import (
    INBOX,
    MEMORY_HEADROOM,
    UNIQUE_KEYS,
    merge_asset_spec,
    merge_pool_name,
)
from memsafe_dagster.resources import MemoryMonitorResource

IMPOSSIBLE = {"max_process_memory_mb": 1}
# The container "short of memory": a smaller chunk might fit, so the Failure allows retries
# (a process budget below what the process held at the start does not: test_failure_messages).
RETRYABLE = {"min_system_available_mb": 10**9}


def resources(tmp_path: Path, **memory: Any) -> dict[str, Any]:
    return {
        "io_manager": ChunkedParquetIOManager(base_path=str(tmp_path / "io"), chunk_size_rows=700),
        "memory": MemoryMonitorResource(**memory),
    }


def read(path: Path) -> pa.Table:
    return ds.dataset(str(path), format="parquet").to_table()


def visible_files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*.parquet") if "_memsafe" not in p.parts)


def checks_of(result: dg.ExecuteInProcessResult) -> dict[str, dg.AssetCheckEvaluation]:
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


def rows(ids: range, tag: str) -> pa.Table:
    return pa.table(
        {
            "id": pa.array(ids, pa.int64()),
            "v": pa.array([f"{tag}{i}" for i in ids]),
        }
    )


# -- an upstream asset, streamed -------------------------------------------------------------------

UPSTREAM_VERSION = {"tag": "a"}


@dg.asset
def orders() -> ChunkStream:
    """5 000 rows in 10 generated batches; ``v`` carries the current tag."""
    tag = UPSTREAM_VERSION["tag"]
    return ChunkStream.from_batches(rows(range(i * 500, (i + 1) * 500), tag) for i in range(10))


def test_upstream_source_streams_and_records_the_merge(tmp_path: Path) -> None:
    target = tmp_path / "warehouse"
    merged = build_merge_asset(
        "orders_wh", source=orders, target_path=str(target), key_columns="id", row_group_size=900
    )
    instance = dg.DagsterInstance.ephemeral()
    UPSTREAM_VERSION["tag"] = "a"
    result = dg.materialize([orders, merged], resources=resources(tmp_path), instance=instance)
    assert result.success
    written = read(target)
    assert written.num_rows == 5_000 and set(written["v"].to_pylist()) == {
        f"a{i}" for i in range(5_000)
    }
    # merge options pass through: row groups of at most 900 rows
    meta = pq.ParquetFile(visible_files(target)[0]).metadata
    assert max(meta.row_group(i).num_rows for i in range(meta.num_row_groups)) <= 900

    meta = latest_metadata(instance, "orders_wh")
    limits = detect_memory_limits()
    assert meta[md.INSERTED] == 5_000 and meta[md.UPDATED] == 0 and meta[md.DELETED] == 0
    assert meta[md.ROW_COUNT] == 5_000
    assert [c.name for c in meta[md.COLUMN_SCHEMA].columns] == ["id", "v"]
    merge = meta[md.MERGE]
    assert merge["strategy"] == "upsert" and merge["source_count"] == 5_000
    assert merge["target_count_after"] == 5_000 and merge["committed"] is True
    assert meta[md.PRESSURE] == "normal"
    assert 20 < meta[md.PEAK_RSS_MB] < limits.limit_mb
    assert meta[md.LIMIT_MB] == pytest.approx(limits.limit_mb, abs=0.01)
    assert meta[md.LIMIT_SOURCE] == limits.source
    assert meta[md.HEADROOM_MB] == pytest.approx(meta[md.LIMIT_MB] - meta[md.PEAK_RSS_MB], abs=0.02)
    # the upstream came as a ChunkStream re-chunked to the merge chunk size (one chunk here)
    assert meta[md.CHUNKS] == 1 and meta[md.CHUNK_SIZE_ROWS] == 100_000
    assert meta[md.RETRY_NUMBER] == 0
    assert Path(meta[md.URI]) == target
    assert meta["memsafe/unique_keys"]["rows"] == 5_000
    checks = checks_of(result)
    assert checks[UNIQUE_KEYS].passed and checks[MEMORY_HEADROOM].passed
    assert checks[UNIQUE_KEYS].metadata["duplicate_keys"].value == 0

    # A second materialization with changed rows: updates, not inserts; no duplicates.
    UPSTREAM_VERSION["tag"] = "b"
    result = dg.materialize([orders, merged], resources=resources(tmp_path), instance=instance)
    meta = latest_metadata(instance, "orders_wh")
    assert (meta[md.INSERTED], meta[md.UPDATED], meta[md.ROW_COUNT]) == (0, 5_000, 5_000)
    written = read(target)
    assert written.num_rows == 5_000 and set(written["v"].to_pylist()) == {
        f"b{i}" for i in range(5_000)
    }
    assert checks_of(result)[UNIQUE_KEYS].passed


def test_run_config_sets_the_chunk_size(tmp_path: Path) -> None:
    merged = build_merge_asset(
        "wh", source=orders, target_path=str(tmp_path / "t"), key_columns="id"
    )
    instance = dg.DagsterInstance.ephemeral()
    config = {"ops": {"wh": {"config": {"merge_chunk_size_rows": 1_000}}}}
    result = dg.materialize(
        [orders, merged], resources=resources(tmp_path), instance=instance, run_config=config
    )
    assert result.success
    meta = latest_metadata(instance, "wh")
    assert meta[md.CHUNK_SIZE_ROWS] == 1_000 and meta[md.CHUNKS] == 5
    assert meta[md.ROW_COUNT] == 5_000


def test_a_bad_chunk_size_in_run_config_is_refused_by_name(tmp_path: Path) -> None:
    target = tmp_path / "t"
    merged = build_merge_asset("wh", source=orders, target_path=str(target), key_columns="id")
    config = {"ops": {"wh": {"config": {"merge_chunk_size_rows": 0}}}}
    result = dg.materialize(
        [orders, merged], resources=resources(tmp_path), run_config=config, raise_on_error=False
    )
    [failure] = step_failures(result)
    message = failure.step_failure_data.error.to_string()
    assert "merge_chunk_size_rows must be a positive integer, got 0" in message
    assert not target.exists()


# -- every strategy --------------------------------------------------------------------------------

TARGET_ROWS = rows(range(0, 60), "t")
SOURCE_ROWS = rows(range(40, 100), "s")


@dg.asset
def changes() -> pa.Table:
    return SOURCE_ROWS


@pytest.mark.parametrize("strategy", ["insert", "update", "upsert", "delete", "full_merge"])
def test_every_strategy_through_the_factory(tmp_path: Path, strategy: str) -> None:
    target = tmp_path / "target"
    target.mkdir()
    pq.write_table(TARGET_ROWS.slice(0, 30), target / "a.parquet")
    pq.write_table(TARGET_ROWS.slice(30), target / "b.parquet")
    merged = build_merge_asset(
        f"merged_{strategy}",
        source=changes,
        target_path=str(target),
        key_columns=["id"],
        strategy=strategy,
    )
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize([changes, merged], resources=resources(tmp_path), instance=instance)
    assert result.success
    expected, counts = oracle(TARGET_ROWS.to_pylist(), SOURCE_ROWS.to_pylist(), strategy, ["id"])
    assert row_set(read(target)) == row_set(pa.Table.from_pylist(expected, TARGET_ROWS.schema))
    meta = latest_metadata(instance, f"merged_{strategy}")
    assert {k: meta[f"memsafe/{k}"] for k in counts} == counts
    assert meta[md.ROW_COUNT] == len(expected)
    assert meta[md.MERGE]["strategy"] == strategy
    assert checks_of(result)[UNIQUE_KEYS].passed


# -- an inbox of files -----------------------------------------------------------------------------


def drop(inbox: Path, name: str, table: pa.Table) -> Path:
    inbox.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, inbox / name)
    return inbox / name


def inbox_config(op: str, files: list[str]) -> dict:
    return {"ops": {op: {"config": {"files": files}}}}


def test_inbox_files_are_merged_once_and_archived_after_the_commit(tmp_path: Path) -> None:
    inbox, target = tmp_path / "inbox", tmp_path / "customers"
    merged = build_merge_asset(
        "customers",
        source=str(inbox),
        target_path=str(target),
        key_columns="id",
        on_duplicate_keys="last",
    )
    assert merge_asset_spec(merged)[INBOX] == str(inbox)
    instance = dg.DagsterInstance.ephemeral()
    a = drop(inbox, "a.parquet", rows(range(0, 10), "a"))
    time.sleep(0.02)
    b = drop(inbox, "b.parquet", rows(range(5, 15), "b"))  # newer: wins for 5..9
    (inbox / "notes.txt").write_text("not parquet")

    # Empty file list: every file now in the inbox, oldest first.
    result = dg.materialize([merged], resources=resources(tmp_path), instance=instance)
    assert result.success
    table = read(target).sort_by("id")
    assert table["id"].to_pylist() == list(range(15))
    assert table["v"].to_pylist() == [f"a{i}" for i in range(5)] + [f"b{i}" for i in range(5, 15)]
    meta = latest_metadata(instance, "customers")
    assert meta["memsafe/inbox_files"] == ["a.parquet", "b.parquet"]
    assert (meta[md.INSERTED], meta[md.ROW_COUNT]) == (15, 15)
    assert not a.exists() and not b.exists() and (inbox / "notes.txt").exists()
    archived = Path(meta["memsafe/inbox_archived_to"])
    assert archived.parent == inbox / "_processed"
    assert sorted(p.name for p in archived.iterdir()) == ["a.parquet", "b.parquet"]

    # Nothing left: a run merges nothing and changes nothing.
    before = snapshot(target)
    assert dg.materialize([merged], resources=resources(tmp_path), instance=instance).success
    meta = latest_metadata(instance, "customers")
    assert (meta[md.INSERTED], meta[md.UPDATED], meta[md.ROW_COUNT]) == (0, 0, 15)
    assert snapshot(target) == before

    # Named files (as the sensor passes them): only those; an already merged one is skipped.
    c = drop(inbox, "c.parquet", rows(range(10, 20), "c"))
    d = drop(inbox, "d.parquet", rows(range(100, 101), "d"))
    config = inbox_config("customers", [str(c), str(a)])
    result = dg.materialize(
        [merged], resources=resources(tmp_path), instance=instance, run_config=config
    )
    assert result.success
    meta = latest_metadata(instance, "customers")
    assert meta["memsafe/inbox_files"] == ["c.parquet"]
    assert (meta[md.INSERTED], meta[md.UPDATED], meta[md.ROW_COUNT]) == (5, 5, 20)
    assert not c.exists() and d.exists()

    # A name relative to the inbox works too; a path outside it is refused.
    result = dg.materialize(
        [merged],
        resources=resources(tmp_path),
        instance=instance,
        run_config=inbox_config("customers", ["d.parquet"]),
    )
    assert result.success and not d.exists() and read(target).num_rows == 21
    outside = drop(tmp_path / "elsewhere", "x.parquet", rows(range(1), "x"))
    result = dg.materialize(
        [merged],
        resources=resources(tmp_path),
        instance=instance,
        run_config=inbox_config("customers", [str(outside)]),
        raise_on_error=False,
    )
    [failure] = step_failures(result)
    assert "is not a file in the inbox" in failure.step_failure_data.error.to_string()
    assert outside.exists()


def test_a_failed_inbox_merge_leaves_the_files_and_the_target(tmp_path: Path) -> None:
    inbox, target = tmp_path / "inbox", tmp_path / "t"
    merged = build_merge_asset(
        "strict", source=str(inbox), target_path=str(target), key_columns="id"
    )
    instance = dg.DagsterInstance.ephemeral()
    drop(inbox, "a.parquet", rows(range(0, 10), "a"))
    assert dg.materialize([merged], resources=resources(tmp_path), instance=instance).success
    before = snapshot(target)
    b = drop(inbox, "b.parquet", rows(range(5, 8), "b"))
    c = drop(inbox, "c.parquet", rows(range(6, 9), "c"))  # 6, 7 twice: duplicate source keys
    result = dg.materialize(
        [merged], resources=resources(tmp_path), instance=instance, raise_on_error=False
    )
    [failure] = step_failures(result)
    assert "duplicate" in failure.step_failure_data.error.to_string().lower()
    assert b.exists() and c.exists()  # not archived: the next attempt merges them
    assert snapshot(target) == before


def test_inbox_files_with_different_schemas(tmp_path: Path) -> None:
    """Files of one batch are unified: an int32 key next to int64 merges; a column the target
    does not know is refused (not silently dropped) and the files stay in the inbox."""
    inbox, target = tmp_path / "inbox", tmp_path / "t"
    merged = build_merge_asset(
        "mixed", source=str(inbox), target_path=str(target), key_columns="id"
    )
    instance = dg.DagsterInstance.ephemeral()
    drop(inbox, "a.parquet", rows(range(0, 5), "a"))
    narrow = pa.table({"id": pa.array(range(5, 8), pa.int32()), "v": ["b5", "b6", "b7"]})
    drop(inbox, "b.parquet", narrow)
    assert dg.materialize([merged], resources=resources(tmp_path), instance=instance).success
    table = read(target)
    assert table.schema.field("id").type == pa.int64() and table.num_rows == 8

    drop(inbox, "c.parquet", rows(range(8, 9), "c"))
    wide = rows(range(9, 10), "d").append_column("phone", pa.array(["555"]))
    d = drop(inbox, "d.parquet", wide)
    before = snapshot(target)
    result = dg.materialize(
        [merged], resources=resources(tmp_path), instance=instance, raise_on_error=False
    )
    [failure] = step_failures(result)
    assert "phone" in failure.step_failure_data.error.to_string()
    assert d.exists() and (inbox / "c.parquet").exists()
    assert snapshot(target) == before
    for bad in ("../t/x.parquet", "_processed/x.parquet"):
        result = dg.materialize(
            [merged],
            resources=resources(tmp_path),
            instance=instance,
            run_config=inbox_config("mixed", [bad]),
            raise_on_error=False,
        )
        [failure] = step_failures(result)
        assert "is not a file in the inbox" in failure.step_failure_data.error.to_string()


# -- partitions ------------------------------------------------------------------------------------

DAYS = dg.DailyPartitionsDefinition(start_date="2024-01-01", end_date="2024-01-04")


@dg.asset(partitions_def=DAYS)
def daily(context: dg.AssetExecutionContext) -> ChunkStream:
    day = DAYS.get_partition_keys().index(context.partition_key)
    table = rows(range(day * 100, day * 100 + 150), context.partition_key)  # 50 overlap
    return ChunkStream.from_batches(table.to_batches(40))


def test_partitions_map_one_to_one_into_a_dataset_each(tmp_path: Path) -> None:
    merged = build_merge_asset(
        "daily_wh",
        source=daily,
        target_path=str(tmp_path / "wh" / "{partition_key}"),
        key_columns="id",
    )
    assert merged.partitions_def == DAYS
    instance = dg.DagsterInstance.ephemeral()
    for key in ("2024-01-01", "2024-01-02"):
        result = dg.materialize(
            [daily, merged], resources=resources(tmp_path), instance=instance, partition_key=key
        )
        assert result.success
        table = read(tmp_path / "wh" / key)
        assert table.num_rows == 150 and set(table["v"].to_pylist()) == {
            f"{key}{i}" for i in table["id"].to_pylist()
        }
        meta = latest_metadata(instance, "daily_wh", partition=key)
        assert meta[md.ROW_COUNT] == meta[md.PARTITION_ROW_COUNT] == 150
        assert meta[md.INSERTED] == 150
        assert Path(meta[md.URI]) == tmp_path / "wh" / key


def test_partitions_merge_into_one_shared_target(tmp_path: Path) -> None:
    target = tmp_path / "all"
    merged = build_merge_asset("all_days", source=daily, target_path=str(target), key_columns="id")
    instance = dg.DagsterInstance.ephemeral()
    expected = [(150, 0, 150), (100, 50, 250), (100, 50, 350)]
    for key, counts in zip(DAYS.get_partition_keys(), expected, strict=True):
        dg.materialize(
            [daily, merged], resources=resources(tmp_path), instance=instance, partition_key=key
        )
        meta = latest_metadata(instance, "all_days", partition=key)
        assert (meta[md.INSERTED], meta[md.UPDATED], meta[md.ROW_COUNT]) == counts
        assert md.PARTITION_ROW_COUNT not in meta
    assert read(target).num_rows == 350


REGION_DAYS = dg.MultiPartitionsDefinition(
    {"date": DAYS, "region": dg.StaticPartitionsDefinition(["eu", "us"])}
)


def test_multi_partition_dimensions_fill_the_target_path(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    merged = build_merge_asset(
        "regional",
        source=str(inbox / "{region}"),
        target_path=str(tmp_path / "wh" / "{region}" / "{date}"),
        key_columns="id",
        partitions_def=REGION_DAYS,
    )
    drop(inbox / "us", "x.parquet", rows(range(3), "x"))
    key = dg.MultiPartitionKey({"date": "2024-01-02", "region": "us"})
    result = dg.materialize(
        [merged], resources=resources(tmp_path), partition_key=str(key), raise_on_error=True
    )
    assert result.success
    assert read(tmp_path / "wh" / "us" / "2024-01-02").num_rows == 3


# -- checks ----------------------------------------------------------------------------------------


def test_unique_keys_fails_on_duplicates_another_writer_left(tmp_path: Path) -> None:
    target = tmp_path / "t"
    target.mkdir()
    pq.write_table(rows(range(0, 10), "t"), target / "a.parquet")
    pq.write_table(rows(range(5, 7), "dup"), target / "b.parquet")  # 5, 6 twice
    merged = build_merge_asset(
        "dups", source=changes, target_path=str(target), key_columns="id", strategy="insert"
    )
    result = dg.materialize([changes, merged], resources=resources(tmp_path))
    check = checks_of(result)[UNIQUE_KEYS]
    assert not check.passed and check.severity == dg.AssetCheckSeverity.ERROR
    assert check.metadata["duplicate_keys"].value == 2
    assert check.metadata["duplicate_rows"].value == 4
    examples = check.metadata["examples"].value
    assert sorted(e["key"]["id"] for e in examples) == [5, 6]
    assert all(e["count"] == 2 for e in examples)


def test_memory_headroom_warns_below_the_threshold(tmp_path: Path) -> None:
    huge = detect_memory_limits().limit_bytes / 2**20 * 2
    merged = build_merge_asset(
        "tight",
        source=changes,
        target_path=str(tmp_path / "t"),
        key_columns="id",
        min_headroom_mb=huge,
        check_unique_keys=False,
    )
    result = dg.materialize([changes, merged], resources=resources(tmp_path))
    assert result.success
    checks = checks_of(result)
    assert set(checks) == {MEMORY_HEADROOM}
    check = checks[MEMORY_HEADROOM]
    assert not check.passed and check.severity == dg.AssetCheckSeverity.WARN
    assert check.metadata["memsafe/min_headroom_mb"].value == pytest.approx(huge, abs=0.01)
    assert "lower merge_chunk_size_rows" in check.description


def test_memory_headroom_reads_as_the_level_the_peak_must_stay_under(tmp_path: Path) -> None:
    """Worded "peak X MB, WARNING level Y MB (70 % of the Z MB budget)", not as free memory."""
    merged = build_merge_asset(
        "calm", source=changes, target_path=str(tmp_path / "t"), key_columns="id"
    )
    budget = 20_000
    result = dg.materialize(
        [changes, merged], resources=resources(tmp_path, max_process_memory_mb=budget)
    )
    check = checks_of(result)[MEMORY_HEADROOM]
    assert check.passed, check.description
    match = re.match(
        r"peak (\d+) MB, WARNING level (\d+) MB \(70 % of the (\d+) MB budget\); limit ",
        check.description or "",
    )
    assert match, check.description
    peak, level, said_budget = map(int, match.groups())
    assert said_budget == budget and level == round(0.7 * budget) and 0 < peak < level


def test_materialization_metadata_opens_with_the_figures_people_look_at(tmp_path: Path) -> None:
    """Pressure, peak, step increment, headroom, limit and counts first; JSON last; the data's
    location once, as ``dagster/uri``, read back from the instance."""
    merged = build_merge_asset(
        "ordered", source=changes, target_path=str(tmp_path / "t"), key_columns="id"
    )
    with dg.instance_for_test() as instance:
        result = dg.materialize([changes, merged], resources=resources(tmp_path), instance=instance)
        assert result.success
        keys = list(latest_metadata(instance, "ordered"))
    first = [k for k in md.FIRST_LOOK if k in keys]
    assert keys[: len(first)] == first, keys
    assert first[:3] == [md.PRESSURE, md.PEAK_RSS_MB, md.STEP_RSS_MB], first
    assert {md.HEADROOM_MB, md.LIMIT_MB, md.INSERTED, md.ROW_COUNT, md.URI} <= set(first)
    json_keys = [md.MERGE, md.BUDGETS, md.COLUMN_SCHEMA]
    assert all(keys.index(j) > keys.index(md.CHUNK_SIZE_ROWS) for j in json_keys), keys
    assert md.PATH not in keys and keys.count(md.URI) == 1


# -- EMERGENCY and retries -------------------------------------------------------------------------


def seeded_target(tmp_path: Path) -> Path:
    target = tmp_path / "target"
    target.mkdir()
    pq.write_table(rows(range(0, 3_000), "t"), target / "a.parquet")
    return target


def test_emergency_fails_with_the_memsafe_failure_and_the_target_untouched(
    tmp_path: Path,
) -> None:
    target = seeded_target(tmp_path)
    before = snapshot(target)
    merged = build_merge_asset("doomed", source=orders, target_path=str(target), key_columns="id")
    result = dg.materialize(
        [orders, merged], resources=resources(tmp_path, **IMPOSSIBLE), raise_on_error=False
    )
    [failure] = step_failures(result)
    description, metadata = failure_data(failure)
    assert description.startswith("memsafe: memory pressure EMERGENCY during merging asset orders")
    assert "process RSS" in description and ">= max_process_memory_mb 1" in description
    assert metadata[md.PRESSURE] == "emergency"
    for key in md.MEMORY_KEYS:
        assert key in metadata
    assert metadata[md.CHUNK_SIZE_ROWS] == 100_000 and metadata[md.RETRY_NUMBER] == 0
    assert snapshot(target) == before


class ScriptedFeed(dg.IOManager):
    """Hands the merge a stream that raises the alarm while it is being merged."""

    def __init__(self, alarm: threading.Event) -> None:
        self.alarm = alarm

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        return None

    def load_input(self, context: dg.InputContext) -> ChunkStream:
        def batches():
            for i in range(8):
                if i == 4:
                    self.alarm.set()
                yield rows(range(i * 1_000, (i + 1) * 1_000), "new").to_batches()[0]

        return ChunkStream.from_batches(batches())


@dg.asset(io_manager_key="feed_io")
def feed() -> None:
    return None


def test_emergency_mid_merge_leaves_the_target_byte_for_byte(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EMERGENCY after half the source was staged: nothing published, no staging left."""
    target = seeded_target(tmp_path)
    before = snapshot(target)
    alarm = threading.Event()
    classify = MemoryMonitor.classify

    def scripted(self: MemoryMonitor, reading: Any) -> MemoryPressureLevel:
        return MemoryPressureLevel.EMERGENCY if alarm.is_set() else classify(self, reading)

    monkeypatch.setattr(MemoryMonitor, "classify", scripted)
    merged = build_merge_asset(
        "mid", source=feed, target_path=str(target), key_columns="id", merge_chunk_size_rows=500
    )
    result = dg.materialize(
        [feed, merged],
        resources={**resources(tmp_path), "feed_io": ScriptedFeed(alarm)},
        selection=[merged],
        raise_on_error=False,
    )
    assert alarm.is_set()
    [failure] = step_failures(result)
    description, metadata = failure_data(failure)
    assert description.startswith("memsafe: memory pressure EMERGENCY")
    assert "ingest" in metadata[md.DETAIL]
    assert snapshot(target) == before


def test_each_retry_halves_the_merge_chunk_size(tmp_path: Path) -> None:
    target = seeded_target(tmp_path)
    before = snapshot(target)
    merged = build_merge_asset(
        "retried",
        source=orders,
        target_path=str(target),
        key_columns="id",
        merge_chunk_size_rows=1_000,
        retry_policy=dg.RetryPolicy(max_retries=2),
    )
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize(
        [orders, merged],
        resources=resources(tmp_path, **RETRYABLE),
        instance=instance,
        raise_on_error=False,
    )
    retries = events_of_type(instance, result.run_id, dg.DagsterEventType.STEP_UP_FOR_RETRY)
    texts = [e.event_specific_data.error.to_string() for e in retries]
    assert len(texts) == 2
    assert "merge_chunk_size_rows=1000, retry 0" in texts[0]
    assert "merge_chunk_size_rows=500, retry 1" in texts[1]
    [failure] = step_failures(result)
    description, metadata = failure_data(failure)
    assert "merge_chunk_size_rows=250, retry 2" in description
    assert metadata[md.CHUNK_SIZE_ROWS] == 250 and metadata[md.RETRY_NUMBER] == 2
    assert snapshot(target) == before


# -- one writer per target -------------------------------------------------------------------------


def test_the_pool_is_derived_from_the_target(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    a = build_merge_asset("a", source=changes, target_path="wh/orders", key_columns="id")
    b = build_merge_asset(
        "b", source=changes, target_path=f"file://{tmp_path}/wh/orders/", key_columns="id"
    )
    c = build_merge_asset(
        "c", source=changes, target_path=str(tmp_path / "wh" / "other"), key_columns="id"
    )
    assert a.op.pool == b.op.pool == merge_pool_name(str(tmp_path / "wh" / "orders"))
    assert a.op.pool.startswith("memsafe-merge-wh-orders-")
    assert c.op.pool != a.op.pool
    own = build_merge_asset("d", source=changes, target_path="x", key_columns="id", pool="mine")
    assert own.op.pool == "mine"


def test_dagster_waits_for_the_pool_slot_of_the_target(tmp_path: Path) -> None:
    merged = build_merge_asset(
        "pooled", source=changes, target_path=str(tmp_path / "t"), key_columns="id"
    )
    pool = merged.op.pool
    overrides = {"concurrency": {"pools": {"default_limit": 1}}}
    with dg.instance_for_test(overrides=overrides) as instance:
        storage = instance.event_log_storage
        storage.initialize_concurrency_limit_to_default(pool)
        # Another run's merge into the same target holds the slot.
        storage.claim_concurrency_slot(pool, "other-run", "other-step")
        done: dict[str, Any] = {}
        runner = threading.Thread(
            target=lambda: done.update(
                result=dg.materialize(
                    [changes, merged], resources=resources(tmp_path), instance=instance
                )
            )
        )
        runner.start()
        time.sleep(2.0)
        assert runner.is_alive() and not (tmp_path / "t").exists()
        storage.free_concurrency_slot_for_step("other-run", "other-step")
        runner.join(60)
        assert done["result"].success
        assert read(tmp_path / "t").num_rows == SOURCE_ROWS.num_rows
        messages = [e.message for e in done["result"].all_events if e.message]
        assert any(f"blocked by limit for pool {pool}" in m for m in messages)


def test_the_dataset_lock_is_the_second_line_of_defence(tmp_path: Path) -> None:
    target = seeded_target(tmp_path)
    before = snapshot(target)
    merged = build_merge_asset(
        "locked", source=changes, target_path=str(target), key_columns="id", lock_timeout_s=0.3
    )
    fs, path = resolve_filesystem(str(target))
    with DatasetLock(fs, path, timeout_s=1):
        result = dg.materialize(
            [changes, merged], resources=resources(tmp_path), raise_on_error=False
        )
        before_release = snapshot(target)
    [failure] = step_failures(result)
    assert "is locked by another writer" in failure.step_failure_data.error.to_string()
    assert {k: v for k, v in before_release.items() if "_memsafe" not in k} == before


# -- definitions are checked when built ------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"strategy": "merge"}, "strategy must be one of"),
        ({"on_duplicate_keys": "newest"}, "on_duplicate_keys must be one of"),
        ({"key_columns": []}, "key_columns must be one or more column names"),
        ({"key_columns": ["id", "id"]}, "repeated column"),
        ({"merge_chunk_size_rows": 0}, "merge_chunk_size_rows must be a positive integer"),
        ({"row_grop_size": 10}, "unknown merge option"),
        ({"target_path": "/x/{partition_key}"}, "not partitioned: pass partitions_def"),
        ({"target_path": "/x/{day}", "partitions_def": DAYS}, "unknown placeholder"),
        ({"min_headroom_mb": -1}, "min_headroom_mb must be a positive number"),
        ({"source": 42}, "source must be an upstream AssetsDefinition"),
    ],
)
def test_bad_definitions_are_refused_by_name(kwargs: dict, message: str) -> None:
    arguments = {"source": changes, "target_path": "/tmp/x", "key_columns": "id", **kwargs}
    with pytest.raises((ValueError, TypeError), match=message):
        build_merge_asset("bad", **arguments)
