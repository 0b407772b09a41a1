"""The write plan (``merge.plan.plan_writes``) against the strategy table, file by file, and the
budget every allowance is derived from (``merge.budget.MergeBudget``)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from memsafe_dagster.datasets.merge.budget import (
    INDEX_BYTES_PER_KEY,
    MergeBudget,
)
from memsafe_dagster.datasets.merge.options import DEFAULT_ROW_GROUP_SIZE, MergeOptions
from memsafe_dagster.datasets.merge.plan import plan_writes
from memsafe_dagster.datasets.merge.request import MergeRequest
from memsafe_dagster.datasets.merge.strategy import RULES
from memsafe_dagster.memory import MemoryLimits, MemoryMonitor

MiB = 2**20


@dataclass
class File:
    path: str
    rows: int
    matched: int

    @property
    def rel(self) -> str:
        return self.path

    @property
    def is_ins_file(self) -> bool:
        return self.path.startswith("ins-")


def files() -> list[File]:
    return [
        File("part-a.parquet", rows=1000, matched=10),  # a few matched keys: rewritten
        File("part-b.parquet", rows=1000, matched=0),  # untouched
        File("part-c.parquet", rows=50, matched=50),  # every row matched: nothing survives
        File("ins-d.parquet", rows=40, matched=5),  # an earlier merge's small file
        File("ins-e.parquet", rows=30, matched=0),  # an earlier merge's small file, untouched
    ]


def plan(strategy: str, **kwargs):
    defaults = dict(
        source_rows=100, source_matched=65, source_dropped=0, target_file_rows=1_000_000
    )
    defaults.update(kwargs)
    return plan_writes(RULES[strategy], files(), **defaults)


def names(items) -> list[str]:
    return sorted(getattr(i, "file", i).path for i in items)


@pytest.mark.parametrize("strategy", ["update", "upsert", "delete"])
def test_strategies_that_drop_matched_rows_rewrite_only_files_holding_them(strategy: str) -> None:
    p = plan(strategy, target_file_rows=4000)  # survivors under 500 rows count as small
    assert names(p.replaced) == ["ins-d.parquet", "part-a.parquet", "part-c.parquet"]
    assert names(p.emptied) == ["part-c.parquet"]
    # A big file keeps its survivors in a file of its own; small survivors and an earlier
    # merge's file join the new rows.
    into = {r.file.path: r.into for r in p.rewrites if r.file in p.replaced}
    assert into == {"part-a.parquet": "own", "ins-d.parquet": "new_rows"}
    assert "part-b.parquet" not in names(p.removed)


def test_insert_removes_no_file_for_its_matches_and_compacts_keeping_every_row() -> None:
    p = plan("insert")
    assert p.replaced == [] and p.emptied == []
    # The two small files of earlier merges are folded into the new rows (the rewrite keeps
    # all their rows: RULES["insert"].target_rows_kept).
    assert names(p.compacted) == ["ins-d.parquet", "ins-e.parquet"]
    assert all(r.into == "new_rows" for r in p.rewrites)
    assert (p.inserted, p.updated, p.deleted) == (35, 0, 0)
    assert p.source_rows_out == 35


def test_full_merge_replaces_every_file_and_copies_nothing() -> None:
    p = plan("full_merge")
    assert names(p.replaced) == [f.path for f in sorted(files(), key=lambda f: f.path)]
    assert p.rewrites == [] and p.emptied == []
    assert p.deleted == sum(f.rows for f in files()) - 65
    assert p.updated == 65 and p.inserted == 35


@pytest.mark.parametrize(
    ("strategy", "counts", "out"),
    [
        ("insert", (35, 0, 0), 35),
        ("update", (0, 65, 0), 65),
        ("upsert", (35, 65, 0), 100),
        ("delete", (0, 0, 65), 0),
    ],
)
def test_counts_and_rows_written(strategy: str, counts: tuple, out: int) -> None:
    p = plan(strategy)
    assert (p.inserted, p.updated, p.deleted) == counts
    assert p.source_rows_out == out


def test_dropped_duplicates_are_neither_new_nor_written() -> None:
    p = plan("upsert", source_rows=120, source_dropped=20)
    assert p.inserted == 35 and p.source_rows_out == 100


def test_compaction_fills_only_the_room_left_in_the_last_new_file() -> None:
    # insert writes 35 rows; in files of 100 that leaves 65 rows of room: the 30-row file
    # (smallest first) fits, then the 40-row one no longer does.
    assert names(plan("insert", target_file_rows=100).compacted) == ["ins-e.parquet"]
    # upsert writes 100 rows: 20 rows of room in files of 120, so neither fits; ins-d holds
    # matched rows and is rewritten anyway, never compacted.
    assert plan("upsert", target_file_rows=120).compacted == []
    assert names(plan("upsert", target_file_rows=150).compacted) == ["ins-e.parquet"]


def test_no_compaction_when_nothing_is_written_or_when_switched_off() -> None:
    assert plan("delete").compacted == []
    assert plan("insert", compact_small_files=False).compacted == []


def test_an_empty_full_merge_is_refused_unless_allowed() -> None:
    unmatched = [File(f.path, f.rows, 0) for f in files()]
    empty = dict(source_rows=0, source_matched=0, source_dropped=0, target_file_rows=1000)
    with pytest.raises(ValueError, match="would delete all 2,120 rows"):
        plan_writes(RULES["full_merge"], unmatched, **empty)
    p = plan_writes(RULES["full_merge"], unmatched, allow_empty_source=True, **empty)
    assert p.deleted == 2120 and names(p.replaced) == names(unmatched)


# -- the budget ------------------------------------------------------------------------------


def monitor(pyarrow: float, process: float | None, floor: float, limit_mb: int) -> MemoryMonitor:
    limits = MemoryLimits(limit_mb * MiB, "physical", limit_mb * MiB)
    return MemoryMonitor(pyarrow, process, floor, limits=limits)


def test_budget_follows_the_monitor_not_the_request_defaults() -> None:
    # The request's own figures (1024 MB PyArrow by default) are only used to build a monitor
    # when none is given: with a monitor, every allowance follows it.
    request = MergeRequest.create(key_columns="k", memory_monitor=monitor(200, 300, 50, 1000))
    assert request.memory.max_memory_mb == 1024
    budget = MergeBudget.of(request.monitor, request.options)
    assert budget.pyarrow_bytes == 200 * MiB and budget.process_bytes == 300 * MiB
    assert budget.index_bytes == int(0.4 * 200 * MiB)


def test_index_budget_is_the_smaller_share_or_the_explicit_option() -> None:
    assert MergeBudget.of(monitor(1000, 300, 0, 4000), MergeOptions()).index_bytes == int(
        0.4 * 300 * MiB
    )
    explicit = MergeBudget.of(monitor(1000, 300, 0, 4000), MergeOptions(index_memory_mb=7))
    assert explicit.index_bytes == 7 * MiB


def test_without_a_process_budget_the_container_bounds_the_workers() -> None:
    budget = MergeBudget.of(monitor(1000, None, 100, 600), MergeOptions())
    assert not budget.explicit_process_budget and budget.process_bytes == 500 * MiB
    # 75 % of 500 MB less 200 MB in use: ~175 MB, two files of ~92 MB do not fit.
    workers = budget.affordable_workers(
        4,
        row_group_rows=131_072,
        row_bytes=64,
        source_rows=0,
        current_rss_bytes=200 * MiB,
    )
    assert workers == 1
    roomy = MergeBudget.of(monitor(1000, None, 100, 4000), MergeOptions())
    assert (
        roomy.affordable_workers(
            4, row_group_rows=131_072, row_bytes=64, source_rows=0, current_rss_bytes=200 * MiB
        )
        == 4
    )


def test_the_key_index_counts_against_the_workers() -> None:
    budget = MergeBudget.of(monitor(1000, 1000, 0, 4000), MergeOptions())
    args = dict(row_group_rows=16_384, row_bytes=64, current_rss_bytes=100 * MiB)
    assert budget.affordable_workers(4, source_rows=0, **args) == 4
    rows = int(600 * MiB / INDEX_BYTES_PER_KEY)  # an index of 600 MB
    assert budget.affordable_workers(4, source_rows=rows, **args) == 1


def test_row_groups_stay_under_a_share_of_the_pyarrow_budget() -> None:
    budget = MergeBudget.of(monitor(100, None, 0, 4000), MergeOptions())
    assert budget.row_group_rows(None, 2) == DEFAULT_ROW_GROUP_SIZE
    assert budget.row_group_rows(10, 2) == DEFAULT_ROW_GROUP_SIZE  # narrow rows: the default
    wide = budget.row_group_rows(1000, 2)  # 5 % of 100 MB over two files, 1 KB rows
    assert wide == int(0.05 * 100 * MiB / 2 // 1000)
    assert budget.row_group_rows(10**9, 1) == 1_024  # never below the floor


def test_a_request_is_validated_once_with_errors_naming_the_parameter() -> None:
    with pytest.raises(ValueError, match="merge_chunk_size_rows must be a positive integer"):
        MergeRequest.create(key_columns="k", merge_chunk_size_rows=0)
    with pytest.raises(ValueError, match="unknown merge strategy 'merge'"):
        MergeRequest.create(key_columns="k", strategy="merge")
    with pytest.raises(ValueError, match="merge_max_process_memory_mb must be a positive"):
        MergeRequest.create(key_columns="k", merge_max_process_memory_mb=-1)
    with pytest.raises(ValueError, match="unknown merge option"):
        MergeRequest.create(key_columns="k", options={"nope": 1})
    request = MergeRequest.create(key_columns="a, b", strategy="delete")
    assert request.keys == ("a", "b") and request.rule is RULES["delete"]
    assert request.with_chunk_rows(10).chunk_rows == 10 and request.chunk_rows == 100_000
