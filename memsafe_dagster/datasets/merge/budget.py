"""MergeBudget: how a merge spends its memory, derived once from the one monitor that guards it.

The monitor (given by the caller, or built from the request's three figures) is the only source
of budgets: the guard classifies pressure against it, and every allowance below comes from it.

- **process budget**: the monitor's process budget, else what the container may use (its limit
  minus the memory it must keep free);
- **index**: the source key index may take 40 % of the smaller of the PyArrow and process
  budgets (``index_memory_mb`` overrides); past that it spills to disk and is matched in passes;
- **chunks**: a chunk of each file in flight stays within its share of ``CHUNK_BUDGET_SHARE`` of
  the smaller budget, from the rows' width in the footers (``merge_chunk_size_rows`` is a
  maximum); no column chunk may exceed that smaller budget (refused before anything is staged);
- **row groups**: one row group being written is buffered per output file, so a row group
  stays under 5 % of the PyArrow budget per file in flight;
- **workers**: each file in flight holds about eight row groups' worth of buffers (decoded
  batch, survivors, the row group being encoded, allocator slack) plus about 24 MB of its own
  (reader and writer state, the thread's allocator cache); the key index takes
  ``INDEX_BYTES_PER_KEY`` per source row. Files run at once only while that fits in 75 % of the
  process budget (an explicit ``workers`` is a maximum too);
- **object-store buffers**: on an object store every open file buffers blocks outside PyArrow
  (``filesystem.block_bytes``): a writer about three at its peak (the part being filled, its
  copy for the upload, the request body), a reader about three (the read-ahead block, the
  pieces of a fetch and their join). Each file in flight has a reader and a writer open, and
  the merge keeps a writer of new rows and a reader of the source open beside them: the
  workers' share counts both.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from memsafe_dagster.datasets.merge.options import DEFAULT_ROW_GROUP_SIZE, MergeOptions
from memsafe_dagster.datasets.merge.request import MergeRequest
from memsafe_dagster.datasets.reader import chunk_budget_bytes, rows_for_bytes
from memsafe_dagster.memory import MemoryMonitor, detect_memory_limits
from memsafe_dagster.memory.sizes import MiB

log = logging.getLogger(__name__)

# Bytes of memory per source key while the index is built (codes, positions, sort
# permutation, sorted copies, bitmap, flags); hashed keys add their values twice.
INDEX_BYTES_PER_KEY = 40
INDEX_SHARE = 0.4
ROW_GROUP_SHARE = 0.05
MIN_ROW_GROUP_ROWS = 1_024
MIN_CHUNK_ROWS = 1_024
WORKER_ROW_GROUPS = 8
WORKER_OVERHEAD_BYTES = 24 * MiB
WORKERS_SHARE = 0.75
# Blocks an open file of an object store buffers at its peak (see the module docstring); a
# file in flight has a reader and a writer open, and so do the insert sink and the source.
WRITER_BLOCKS = 3
READER_BLOCKS = 3
# A floor above this share of the limit can never hold (the default 512 MB in a 512 MB pod).
MAX_FLOOR_SHARE = 0.25
SCALED_FLOOR_SHARE = 0.1


def merge_monitor(request: MergeRequest) -> MemoryMonitor:
    """The monitor that guards ``request``: its own, or one built from its three figures.

    A free-memory floor above a quarter of the container's limit can never hold and would stop
    every merge at once; it is scaled to 10 % of the limit, with a warning that says so.
    """
    if request.monitor is not None:
        return request.monitor
    memory = request.memory
    limits = detect_memory_limits()
    min_available_mb = memory.min_system_available_mb
    if min_available_mb > MAX_FLOOR_SHARE * limits.limit_mb:
        scaled = round(SCALED_FLOOR_SHARE * limits.limit_mb)
        log.warning(
            "merge_min_system_available_mb=%s cannot be kept free under a %.0f MB limit (%s); "
            "keeping %s MB free instead",
            min_available_mb,
            limits.limit_mb,
            limits.source,
            scaled,
        )
        min_available_mb = scaled
    return MemoryMonitor(
        max_pyarrow_mb=memory.max_memory_mb,
        max_process_memory_mb=memory.max_process_memory_mb,
        min_system_available_mb=min_available_mb,
        limits=limits,
    )


@dataclass(frozen=True)
class MergeBudget:
    """The allowances of one merge, in bytes (see the module docstring)."""

    pyarrow_bytes: int
    process_bytes: int
    index_bytes: int
    explicit_process_budget: bool
    file_block_bytes: int = 0  # the block an open file of the target's filesystem buffers

    @classmethod
    def of(
        cls, monitor: MemoryMonitor, options: MergeOptions, *, file_block_bytes: int = 0
    ) -> MergeBudget:
        pyarrow = int(monitor.max_pyarrow_mb * MiB)
        explicit = bool(monitor.max_process_memory_mb)
        if explicit:
            process = int(monitor.max_process_memory_mb * MiB)  # type: ignore[operator]
        else:
            process = max(
                0, monitor.limits.limit_bytes - int(monitor.min_system_available_mb * MiB)
            )
        if options.index_memory_mb is not None:
            index = int(options.index_memory_mb * MiB)
        else:
            smaller = min(pyarrow, process) if explicit else pyarrow
            index = int(INDEX_SHARE * smaller)
        return cls(
            pyarrow_bytes=pyarrow,
            process_bytes=process,
            index_bytes=index,
            explicit_process_budget=explicit,
            file_block_bytes=max(0, int(file_block_bytes)),
        )

    @property
    def work_bytes(self) -> int:
        """What the merge's data may take at once: the smaller of its two budgets. No column
        chunk may be larger (see ``reader.check_column_chunks``)."""
        return (
            min(self.pyarrow_bytes, self.process_bytes)
            if self.process_bytes
            else self.pyarrow_bytes
        )

    def chunk_rows(self, row_bytes: float | None, max_rows: int, workers: int) -> int:
        """Rows per chunk: ``max_rows`` at most, fewer when rows are wide, so that a chunk of
        each file in flight fits its share of the budget (``reader.chunk_budget_bytes``)."""
        if not row_bytes:
            return max_rows
        allowance = chunk_budget_bytes(self.work_bytes) / max(1, workers)
        return rows_for_bytes(allowance, row_bytes, max_rows, min_rows=MIN_CHUNK_ROWS)

    @property
    def process_mb(self) -> float:
        return self.process_bytes / MiB

    def row_group_rows(self, row_bytes: float | None, workers: int) -> int:
        """Rows per written row group: the default, lowered so one stays under 5 % of the
        PyArrow budget per file in flight (rows of ``row_bytes`` bytes, when known)."""
        if not row_bytes:
            return DEFAULT_ROW_GROUP_SIZE
        allowance = self.pyarrow_bytes * ROW_GROUP_SHARE / max(1, workers)
        return int(max(MIN_ROW_GROUP_ROWS, min(DEFAULT_ROW_GROUP_SIZE, allowance // row_bytes)))

    @property
    def open_files_bytes(self) -> int:
        """What one reader and one writer open at once buffer outside PyArrow (object stores)."""
        return (WRITER_BLOCKS + READER_BLOCKS) * self.file_block_bytes

    def affordable_workers(
        self,
        wanted: int,
        *,
        row_group_rows: int,
        row_bytes: float | None,
        source_rows: int,
        current_rss_bytes: int,
    ) -> int:
        """Files processed at once: at most ``wanted``, as many as 75 % of the process budget
        holds beside the key index, the insert sink's and source's buffers and what the process
        already uses."""
        if wanted <= 1:
            return wanted
        per_worker = WORKER_ROW_GROUPS * row_group_rows * (row_bytes or 64.0)
        per_worker += WORKER_OVERHEAD_BYTES + self.open_files_bytes
        index = source_rows * INDEX_BYTES_PER_KEY
        free = WORKERS_SHARE * self.process_bytes - current_rss_bytes - index
        free -= self.open_files_bytes
        return int(max(1, min(wanted, free // per_worker)))
