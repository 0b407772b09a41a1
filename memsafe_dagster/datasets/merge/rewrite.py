"""Phase 3: carry out the write plan: copy the rows the strategy keeps out of rewritten and
compacted files, and write the source rows it keeps, on the worker threads, heaviest first.

Which rows survive is the strategy rule's answer (``target_rows_kept``, ``source_rows_written``);
where they go is the plan's. Every output file is staged in the merge's transaction.
"""

from __future__ import annotations

from concurrent.futures import Future

import numpy as np
import pyarrow as pa

from memsafe_dagster.datasets.arrays import take_rows
from memsafe_dagster.datasets.commit import crash_point
from memsafe_dagster.datasets.merge.context import Ingested, Matched, MergeRun, Task
from memsafe_dagster.datasets.merge.guard import timed
from memsafe_dagster.datasets.merge.plan import WritePlan
from memsafe_dagster.datasets.merge.target import TargetFile
from memsafe_dagster.datasets.merge.validate import SourceConformer, conform_target_table
from memsafe_dagster.datasets.parquet import aligned_batch_rows
from memsafe_dagster.datasets.reader import check_column_chunks, iter_file_batches, open_parquet
from memsafe_dagster.datasets.sink import OutputSink
from memsafe_dagster.datasets.source import TabularSource


class SourceWrite:
    """Writing the source rows the strategy keeps into the new-rows sink: run inline, or
    started early on the pool (upsert and full_merge need only the duplicates to be known)."""

    def __init__(
        self,
        run: MergeRun,
        source: TabularSource,
        conformer: SourceConformer,
        state: Ingested,
        sink: OutputSink,
    ) -> None:
        self.run = run
        self.source = source
        self.conformer = conformer
        self.state = state
        self.sink = sink
        self.written = 0
        self.future: Future[None] | None = None

    def start(self, matched: Matched) -> None:
        """Run on the pool; a failure stops the scan and the rewrites (the merge has failed)."""
        assert self.run.pool is not None

        def task() -> None:
            try:
                self(matched)
            except BaseException:
                self.run.abort.set()
                raise

        self.future = self.run.pool.submit(task)

    def raise_if_failed(self) -> None:
        if self.future is not None and self.future.done():
            error = self.future.exception()
            if error is not None:
                raise error

    def wait(self) -> None:
        if self.future is not None:
            self.future.result()

    def __call__(self, matched: Matched) -> None:
        run = self.run
        rule = run.rule
        with run.guard.slot():
            if self.state.row_spool is not None:
                chunks = (pa.Table.from_batches([b]) for b in self.state.row_spool.read())
                conform = False
            else:
                chunks = self.source.chunks(lambda: run.guard.chunk_rows)
                conform = True
            pos = 0
            for chunk in chunks:
                if run.abort.is_set():
                    return
                run.guard.check("write")
                n = chunk.num_rows
                if n == 0:
                    continue
                keep = rule.source_rows_written(
                    matched.source.slice(pos, pos + n), matched.dropped.slice(pos, pos + n)
                )
                pos += n
                table = self.conformer.conform(chunk) if conform else chunk
                if not keep.any():
                    continue
                if not keep.all():
                    table = take_rows(table, np.flatnonzero(keep))
                self.sink.write(table)
                kept = int(keep.sum())
                self.written += kept
                run.guard.advance(kept)


def write_phase(
    run: MergeRun,
    plan: WritePlan,
    matched: Matched,
    source_write: SourceWrite,
    sinks: list[OutputSink],
    *,
    direct: bool,
    validate_source: bool,
) -> None:
    """Run the plan's rewrites and the source write (unless it ran during ingest or already
    started), each output encoding in its own thread when cores are spare."""
    new_rows = source_write.sink
    emptied_rows = sum(f.rows for f in plan.emptied)
    write_rows = 0 if direct else max(0, plan.source_rows_out - source_write.written)
    run.guard.set_total(run.guard.done + plan.rewrite_rows + emptied_rows + write_rows)
    run.guard.advance(emptied_rows)
    tasks: list[tuple[int, Task]] = []
    if source_write.future is None and not direct and (plan.source_rows_out or validate_source):
        tasks.append((plan.source_rows_out, lambda: source_write(matched)))
    for rewrite in plan.rewrites:
        f = rewrite.file
        assert isinstance(f, TargetFile)
        if rewrite.into == "own":
            sink = OutputSink(
                run.afs,
                run.settings,
                run.new_file,
                directory=f.rel.rsplit("/", 1)[0] if "/" in f.rel else "",
                prefix="part",
                max_rows=max(run.request.options.target_file_rows, f.rows),
            )
            sinks.append(sink)
        else:
            sink = new_rows
        own = sink is not new_rows
        tasks.append((f.rows, lambda f=f, sink=sink, own=own: rewrite_file(run, f, sink, own=own)))
    # Fewer tasks than workers (one touched file, say): let each output encode in its own
    # thread, so a single file still uses two cores.
    background = run.background_writes(len(tasks) + (source_write.future is not None))
    for sink in sinks:
        sink.background = sink.background or background
    with timed(run.phases, "rewrite"):
        run.run_tasks(tasks)
        source_write.wait()


def rewrite_file(run: MergeRun, f: TargetFile, sink: OutputSink, *, own: bool) -> None:
    """Copy the rows of ``f`` that the strategy keeps into ``sink``, a chunk at a time."""
    rule = run.rule
    # A footer read only now (a table format's file) is checked before its rows are read.
    check_column_chunks(f.path, f.metadata, run.budget.work_bytes)
    with run.guard.slot(), run.afs.open_input_file(f.path) as fh:
        pf = open_parquet(fh, metadata=f.metadata)
        offset = 0
        batches = iter_file_batches(
            pf,
            aligned_batch_rows(f.metadata, run.guard.chunk_rows),
            use_threads=run.workers == 1,
        )
        for batch in batches:
            if run.abort.is_set():
                return
            run.guard.check("rewrite")
            n = batch.num_rows
            table = pa.Table.from_batches([batch])
            kept = rule.target_rows_kept(f.matched_mask(offset, offset + n))
            offset += n
            if not kept.all():
                # take() by index is several times cheaper than filter() by mask here.
                table = take_rows(table, np.flatnonzero(kept))
            sink.write(conform_target_table(table, run.schema, f.path))
            run.guard.advance(n)
        if own:
            sink.close()
    crash_point("merge-rewrote-file")
