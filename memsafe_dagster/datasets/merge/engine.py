"""The streaming merge: ingest the source, match keys, rewrite touched files, commit.

Phases (each checks memory pressure at every chunk or row group):

1. **ingest**: source chunks are validated and cast to the target's schema; their keys become
   uint64 codes (kept in memory, or spilled to disk past ``index_memory_mb``). For upsert and
   full_merge the rows go straight into staged output files; other strategies keep them in a
   spool (unless the source can be read again) because which rows to write is known only later.
2. **index + scan**: the codes are sorted into a ``KeyIndex`` (duplicates resolved), and the
   target's key columns are scanned row group by row group, skipping every row group whose
   statistics cannot hold a source key, to mark matched target rows (a bit per row) and matched
   source rows. A spilled index is matched in passes over key ranges.
3. **rewrite + write**: files holding matched rows are rewritten without them (several files at
   once), and the source rows the strategy keeps are written to new files.
4. **commit**: one commit record publishes every new file and removes every replaced one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import fsspec
import pyarrow as pa

from memsafe_dagster.datasets.commit import DatasetTransaction, crash_point
from memsafe_dagster.datasets.filesystem import arrow_filesystem, is_local, join
from memsafe_dagster.datasets.keys import KeyCodec, check_key_type
from memsafe_dagster.datasets.merge.guard import (
    MergeGuard,
    ProgressCallback,
    merge_memory_pool,
    timed,
)
from memsafe_dagster.datasets.merge.ingest import IngestPhase
from memsafe_dagster.datasets.merge.matching import MatchPhase
from memsafe_dagster.datasets.merge.options import DEFAULT_ROW_GROUP_SIZE, MergeOptions
from memsafe_dagster.datasets.merge.plan import TargetDataset, load_target
from memsafe_dagster.datasets.merge.result import MergeResult
from memsafe_dagster.datasets.merge.rewrite import WritePhase
from memsafe_dagster.datasets.merge.source import open_source
from memsafe_dagster.datasets.merge.spill import SpillDir
from memsafe_dagster.datasets.merge.state import INDEX_BYTES_PER_KEY, BitSet
from memsafe_dagster.datasets.merge.validate import SourceConformer
from memsafe_dagster.datasets.sink import OutputSink, SettingsProvider
from memsafe_dagster.datasets.source import TabularSource as MergeSource
from memsafe_dagster.memory import MemoryMonitor
from memsafe_dagster.memory.process import current_rss_bytes

log = logging.getLogger(__name__)


class MergeEngine(IngestPhase, MatchPhase, WritePhase):
    """One merge of ``data`` into the dataset at ``target`` on ``fs`` (see the module doc)."""

    def __init__(
        self,
        data: object,
        target: str,
        *,
        fs: fsspec.AbstractFileSystem,
        strategy: str,
        keys: Sequence[str],
        on_duplicate: str,
        monitor: MemoryMonitor,
        chunk_rows: int,
        max_memory_mb: float,
        max_process_memory_mb: float | None,
        streaming: bool,
        progress: ProgressCallback | None,
        options: MergeOptions,
    ) -> None:
        self.data = data
        self.target = target.rstrip("/") or "/"
        self.fs = fs
        self.afs = arrow_filesystem(fs)
        self.strategy = strategy
        self.keys = tuple(keys)
        self.on_duplicate = on_duplicate
        self.monitor = monitor
        self.chunk_rows = chunk_rows
        self.max_memory_mb = max_memory_mb
        self.max_process_memory_mb = max_process_memory_mb
        self.streaming = streaming
        self.opts = options
        self.workers = options.worker_count()
        self.cpus = options.cpu_count()
        self.guard = MergeGuard(
            monitor, workers=self.workers, chunk_rows=chunk_rows, progress_callback=progress
        )
        self.result = MergeResult(strategy=strategy)
        self.phases = self.result.phases_s
        self._name_lock = threading.Lock()
        self._names = 0

    # -- entry ------------------------------------------------------------------------------

    def run(self) -> MergeResult:
        started = time.perf_counter()
        existed = self.fs.exists(self.target)
        committed = False
        with merge_memory_pool(self.opts.memory_pool), self.guard:
            try:
                self.guard.check("validation")
                with timed(self.phases, "open"):
                    source = open_source(self.data, chunk_rows=self.chunk_rows, filesystem=self.fs)
                try:
                    with DatasetTransaction(
                        self.fs,
                        self.target,
                        operation=f"merge:{self.strategy}",
                        lock_timeout_s=self.opts.lock_timeout_s,
                        durable=self.opts.durable,
                    ) as txn:
                        self.result.txn = txn.txn
                        self._run_locked(txn, source)
                        committed = self.result.committed
                finally:
                    source.close()
            finally:
                if not committed and not existed:
                    _remove_empty_tree(self.fs, self.target)
        self.guard.finish_progress()
        self.result.duration_s = time.perf_counter() - started
        self.result.peak_rss_mb = self.guard.peak_rss_mb
        self.result.peak_pyarrow_mb = self.guard.peak_pyarrow_mb
        self.result.max_pressure = self.guard.max_pressure
        return self.result

    def _run_locked(self, txn: DatasetTransaction, source: MergeSource) -> None:
        with timed(self.phases, "plan"):
            dataset = load_target(self.fs, self.afs, self.target, self.keys)
        schema = dataset.schema
        if schema is None:
            schema = source.schema
            if len(schema) == 0:
                return  # no target and a source without rows or columns: nothing to merge
            for k in self.keys:
                if schema.get_field_index(k) < 0:
                    raise ValueError(
                        f"key column {k!r} missing from the source (its columns: {schema.names})"
                    )
                check_key_type(k, schema.field(k).type, "source")
        conformer = SourceConformer(
            source.schema,
            schema,
            self.keys,
            keys_only=self.strategy == "delete",
            fill_missing=self.opts.missing_columns == "null",
        )
        self.schema = schema
        self.result.schema = schema
        self.dataset = dataset
        self.codec = KeyCodec(schema, self.keys)
        self.result.target_count_before = dataset.rows
        self.settings = self._writer_settings(schema, dataset)
        spill_dir = SpillDir(join(txn.staging, "spill") if is_local(self.fs) else None)
        self.txn = txn
        new_rows = OutputSink(
            self.afs,
            self.settings,
            self._new_file,
            directory="",
            prefix="ins",
            max_rows=self.opts.target_file_rows,
        )
        sinks: list[OutputSink] = [new_rows]
        self.abort = threading.Event()
        self.workers = self._affordable_workers(source, dataset)
        self.guard.workers = self.workers
        self.pool = (
            ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="memsafe-merge")
            if self.workers > 1
            else None
        )
        self._early_write: Future[None] | None = None
        self._source_written = 0
        try:
            # upsert/full_merge write every source row: a source that can be read only once
            # is written while it is ingested; one that can be read again is written later,
            # alongside the rewrites (both cores busy, and ingesting stays short).
            direct = (
                self.strategy in ("upsert", "full_merge")
                and self.on_duplicate == "error"
                and not source.rereadable
            )
            estimate_source = source.total_rows or 0
            self.guard.set_total(
                estimate_source
                + dataset.rows
                + (dataset.rows if self.strategy in ("upsert", "update", "delete") else 0)
                + (0 if direct or self.strategy == "delete" else estimate_source)
            )
            new_rows.background = self._background(1) if direct else False
            with timed(self.phases, "ingest"):
                ingested = self._ingest(source, conformer, new_rows if direct else None, spill_dir)
            crash_point("merge-ingested")
            self.result.source_count = ingested.rows
            matched_src = BitSet(ingested.rows)
            dropped_src = BitSet(ingested.rows)
            # upsert/full_merge write every (deduplicated) source row whatever the target holds:
            # that can start as soon as the index is built, beside the key scan.
            early = (
                self.strategy in ("upsert", "full_merge") and not direct and self.pool is not None
            )

            def write_source_early() -> None:
                try:
                    self._write_source(
                        source, conformer, ingested, matched_src, dropped_src, new_rows
                    )
                except BaseException:
                    self.abort.set()  # stop the scan and the rewrites: this merge has failed
                    raise

            def start_source_write() -> None:
                self._early_write = self.pool.submit(write_source_early)  # type: ignore[union-attr]

            on_index = start_source_write if early else None
            if early and self.on_duplicate == "error":
                # No row can be dropped as a duplicate (one would fail the merge, discarding
                # what was staged): the write need not wait for the index either.
                start_source_write()
                on_index = None
            with timed(self.phases, "scan"):
                self._match(ingested, matched_src, dropped_src, on_index)
            self._raise_if_aborted()
            crash_point("merge-scanned")
            self._write_phase(
                source, conformer, ingested, matched_src, dropped_src, new_rows, direct, sinks
            )
            self._raise_if_aborted()
            self.guard.check("commit")
            with timed(self.phases, "commit"):
                self._commit(sinks)
        except BaseException:
            self.abort.set()
            if self.pool is not None:
                self.pool.shutdown(wait=True, cancel_futures=True)
            for sink in sinks:
                sink.abort()
            raise
        finally:
            if self.pool is not None:
                self.pool.shutdown(wait=True)
            spill_dir.cleanup()

    def _affordable_workers(self, source: MergeSource, dataset: TargetDataset) -> int:
        """Files processed at once, as many as the process budget affords.

        Each file in flight holds about eight row groups' worth of buffers (decoded batch,
        survivors, the row group being encoded, allocator slack) plus about 24 MB of its own
        (reader and writer state, the thread's allocator cache): measured 52-70 MB per file
        for 92k-row groups of 46 bytes. The key index takes about ``INDEX_BYTES_PER_KEY`` per
        source row. Past what fits in 75 % of the budget, one file at a time (with background
        encoding: both cores still work) is safer than two, and only about 20 % slower. An explicit
        ``workers`` is a maximum too: four files at once under a 384 MB budget would stop the
        10M/1M upsert at EMERGENCY where two finish it.
        """
        budget_mb = self.max_process_memory_mb
        if self.workers <= 1 or not budget_mb:
            return self.workers
        row_bytes = _row_bytes(dataset) or 64.0
        per_worker = 8 * self.settings.row_group_size * row_bytes + 24 * 2**20
        index = (source.total_rows or 0) * INDEX_BYTES_PER_KEY
        free = 0.75 * budget_mb * 2**20 - current_rss_bytes() - index
        affordable = int(max(1, min(self.workers, free // per_worker)))
        if self.opts.workers is not None and affordable < self.opts.workers:
            log.warning(
                "merge into %s: workers=%d would not fit the %.0f MB process budget; "
                "processing %d files at once",
                self.target,
                self.opts.workers,
                budget_mb,
                affordable,
            )
        return affordable

    def _raise_if_aborted(self) -> None:
        """Raise what stopped a background task (its work is incomplete: never commit it)."""
        if self._early_write is not None and self._early_write.done():
            error = self._early_write.exception()
            if error is not None:
                raise error
        if self.abort.is_set():
            if self._early_write is not None:
                self._early_write.result()
            raise RuntimeError("merge aborted by a failed background task")

    # -- settings ---------------------------------------------------------------------------

    def _writer_settings(self, schema: pa.Schema, dataset: TargetDataset) -> SettingsProvider:
        compression = self.opts.compression
        if compression is None:
            compression = "zstd"
            for f in dataset.files:
                if f.metadata.num_row_groups and f.metadata.num_columns:
                    codec = f.metadata.row_group(0).column(0).compression.lower()
                    compression = "none" if codec == "uncompressed" else codec
                    break
        row_group_size = self.opts.row_group_size
        if row_group_size is None:
            row_group_size = DEFAULT_ROW_GROUP_SIZE
            row_bytes = _row_bytes(dataset)
            if row_bytes:
                # A row group is buffered while written: keep one under 5 % of the budget.
                budget = self.max_memory_mb * 2**20 * 0.05 / max(1, self.workers)
                row_group_size = int(max(1_024, min(row_group_size, budget // row_bytes)))
        return SettingsProvider(
            schema,
            row_group_size=row_group_size,
            compression=compression,
            compression_level=self.opts.compression_level,
            use_dictionary=self.opts.use_dictionary,
        )

    # -- phase 4: commit ----------------------------------------------------------------------

    def _commit(self, sinks: list[OutputSink]) -> None:
        added_rows = 0
        added = 0
        for sink in sinks:
            for written in sink.close():
                added_rows += written.rows
                added += 1
        removed = [*self.replaced, *self.compacted]
        for f in removed:
            self.txn.remove(f.path)
        removed_rows = sum(f.rows for f in removed)
        r = self.result
        r.files_added = added
        r.files_removed = len(removed)
        r.files_untouched = len(self.dataset.files) - len(removed)
        r.target_count_after = r.target_count_before - removed_rows + added_rows
        if not added and not removed:
            return
        self.txn.commit(
            info={
                "strategy": self.strategy,
                "key_columns": list(self.keys),
                "inserted": r.inserted,
                "updated": r.updated,
                "deleted": r.deleted,
                "target_count_before": r.target_count_before,
                "target_count_after": r.target_count_after,
            }
        )
        r.committed = True


def _row_bytes(dataset: TargetDataset) -> float | None:
    for f in dataset.files:
        md = f.metadata
        if md.num_rows and md.num_row_groups:
            total = sum(md.row_group(i).total_byte_size for i in range(md.num_row_groups))
            return total / md.num_rows
    return None


def _remove_empty_tree(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Remove ``path`` if it holds nothing but empty directories (a failed first merge)."""
    with contextlib.suppress(OSError, FileNotFoundError, ValueError):
        if not fs.exists(path):
            return
        if any(True for _ in fs.find(path)):
            return
        if is_local(fs):
            for root, _dirs, _files in sorted(os.walk(path), key=lambda w: -len(w[0])):
                os.rmdir(root)
        else:
            fs.rm(path, recursive=True)
