"""MergeRequest: everything one merge is asked to do, validated once, frozen.

Every entry point (``merge_dataset``, ``PyarrowDatasetIO.merge``, the Dagster merge asset at
definition time, the CLI) builds a request with ``MergeRequest.create``; the engine only reads
it. A bad parameter is a ``ValueError`` naming it, raised before any I/O. The memory budget is
not held here as numbers the engine could use beside the monitor's: the request names the
monitor to use (or the three figures to build one from), and ``budget.MergeBudget`` derives
every allowance from that one monitor.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from memsafe_dagster.checks import non_negative_number, optional_positive_number, positive_int
from memsafe_dagster.datasets.keys import normalize_key_columns
from memsafe_dagster.datasets.merge.options import MergeOptions
from memsafe_dagster.datasets.merge.strategy import RULES, StrategyRule
from memsafe_dagster.datasets.merge.validate import check_duplicate_policy, check_strategy
from memsafe_dagster.memory import MemoryMonitor

ProgressCallback = Callable[[int, int], Any]


@dataclass(frozen=True)
class MemoryRequest:
    """The three budgets a merge's monitor is built from when no monitor is given."""

    max_memory_mb: float = 1024
    max_process_memory_mb: float | None = None
    min_system_available_mb: float = 512

    def __post_init__(self) -> None:
        non_negative_number("merge_max_memory_mb", self.max_memory_mb, unit="MB")
        non_negative_number(
            "merge_min_system_available_mb", self.min_system_available_mb, unit="MB"
        )
        optional_positive_number(
            "merge_max_process_memory_mb", self.max_process_memory_mb, unit="MB"
        )


@dataclass(frozen=True, eq=False)
class MergeRequest:
    """One merge's parameters (see ``merge_dataset`` for what each means)."""

    strategy: str
    keys: tuple[str, ...]
    on_duplicate: str = "error"
    chunk_rows: int = 100_000
    streaming: bool = True
    options: MergeOptions = dataclasses.field(default_factory=MergeOptions)
    memory: MemoryRequest = dataclasses.field(default_factory=MemoryRequest)
    monitor: MemoryMonitor | None = None
    progress: ProgressCallback | None = None

    @classmethod
    def create(
        cls,
        *,
        strategy: str = "upsert",
        key_columns: str | Sequence[str] | None,
        on_duplicate_keys: str = "error",
        merge_chunk_size_rows: int = 100_000,
        enable_streaming_merge: bool = True,
        merge_max_memory_mb: float = 1024,
        merge_max_process_memory_mb: float | None = None,
        merge_min_system_available_mb: float = 512,
        memory_monitor: MemoryMonitor | None = None,
        merge_progress_callback: ProgressCallback | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> MergeRequest:
        """A validated request; every problem is a ``ValueError`` naming the parameter."""
        return cls(
            strategy=check_strategy(strategy),
            keys=normalize_key_columns(key_columns),
            on_duplicate=check_duplicate_policy(on_duplicate_keys),
            chunk_rows=positive_int("merge_chunk_size_rows", merge_chunk_size_rows),
            streaming=bool(enable_streaming_merge),
            options=MergeOptions.from_kwargs(options or {}),
            memory=MemoryRequest(
                merge_max_memory_mb, merge_max_process_memory_mb, merge_min_system_available_mb
            ),
            monitor=memory_monitor,
            progress=merge_progress_callback,
        )

    @property
    def rule(self) -> StrategyRule:
        """The strategy table's row for this merge."""
        return RULES[self.strategy]

    def with_chunk_rows(self, rows: int) -> MergeRequest:
        """The same request with another chunk size (a retry halves it)."""
        return dataclasses.replace(self, chunk_rows=positive_int("merge_chunk_size_rows", rows))

    def with_memory(
        self, monitor: MemoryMonitor | None, progress: ProgressCallback | None = None
    ) -> MergeRequest:
        """The same request watched by ``monitor`` (and reporting to ``progress``)."""
        return dataclasses.replace(self, monitor=monitor, progress=progress or self.progress)
