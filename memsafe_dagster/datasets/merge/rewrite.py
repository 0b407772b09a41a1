"""Phase 3: rewrite the files holding matched rows and write the source rows kept."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, Future, wait

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from memsafe_dagster.datasets.arrays import take_rows
from memsafe_dagster.datasets.commit import crash_point
from memsafe_dagster.datasets.merge.guard import timed
from memsafe_dagster.datasets.merge.plan import TargetFile
from memsafe_dagster.datasets.merge.state import BitSet, EngineState, Ingested
from memsafe_dagster.datasets.merge.strategy import RULES
from memsafe_dagster.datasets.merge.validate import SourceConformer, conform_target_table
from memsafe_dagster.datasets.parquet import aligned_batch_rows
from memsafe_dagster.datasets.sink import OutputSink
from memsafe_dagster.datasets.source import TabularSource as MergeSource

# Survivors of a rewritten file below target_file_rows / 8 join the new-rows files instead of
# becoming a small file of their own.
SMALL_FILE_FRACTION = 8


class WritePhase(EngineState):
    """Decide what is replaced and compacted, then run the rewrites and the source write on
    the worker threads, heaviest first."""

    def _write_phase(
        self,
        source: MergeSource,
        conformer: SourceConformer,
        state: Ingested,
        matched_src: BitSet,
        dropped_src: BitSet,
        new_rows: OutputSink,
        direct: bool,
        sinks: list[OutputSink],
    ) -> None:
        files = self.dataset.files
        rule = RULES[self.strategy]
        n_src = state.rows
        empties_target = not rule.keeps_unmatched_target and n_src == 0 and self.dataset.rows
        if empties_target and not self.opts.allow_empty_source:
            raise ValueError(
                f"{self.strategy} with an empty source would delete all {self.dataset.rows:,} "
                "rows of the target; pass allow_empty_source=True if that is intended"
            )
        n_matched_src = matched_src.count()
        n_new_src = n_src - n_matched_src - dropped_src.count()
        matched_target = sum(f.matched for f in files)
        source_rows_out = rule.source_rows_out(source_new=n_new_src, source_matched=n_matched_src)
        r = self.result
        r.inserted, r.updated, r.deleted = rule.counts(
            source_new=n_new_src, matched_target=matched_target, target_rows=self.dataset.rows
        )

        if not rule.keeps_unmatched_target:
            replaced = list(files)
        elif rule.drops_matched_target:
            replaced = [f for f in files if f.matched]
        else:
            replaced = []
        replaced_paths = {f.path for f in replaced}
        compact: list[TargetFile] = []
        if self.opts.compact_small_files and source_rows_out:
            room = self.opts.target_file_rows - source_rows_out % self.opts.target_file_rows
            for f in sorted(files, key=lambda f: (f.rows, f.path)):
                if f.path in replaced_paths or not f.is_ins_file:
                    continue
                if f.rows >= self.opts.target_file_rows or f.rows > room:
                    continue
                compact.append(f)
                room -= f.rows
        self.replaced = replaced
        self.compacted = compact
        self.result.files_rewritten = len(replaced)
        self.result.files_compacted = len(compact)

        rewrite_rows = sum(f.rows for f in replaced if rule.keeps_unmatched_target)
        rewrite_rows += sum(f.rows for f in compact)
        write_rows = 0 if direct else max(0, source_rows_out - self._source_written)
        self.guard.set_total(self.guard.done + rewrite_rows + write_rows)

        small = max(1, self.opts.target_file_rows // SMALL_FILE_FRACTION)
        tasks: list[tuple[int, Callable[[], None]]] = []
        # A source read again is validated as it is written: every row, even those the
        # strategy leaves out (and even when it leaves out all of them).
        validate_later = state.row_spool is None and source.rereadable and rule.writes_source
        if self._early_write is None and not direct and (source_rows_out or validate_later):
            tasks.append(
                (
                    source_rows_out,
                    lambda: self._write_source(
                        source, conformer, state, matched_src, dropped_src, new_rows
                    ),
                )
            )
        if rule.keeps_unmatched_target:
            for f in replaced:
                survivors = f.rows - f.matched
                if survivors == 0:
                    self.guard.advance(f.rows)
                    continue
                if survivors < small or f.is_ins_file:
                    sink = new_rows
                else:
                    sink = OutputSink(
                        self.afs,
                        self.settings,
                        self._new_file,
                        directory=f.rel.rsplit("/", 1)[0] if "/" in f.rel else "",
                        prefix="part",
                        max_rows=max(self.opts.target_file_rows, f.rows),
                    )
                    sinks.append(sink)
                tasks.append(
                    (
                        f.rows,
                        lambda f=f, sink=sink: self._rewrite(f, sink, own=sink is not new_rows),
                    )
                )
        for f in compact:
            tasks.append((f.rows, lambda f=f: self._rewrite(f, new_rows, own=False)))
        # Fewer tasks than workers (one touched file, say): let each output encode in its own
        # thread, so a single file still uses two cores.
        background = self._background(len(tasks) + (self._early_write is not None))
        for sink in sinks:
            sink.background = sink.background or background
        with timed(self.phases, "rewrite"):
            self._run_tasks(tasks)
            if self._early_write is not None:
                self._early_write.result()

    def _rewrite(self, f: TargetFile, sink: OutputSink, *, own: bool) -> None:
        """Copy the rows of ``f`` that the strategy keeps into ``sink``, a chunk at a time."""
        rule = RULES[self.strategy]
        with self.guard.slot(), self.afs.open_input_file(f.path) as fh:
            pf = pq.ParquetFile(fh, metadata=f.metadata, pre_buffer=False)
            offset = 0
            batches = pf.iter_batches(
                batch_size=aligned_batch_rows(f.metadata, self.guard.chunk_rows),
                use_threads=self.workers == 1,
            )
            for batch in batches:
                if self.abort.is_set():
                    return
                self.guard.check("rewrite")
                n = batch.num_rows
                table = pa.Table.from_batches([batch])
                kept = rule.target_rows_kept(f.matched_mask(offset, offset + n))
                offset += n
                if not kept.all():
                    # take() by index is several times cheaper than filter() by mask here.
                    table = take_rows(table, np.flatnonzero(kept))
                sink.write(conform_target_table(table, self.schema, f.path))
                self.guard.advance(n)
            if own:
                sink.close()
        crash_point("merge-rewrote-file")

    def _write_source(
        self,
        source: MergeSource,
        conformer: SourceConformer,
        state: Ingested,
        matched_src: BitSet,
        dropped_src: BitSet,
        sink: OutputSink,
    ) -> None:
        rule = RULES[self.strategy]
        with self.guard.slot():
            if state.row_spool is not None:
                chunks = (pa.Table.from_batches([b]) for b in state.row_spool.read())
                conform = False
            else:
                chunks = source.chunks(lambda: self.guard.chunk_rows)
                conform = True
            pos = 0
            for chunk in chunks:
                if self.abort.is_set():
                    return
                self.guard.check("write")
                n = chunk.num_rows
                if n == 0:
                    continue
                keep = rule.source_rows_written(
                    matched_src.slice(pos, pos + n), dropped_src.slice(pos, pos + n)
                )
                pos += n
                table = conformer.conform(chunk) if conform else chunk
                if not keep.any():
                    continue
                if not keep.all():
                    table = take_rows(table, np.flatnonzero(keep))
                sink.write(table)
                kept = int(keep.sum())
                self._source_written += kept
                self.guard.advance(kept)

    def _run_tasks(self, tasks: list[tuple[int, Callable[[], None]]]) -> None:
        """Run weighted ``tasks`` on ``workers`` threads, heaviest first (so both cores stay
        busy to the end); the first failure cancels the rest and is raised."""
        if not tasks:
            return
        ordered = [task for _, task in sorted(tasks, key=lambda t: -t[0])]
        if self.pool is None or len(ordered) == 1:
            for task in ordered:
                task()
            return
        futures: list[Future[None]] = [self.pool.submit(task) for task in ordered]
        done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        failed = [f for f in done if f.exception() is not None]
        if failed:
            self.abort.set()
            for f in pending:
                f.cancel()
            wait(pending)
            raise failed[0].exception()  # type: ignore[misc]
