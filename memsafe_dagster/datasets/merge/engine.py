"""The streaming merge: ingest the source, match keys, plan, rewrite touched files, commit.

Phases (each checks memory pressure at every chunk or row group; each is a function of the
``MergeRun`` and of the results of the phases before it):

1. **ingest** (``ingest.ingest``): source chunks are validated and cast to the target's schema;
   their keys become uint64 codes (kept in memory, or spilled to disk past the index budget).
   For upsert and full_merge a source that can be read only once goes straight into staged
   output files; for the other strategies it is spooled, because which rows to write is known
   only later.
2. **match** (``matching.match``): the codes are sorted into a ``KeyIndex`` (duplicates
   resolved), and the target's key columns are scanned row group by row group, skipping every
   row group whose statistics cannot hold a source key, to mark matched target and source rows.
3. **plan** (``plan.plan_writes``, pure): the strategy table decides the counts, the files the
   commit removes, the rows copied out of them and the small files compacted.
4. **rewrite** (``rewrite.write_phase``): rewrites and the source write run on the worker
   threads, heaviest first.
5. **commit**: one commit record publishes every new file and removes every replaced one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import fsspec
import pyarrow as pa

from memsafe_dagster.datasets.commit import crash_point
from memsafe_dagster.datasets.filesystem import block_bytes
from memsafe_dagster.datasets.keys import KeyCodec, check_key_type
from memsafe_dagster.datasets.merge.budget import MergeBudget, merge_monitor
from memsafe_dagster.datasets.merge.context import Matched, MergeRun
from memsafe_dagster.datasets.merge.guard import MergeGuard, merge_memory_pool, timed
from memsafe_dagster.datasets.merge.ingest import ingest
from memsafe_dagster.datasets.merge.matching import match
from memsafe_dagster.datasets.merge.plan import WritePlan, plan_writes
from memsafe_dagster.datasets.merge.request import MergeRequest
from memsafe_dagster.datasets.merge.result import MergeResult
from memsafe_dagster.datasets.merge.rewrite import SourceWrite, write_phase
from memsafe_dagster.datasets.merge.source import open_source
from memsafe_dagster.datasets.merge.spill import SpillDir
from memsafe_dagster.datasets.merge.store import MergeTarget, ParquetTarget, TargetWrite
from memsafe_dagster.datasets.merge.target import TargetDataset, TargetFile
from memsafe_dagster.datasets.merge.validate import SourceConformer
from memsafe_dagster.datasets.reader import check_column_chunks, chunk_budget_bytes, row_bytes
from memsafe_dagster.datasets.sink import OutputSink, SettingsProvider
from memsafe_dagster.datasets.source import TabularSource
from memsafe_dagster.memory.process import current_rss_bytes

log = logging.getLogger(__name__)


def run_merge(
    data: object,
    target: str | MergeTarget,
    fs: fsspec.AbstractFileSystem | None,
    request: MergeRequest,
    *,
    storage_options: Mapping[str, Any] | None = None,
) -> MergeResult:
    """Merge ``data`` into ``target`` as ``request`` says: a ``MergeTarget``, or the path of a
    Parquet dataset directory on ``fs``. A path or URL source of the target's protocol is read
    through the target's filesystem; one of another protocol with ``storage_options``."""
    if isinstance(target, str):
        if fs is None:
            raise ValueError("run_merge: a target path needs its filesystem")
        target = ParquetTarget(fs, target)
    target.check()
    started = time.perf_counter()
    monitor = merge_monitor(request)
    options = request.options
    workers = options.worker_count()
    guard = MergeGuard(
        monitor, workers=workers, chunk_rows=request.chunk_rows, progress_callback=request.progress
    )
    result = MergeResult(strategy=request.strategy)
    with merge_memory_pool(options.memory_pool), guard:
        guard.check("validation")
        with timed(result.phases_s, "open"):
            source = open_source(
                data,
                chunk_rows=request.chunk_rows,
                filesystem=target.fs,
                storage_options=storage_options,
            )
        try:
            with target.open(f"merge:{request.strategy}", options) as write:
                result.txn = write.txn
                _run_locked(
                    request,
                    MergeBudget.of(monitor, options, file_block_bytes=block_bytes(target.fs)),
                    target,
                    guard,
                    write,
                    source,
                    result,
                    workers,
                )
        finally:
            source.close()
    guard.finish_progress()
    result.duration_s = time.perf_counter() - started
    result.peak_rss_mb = guard.peak_rss_mb
    result.peak_pyarrow_mb = guard.peak_pyarrow_mb
    result.max_pressure = guard.max_pressure
    return result


def _run_locked(
    request: MergeRequest,
    budget: MergeBudget,
    target: MergeTarget,
    guard: MergeGuard,
    write: TargetWrite,
    source: TabularSource,
    result: MergeResult,
    workers: int,
) -> None:
    keys = request.keys
    rule = request.rule
    with timed(result.phases_s, "plan"):
        dataset = write.load(keys)
    schema = dataset.schema
    if schema is None:
        schema = source.schema
        if len(schema) == 0:
            return  # no target and a source without rows or columns: nothing to merge
        for k in keys:
            if schema.get_field_index(k) < 0:
                raise ValueError(
                    f"key column {k!r} missing from the source (its columns: {schema.names})"
                )
            check_key_type(k, schema.field(k).type, "source")
    result.schema = dataset.schema  # a new target gets a schema once something is committed
    conformer = SourceConformer(
        source.schema,
        schema,
        keys,
        keys_only=not rule.writes_source,
        fill_missing=request.options.missing_columns == "null",
    )
    result.target_count_before = dataset.rows
    _refuse_oversized_column_chunks(budget, dataset, source)
    row_bytes = _row_bytes(dataset)
    width = max(row_bytes or 0.0, source.row_bytes() or 0.0) or None
    # Row groups are sized for the files wanted at once; the files that fit follow from them.
    row_group_rows = request.options.row_group_size or budget.row_group_rows(row_bytes, workers)
    workers = _affordable_workers(
        request, budget, target.name, source, workers, row_group_rows, row_bytes
    )
    guard.workers = workers
    # Bytes bound the chunk (merge_chunk_size_rows is the maximum): as the source's files are
    # read, as any other source is cut, and as target files are rewritten.
    guard.bound_chunk_rows(budget.chunk_rows(width, request.chunk_rows, workers))
    source.chunk_bytes = chunk_budget_bytes(budget.work_bytes) / max(1, workers)
    run = MergeRun(
        request=request,
        budget=budget,
        target=target,
        guard=guard,
        write=write,
        dataset=dataset,
        schema=schema,
        codec=KeyCodec(schema, keys),
        settings=_writer_settings(request, schema, dataset, row_group_rows),
        workers=workers,
        cpus=request.options.cpu_count(),
        phases=result.phases_s,
        pool=(
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="memsafe-merge")
            if workers > 1
            else None
        ),
    )
    spill_dir = SpillDir(write.spill_base)
    new_rows = OutputSink(
        target.afs,
        run.settings,
        run.new_file,
        directory="",
        prefix="ins",
        max_rows=request.options.target_file_rows,
    )
    sinks: list[OutputSink] = [new_rows]
    try:
        _phases(run, source, conformer, new_rows, sinks, spill_dir, result)
    except BaseException:
        run.abort.set()
        if run.pool is not None:
            run.pool.shutdown(wait=True, cancel_futures=True)
        for sink in sinks:
            sink.abort()
        raise
    finally:
        if run.pool is not None:
            run.pool.shutdown(wait=True)
        spill_dir.cleanup()


def _phases(
    run: MergeRun,
    source: TabularSource,
    conformer: SourceConformer,
    new_rows: OutputSink,
    sinks: list[OutputSink],
    spill_dir: SpillDir,
    result: MergeResult,
) -> None:
    request, rule, guard, dataset = run.request, run.rule, run.guard, run.dataset
    # Strategies that replace matched rows and insert new ones write every source row: a
    # source that can be read only once is written while it is ingested; one that can be read
    # again is written later, alongside the rewrites (both cores busy, ingesting stays short).
    writes_all = rule.inserts_new and rule.writes_matched_source
    direct = writes_all and request.on_duplicate == "error" and not source.rereadable
    estimate = source.total_rows or 0
    guard.set_total(
        estimate
        + dataset.rows
        + (dataset.rows if rule.keeps_unmatched_target and rule.drops_matched_target else 0)
        + (0 if direct or not rule.writes_source else estimate)
    )
    new_rows.background = run.background_writes(1) if direct else False
    with timed(run.phases, "ingest"):
        ingested = ingest(run, source, conformer, new_rows if direct else None, spill_dir)
    crash_point("merge-ingested")
    result.source_count = ingested.rows
    result.spilled = ingested.spilled
    source_write = SourceWrite(run, source, conformer, ingested, new_rows)
    matched = Matched.for_source(ingested.rows)
    # Writing every (deduplicated) source row does not depend on the target: it can start as
    # soon as the duplicates are known (at once when duplicates are an error), beside the scan.
    early = writes_all and not direct and run.pool is not None
    on_index = None
    if early and request.on_duplicate == "error":
        source_write.start(matched)
    elif early:
        on_index = source_write.start
    with timed(run.phases, "scan"):
        match(run, ingested, matched, on_index)
    _raise_if_aborted(run, source_write)
    crash_point("merge-scanned")
    result.key_passes = matched.key_passes
    result.files_pruned = matched.files_pruned
    result.row_groups_pruned = matched.row_groups_pruned
    result.duplicates_dropped = matched.source_dropped
    plan = plan_writes(
        rule,
        dataset.files,
        source_rows=ingested.rows,
        source_matched=matched.source_matched,
        source_dropped=matched.source_dropped,
        target_file_rows=request.options.target_file_rows,
        compact_small_files=request.options.compact_small_files,
        allow_empty_source=request.options.allow_empty_source,
    )
    result.inserted, result.updated, result.deleted = plan.inserted, plan.updated, plan.deleted
    result.files_rewritten = len(plan.replaced)
    result.files_compacted = len(plan.compacted)
    # A source read again is validated as it is written: every row, even those the strategy
    # leaves out (and even when it leaves out all of them).
    validate_source = ingested.row_spool is None and source.rereadable and rule.writes_source
    write_phase(
        run, plan, matched, source_write, sinks, direct=direct, validate_source=validate_source
    )
    _raise_if_aborted(run, source_write)
    guard.check("commit")
    with timed(run.phases, "commit"):
        _commit(run, plan, sinks, result)


def _raise_if_aborted(run: MergeRun, source_write: SourceWrite) -> None:
    """Raise what stopped a background task (its work is incomplete: never commit it)."""
    source_write.raise_if_failed()
    if run.abort.is_set():
        source_write.wait()
        raise RuntimeError("merge aborted by a failed background task")


def _commit(run: MergeRun, plan: WritePlan, sinks: list[OutputSink], result: MergeResult) -> None:
    added_rows = 0
    added = 0
    for sink in sinks:
        for written in sink.close():
            added_rows += written.rows
            added += 1
    removed = plan.removed
    for f in removed:
        run.write.remove(f.path)
    result.files_added = added
    result.files_removed = len(removed)
    result.files_untouched = len(run.dataset.files) - len(removed)
    result.target_count_after = (
        result.target_count_before - sum(f.rows for f in removed) + added_rows
    )
    if not added and not removed:
        return
    result.schema = run.schema
    run.write.commit(
        {
            "strategy": run.request.strategy,
            "key_columns": list(run.keys),
            "inserted": result.inserted,
            "updated": result.updated,
            "deleted": result.deleted,
            "target_count_before": result.target_count_before,
            "target_count_after": result.target_count_after,
        }
    )
    result.committed = True


def _affordable_workers(
    request: MergeRequest,
    budget: MergeBudget,
    target: str,
    source: TabularSource,
    wanted: int,
    row_group_rows: int,
    row_bytes: float | None,
) -> int:
    """Files processed at once, as many as the budget affords (see ``budget``)."""
    affordable = budget.affordable_workers(
        wanted,
        row_group_rows=row_group_rows,
        row_bytes=row_bytes,
        source_rows=source.total_rows or 0,
        current_rss_bytes=current_rss_bytes(),
    )
    explicit = request.options.workers
    if explicit is not None and affordable < explicit:
        log.warning(
            "merge into %s: workers=%d would not fit the %.0f MB process budget; "
            "processing %d files at once",
            target,
            explicit,
            budget.process_mb,
            affordable,
        )
    return affordable


def _writer_settings(
    request: MergeRequest, schema: pa.Schema, dataset: TargetDataset, row_group_rows: int
) -> SettingsProvider:
    """How new files are written: the target's own codec unless one is asked for."""
    compression = request.options.compression
    if compression is None:
        compression = "zstd"
        for f in dataset.files:
            if f.metadata.num_row_groups and f.metadata.num_columns:
                codec = f.metadata.row_group(0).column(0).compression.lower()
                compression = "none" if codec == "uncompressed" else codec
                break
    return SettingsProvider(
        schema,
        row_group_size=row_group_rows,
        compression=compression,
        compression_level=request.options.compression_level,
        use_dictionary=request.options.use_dictionary,
    )


def _footer_read(f: TargetFile) -> bool:
    """Whether ``f``'s footer is in memory (a table format's files read theirs on first use)."""
    return f.__dict__.get("_footer", f) is not None


def _row_bytes(dataset: TargetDataset) -> float | None:
    """Uncompressed bytes per row of the target's widest file among the footers read (else
    of its first non-empty file, whose footer is read for it)."""
    widths = [w for f in dataset.files if _footer_read(f) and (w := row_bytes(f.metadata))]
    if widths:
        return max(widths)
    for f in dataset.files:
        if f.rows and (width := row_bytes(f.metadata)):
            return width
    return None


def _refuse_oversized_column_chunks(
    budget: MergeBudget, dataset: TargetDataset, source: TabularSource
) -> None:
    """A column chunk larger than the budget cannot be read or rewritten within it: refuse
    from the footers, before anything is staged. Footers not read yet (a table format's) are
    checked when their file is first read (``check_file``)."""
    for f in dataset.files:
        if _footer_read(f):
            check_column_chunks(f.path, f.metadata, budget.work_bytes)
    for path, md in zip(source.files, getattr(source, "footers", ()), strict=False):
        check_column_chunks(path, md, budget.work_bytes)
