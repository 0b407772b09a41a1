"""``merge_dataset``: the public entry point; its parameters become one ``MergeRequest``."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import fsspec

from memsafe_dagster.datasets.filesystem import resolve_filesystem
from memsafe_dagster.datasets.merge.engine import run_merge
from memsafe_dagster.datasets.merge.request import MergeRequest, ProgressCallback
from memsafe_dagster.datasets.merge.result import MergeResult
from memsafe_dagster.memory import MemoryMonitor


def merge_dataset(
    data: Any,
    path: str | os.PathLike[str],
    *,
    fs: fsspec.AbstractFileSystem | None = None,
    storage_options: Mapping[str, Any] | None = None,
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
    ``fs`` is None it is resolved from the URL with ``storage_options``). A path or URL source
    of the target's protocol is read through the target's filesystem, one of another protocol
    with ``storage_options``. A missing target is an empty dataset.

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
    request = MergeRequest.create(
        strategy=strategy,
        key_columns=key_columns,
        on_duplicate_keys=on_duplicate_keys,
        merge_chunk_size_rows=merge_chunk_size_rows,
        enable_streaming_merge=enable_streaming_merge,
        merge_max_memory_mb=merge_max_memory_mb,
        merge_max_process_memory_mb=merge_max_process_memory_mb,
        merge_min_system_available_mb=merge_min_system_available_mb,
        memory_monitor=memory_monitor,
        merge_progress_callback=merge_progress_callback,
        options=options,
    )
    if fs is None:
        fs, target = resolve_filesystem(path, storage_options=storage_options)
    else:
        target = os.fspath(path)
    return run_merge(data, target, fs, request, storage_options=storage_options)
