"""``merge_dataset``: the public entry point, its parameters checked before any I/O."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import fsspec

from memsafe_dagster.datasets.filesystem import resolve_filesystem
from memsafe_dagster.datasets.merge.engine import MergeEngine
from memsafe_dagster.datasets.merge.guard import ProgressCallback
from memsafe_dagster.datasets.merge.options import MergeOptions
from memsafe_dagster.datasets.merge.result import MergeResult
from memsafe_dagster.datasets.merge.validate import (
    check_duplicate_policy,
    check_strategy,
    normalize_key_columns,
)
from memsafe_dagster.memory import MemoryMonitor, detect_memory_limits

log = logging.getLogger(__name__)

# A floor above this share of the limit can never hold (the default 512 MB in a 512 MB pod).
MAX_FLOOR_SHARE = 0.25
SCALED_FLOOR_SHARE = 0.1


def merge_dataset(
    data: Any,
    path: str | os.PathLike[str],
    *,
    fs: fsspec.AbstractFileSystem | None = None,
    strategy: str = "upsert",
    key_columns: str | Sequence[str],
    merge_max_memory_mb: float = 1024,
    merge_max_process_memory_mb: float | None = None,
    merge_min_system_available_mb: float = 512,
    merge_chunk_size_rows: int = 100_000,
    enable_streaming_merge: bool = True,
    merge_progress_callback: ProgressCallback | None = None,
    memory_monitor: MemoryMonitor | None = None,
    on_duplicate_keys: str = "error",
    **options: Any,
) -> MergeResult:
    """Merge ``data`` into the Parquet dataset at ``path`` by ``key_columns``.

    ``strategy``: ``insert`` (new keys only), ``update`` (existing keys only), ``upsert``
    (both), ``delete`` (remove matching target rows), ``full_merge`` (the target becomes the
    source). ``data``: a Table, RecordBatchReader, Dataset, ChunkStream, path/URL of Parquet
    files, or an iterable of batches. ``path`` is stripped of its protocol for ``fs`` (when
    ``fs`` is None it is resolved from the URL). A missing target is an empty dataset.

    Memory: ``merge_max_memory_mb`` (PyArrow), ``merge_max_process_memory_mb`` (RSS) and
    ``merge_min_system_available_mb`` drive a ``MemoryMonitor`` (or pass ``memory_monitor``)
    checked at every chunk of every phase; EMERGENCY raises ``MemoryPressureError`` and the
    target is left byte-for-byte unchanged. ``merge_chunk_size_rows`` is the rows per chunk
    (shrinks under pressure). ``enable_streaming_merge=False`` keeps the whole key index in
    memory instead of spilling a large one to disk. ``merge_progress_callback(done, total)``
    counts rows of work across all phases (the total is refined as the merge learns more).
    ``on_duplicate_keys``: "error" (default), "first" or "last" occurrence wins.
    ``**options``: see ``MergeOptions`` (row_group_size, target_file_rows, compression,
    lock_timeout_s, workers, ...). Invalid input raises ``ValueError`` naming the problem
    before anything is published.
    """
    strategy = check_strategy(strategy)
    on_duplicate_keys = check_duplicate_policy(on_duplicate_keys)
    keys = normalize_key_columns(key_columns)
    if (
        isinstance(merge_chunk_size_rows, bool)
        or not isinstance(merge_chunk_size_rows, int)
        or merge_chunk_size_rows <= 0
    ):
        raise ValueError(
            f"merge_chunk_size_rows must be a positive integer, got {merge_chunk_size_rows!r}"
        )
    for name, value in (
        ("merge_max_memory_mb", merge_max_memory_mb),
        ("merge_min_system_available_mb", merge_min_system_available_mb),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"{name} must be a non-negative number of MB, got {value!r}")
    if merge_max_process_memory_mb is not None and (
        isinstance(merge_max_process_memory_mb, bool)
        or not isinstance(merge_max_process_memory_mb, (int, float))
        or merge_max_process_memory_mb <= 0
    ):
        raise ValueError(
            "merge_max_process_memory_mb must be a positive number of MB or None, got "
            f"{merge_max_process_memory_mb!r}"
        )
    opts = MergeOptions.from_kwargs(options)
    if fs is None:
        fs, target = resolve_filesystem(path)
    else:
        target = os.fspath(path)
    if fs.isfile(target):
        raise ValueError(
            f"target {os.fspath(path)!r} is a file; a merge target is a dataset directory "
            "(it may not exist yet)"
        )
    monitor = memory_monitor or merge_monitor(
        merge_max_memory_mb, merge_max_process_memory_mb, merge_min_system_available_mb
    )
    engine = MergeEngine(
        data,
        target,
        fs=fs,
        strategy=strategy,
        keys=keys,
        on_duplicate=on_duplicate_keys,
        monitor=monitor,
        chunk_rows=merge_chunk_size_rows,
        max_memory_mb=float(merge_max_memory_mb),
        max_process_memory_mb=merge_max_process_memory_mb,
        streaming=enable_streaming_merge,
        progress=merge_progress_callback,
        options=opts,
    )
    return engine.run()


def merge_monitor(
    max_memory_mb: float, max_process_memory_mb: float | None, min_available_mb: float
) -> MemoryMonitor:
    """The merge's monitor. A free-memory floor above a quarter of the container's limit can
    never hold and would stop every merge at once; it is scaled to 10 % of the limit, with a
    warning that says so."""
    limits = detect_memory_limits()
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
        max_pyarrow_mb=max_memory_mb,
        max_process_memory_mb=max_process_memory_mb,
        min_system_available_mb=min_available_mb,
        limits=limits,
    )
