"""The merge's tuning options (``**options`` of ``merge_dataset``), validated up front."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from memsafe_dagster.checks import (
    non_negative_seconds,
    optional_positive_int,
    optional_positive_number,
    positive_int,
)
from memsafe_dagster.datasets.parquet import check_compression

DUPLICATE_POLICIES = ("error", "first", "last")
MEMORY_POOLS = ("auto", "default", "jemalloc", "mimalloc", "system")
MISSING_COLUMN_POLICIES = ("error", "null")

DEFAULT_ROW_GROUP_SIZE = 131_072
DEFAULT_TARGET_FILE_ROWS = 1_048_576


@dataclass(frozen=True)
class MergeOptions:
    """Options of ``merge_dataset`` beyond the contract's parameters.

    - ``row_group_size``: rows per row group in every file the merge writes (default 131072,
      lowered automatically when such a row group would not fit the memory budget).
    - ``target_file_rows``: at most this many rows per file of new rows (default 1048576), so
      merges do not leave a swarm of tiny files.
    - ``compact_small_files``: fold the under-full files of new rows that earlier merges left
      (``ins-*.parquet`` below ``target_file_rows``) into this merge's new files (default True).
    - ``compression``: codec of written files; default: the target's own codec (zstd for a new
      dataset). ``compression_level`` passes through.
    - ``use_dictionary``: True/False/list of columns; default: dictionary-encode only the
      columns whose values repeat (sampled), which writes several times faster.
    - ``lock_timeout_s``: how long a second writer waits for the lock (default 30 s) before
      ``DatasetLockedError``.
    - ``workers``: files processed concurrently, at most (default: CPUs available, at most
      4); fewer when the process budget cannot hold that many, and 1 under memory pressure.
    - ``background_writes``: encode and write output files in their own threads, so reading
      the next rows overlaps writing the last ones (default: when there are more CPUs than
      files to rewrite at once, e.g. a single touched file).
    - ``index_memory_mb``: memory for the in-memory source key index (default 40 % of
      ``merge_max_memory_mb``); a larger source is spilled to disk and matched in passes.
    - ``durable``: fsync staged files and the commit record (survives power loss, not only
      process death; slower).
    - ``missing_columns``: what to do when the source lacks a (nullable, non-key) column of the
      target. "error" (default): refuse, naming the columns, because a replaced row would lose
      its values there. "null": write nulls in those columns (new rows and replaced rows).
    - ``allow_empty_source``: let ``full_merge`` with a source of no rows empty a non-empty
      target (default False: refused, since an empty upstream is far more often a fault than
      an intent).
    - ``memory_pool``: the Arrow allocator while the merge runs: "auto" (default: jemalloc
      when this PyArrow has it; on the 10M/1M upsert it spent half the page-fault time of
      mimalloc for the same peak RSS), "jemalloc", "mimalloc", "system", or "default" (leave
      the process's pool alone). The previous pool is restored afterwards.
    """

    row_group_size: int | None = None
    target_file_rows: int = DEFAULT_TARGET_FILE_ROWS
    compact_small_files: bool = True
    compression: str | None = None
    compression_level: int | None = None
    use_dictionary: bool | Sequence[str] | None = None
    lock_timeout_s: float = 30.0
    workers: int | None = None
    background_writes: bool | None = None
    index_memory_mb: float | None = None
    durable: bool = False
    missing_columns: str = "error"
    allow_empty_source: bool = False
    memory_pool: str = "auto"

    @classmethod
    def from_kwargs(cls, options: Mapping[str, Any]) -> MergeOptions:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown merge option(s) {unknown}: expected any of {sorted(known)}")
        opts = cls(**dict(options))
        opts.validate()
        return opts

    def validate(self) -> None:
        optional_positive_int("row_group_size", self.row_group_size)
        positive_int("target_file_rows", self.target_file_rows)
        optional_positive_int("workers", self.workers)
        if self.compression is not None:
            check_compression(self.compression, self.compression_level)
        non_negative_seconds("lock_timeout_s", self.lock_timeout_s)
        optional_positive_number("index_memory_mb", self.index_memory_mb, unit="MB")
        if self.missing_columns not in MISSING_COLUMN_POLICIES:
            raise ValueError(
                f"missing_columns must be one of {list(MISSING_COLUMN_POLICIES)}, got "
                f"{self.missing_columns!r}"
            )
        if self.memory_pool not in MEMORY_POOLS:
            raise ValueError(
                f"memory_pool must be one of {list(MEMORY_POOLS)}, got {self.memory_pool!r}"
            )
        if not isinstance(self.use_dictionary, (bool, type(None))) and (
            isinstance(self.use_dictionary, str)
            or not all(isinstance(c, str) for c in self.use_dictionary)
        ):
            raise ValueError(
                f"use_dictionary must be True, False or a list of column names, got "
                f"{self.use_dictionary!r}"
            )

    def worker_count(self) -> int:
        if self.workers is not None:
            return self.workers
        return max(1, min(self.cpu_count(), 4))

    @staticmethod
    def cpu_count() -> int:
        """CPUs this process may run on."""
        try:
            return len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            return os.cpu_count() or 1
