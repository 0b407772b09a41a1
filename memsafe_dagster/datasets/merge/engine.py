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
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from memsafe_dagster.datasets.commit import DatasetTransaction, crash_point
from memsafe_dagster.datasets.filesystem import arrow_filesystem, is_local, join
from memsafe_dagster.datasets.merge.arrays import fixed_values, from_numpy, indices
from memsafe_dagster.datasets.merge.guard import (
    MergeGuard,
    ProgressCallback,
    merge_memory_pool,
    timed,
)
from memsafe_dagster.datasets.merge.keys import KeyCodec, KeyIndex
from memsafe_dagster.datasets.merge.options import DEFAULT_ROW_GROUP_SIZE, MergeOptions
from memsafe_dagster.datasets.merge.plan import TargetDataset, TargetFile, load_target
from memsafe_dagster.datasets.merge.result import MergeResult
from memsafe_dagster.datasets.merge.sink import OutputSink, SettingsProvider
from memsafe_dagster.datasets.merge.source import MergeSource, open_source
from memsafe_dagster.datasets.merge.spill import IpcSpool, Reservoir, SpillDir
from memsafe_dagster.datasets.merge.validate import (
    SourceConformer,
    check_key_type,
    conform_target_table,
)
from memsafe_dagster.memory import MemoryMonitor

# Bytes of memory per source key while the index is built (codes, positions, sort
# permutation, sorted copies, bitmap, flags); hashed keys add their values twice.
INDEX_BYTES_PER_KEY = 40
_SMALL_FILE_FRACTION = 8


class BitSet:
    """A packed bit per source row (matched, dropped as a duplicate)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.bits = np.zeros((n + 7) // 8, dtype=np.uint8)

    def set(self, positions: np.ndarray) -> None:
        if len(positions):
            positions = positions.astype(np.int64, copy=False)
            bit = np.left_shift(np.uint8(1), (positions & 7).astype(np.uint8))
            np.bitwise_or.at(self.bits, positions >> 3, bit)

    def slice(self, start: int, stop: int) -> np.ndarray:
        lo, hi = start >> 3, (stop + 7) >> 3
        bits = np.unpackbits(self.bits[lo:hi], bitorder="little").astype(bool)
        skip = start - (lo << 3)
        return bits[skip : skip + (stop - start)]

    def count(self) -> int:
        if hasattr(np, "bitwise_count"):
            return int(np.bitwise_count(self.bits).sum(dtype=np.int64))
        return int(np.unpackbits(self.bits).sum(dtype=np.int64))


@dataclass
class _Ingested:
    rows: int = 0
    codes: list[np.ndarray] = field(default_factory=list)
    keys: list[pa.Table] = field(default_factory=list)
    key_spill: IpcSpool | None = None
    row_spool: IpcSpool | None = None
    reservoir: Reservoir = field(default_factory=Reservoir)
    index_bytes: int = 0


class MergeEngine:
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
        # Encode and write in the sinks' own threads (a second core per file) when there is
        # more than one core to use.
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
            source.schema, schema, self.keys, keys_only=self.strategy == "delete"
        )
        self.schema = schema
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

    def _background(self, concurrent_tasks: int) -> bool:
        """Whether outputs encode in their own threads (see ``MergeOptions``)."""
        if self.opts.background_writes is not None:
            return self.opts.background_writes
        return self.cpus > 1 and concurrent_tasks < max(2, self.workers)

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

    def _new_file(self, directory: str, prefix: str) -> str:
        with self._name_lock:
            n = self._names
            self._names += 1
            name = f"{prefix}-{self.txn.txn}-{n:05d}.parquet"
            return self.txn.new_file(f"{directory}/{name}" if directory else name)

    def _index_budget(self) -> int:
        if self.opts.index_memory_mb is not None:
            return int(self.opts.index_memory_mb * 2**20)
        budget = 0.4 * self.max_memory_mb
        if self.max_process_memory_mb:
            budget = min(budget, 0.4 * self.max_process_memory_mb)
        return int(budget * 2**20)

    # -- phase 1: ingest --------------------------------------------------------------------

    def _ingest(
        self,
        source: MergeSource,
        conformer: SourceConformer,
        direct_sink: OutputSink | None,
        spill_dir: SpillDir,
    ) -> _Ingested:
        state = _Ingested()
        keep_rows = direct_sink is None and self.strategy != "delete" and not source.rereadable
        if keep_rows:
            state.row_spool = IpcSpool(spill_dir.new_path("rows"), conformer.out_schema)
        budget = self._index_budget()
        hashed = not self.codec.exact
        columns = None
        if direct_sink is None and state.row_spool is None:
            # Only the keys are needed now: the rows are read again when they are written
            # (and validated then, still before anything is published).
            columns = list(self.keys)
            conformer = SourceConformer(
                conformer.source, conformer.target, self.keys, keys_only=True
            )
        for chunk in source.chunks(lambda: self.guard.chunk_rows, columns=columns):
            self.guard.check("ingest")
            table = conformer.conform(chunk)
            n = table.num_rows
            if n == 0:
                continue
            arrays = self.codec.key_arrays(table)
            codes, _valid = self.codec.codes(arrays)
            state.reservoir.add(codes[:: max(1, n // 4096)])
            if state.key_spill is None:
                state.codes.append(codes)
                if hashed:
                    keys = table.select(list(self.keys))
                    state.keys.append(keys)
                    state.index_bytes += 2 * keys.nbytes
                state.index_bytes += n * INDEX_BYTES_PER_KEY
                if self.streaming and state.index_bytes > budget:
                    state.key_spill = self._spill_keys(state, spill_dir)
            else:
                state.key_spill.write(self._key_table(codes, state.rows, table))
            if direct_sink is not None:
                direct_sink.write(table)
            elif state.row_spool is not None:
                state.row_spool.write(table)
            state.rows += n
            self.guard.advance(n)
        if state.key_spill is not None:
            state.key_spill.finish()
        if state.row_spool is not None:
            state.row_spool.finish()
        return state

    def _key_table(self, codes: np.ndarray, start: int, table: pa.Table | None) -> pa.Table:
        columns = {
            "__code": from_numpy(codes),
            "__pos": indices(np.arange(start, start + len(codes), dtype=np.int64)),
        }
        if not self.codec.exact and table is not None:
            for k in self.keys:
                columns[k] = table.column(k)
        return pa.table(columns)

    def _spill_keys(self, state: _Ingested, spill_dir: SpillDir) -> IpcSpool:
        """Move the in-memory key codes to a spill file; later chunks append to it."""
        fields = [pa.field("__code", pa.uint64()), pa.field("__pos", pa.int64())]
        if not self.codec.exact:
            fields += [self.schema.field(k) for k in self.keys]
        spill = IpcSpool(spill_dir.new_path("keys"), pa.schema(fields))
        start = 0
        for i, codes in enumerate(state.codes):
            keys = state.keys[i] if state.keys else None
            spill.write(self._key_table(codes, start, keys))
            start += len(codes)
        state.codes.clear()
        state.keys.clear()
        self.result.spilled = True
        return spill

    # -- phase 2: index + key scan ----------------------------------------------------------

    def _match(
        self,
        state: _Ingested,
        matched_src: BitSet,
        dropped_src: BitSet,
        on_index: Callable[[], None] | None = None,
    ) -> None:
        files = self.dataset.files
        if state.key_spill is None:
            self.guard.check("index")
            codes = np.concatenate(state.codes) if state.codes else np.zeros(0, dtype=np.uint64)
            state.codes.clear()
            keys = None
            if not self.codec.exact:
                keys = (
                    pa.concat_tables(state.keys).combine_chunks()
                    if state.keys
                    else self.schema.empty_table().select(list(self.keys))
                )
                state.keys.clear()
            index, dropped = KeyIndex.build(
                codes,
                None,
                keys,
                exact=self.codec.exact,
                on_duplicate=self.on_duplicate,
                key_names=self.keys,
                key_type=self.schema.field(self.keys[0]).type,
            )
            del codes, keys
            self.guard.check("index")
            dropped_src.set(dropped)
            if on_index is not None:
                on_index()
            self._scan_pass(index, files, matched_src)
            self.result.key_passes = 1
        else:
            self._match_spilled(state, matched_src, dropped_src)
        for f in files:
            f.finish_marking()
            self.result.row_groups_pruned += f.num_row_groups - len(f.key_scanned)
            if not f.key_scanned:
                self.result.files_pruned += 1
        self.result.duplicates_dropped = dropped_src.count()

    def _match_spilled(self, state: _Ingested, matched_src: BitSet, dropped_src: BitSet) -> None:
        assert state.key_spill is not None
        budget = self._index_budget()
        parts = max(2, math.ceil(state.index_bytes * 1.25 / max(budget, 1)))
        cuts = state.reservoir.splitters(parts)
        bounds = [0, *cuts, None]
        ranges: list[tuple[int, int | None]] = [
            (bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)
        ]
        passes = 0
        while ranges:
            lo, hi = ranges.pop(0)
            self.guard.check("index")
            loaded = self._load_range(state.key_spill, lo, hi, budget)
            if loaded is None:
                mid = self._split_range(state.key_spill, lo, hi)
                ranges[:0] = [(lo, mid), (mid, hi)]
                continue
            codes, positions, keys = loaded
            index, dropped = KeyIndex.build(
                codes,
                positions,
                keys,
                exact=self.codec.exact,
                on_duplicate=self.on_duplicate,
                key_names=self.keys,
                key_type=self.schema.field(self.keys[0]).type,
                lo=lo,
                hi=hi,
            )
            del codes, positions, keys
            dropped_src.set(dropped)
            self.guard.add_total(self.dataset.rows if passes else 0)
            self._scan_pass(index, self.dataset.files, matched_src)
            del index
            passes += 1
        self.result.key_passes = passes

    def _load_range(
        self, spill: IpcSpool, lo: int, hi: int | None, budget: int
    ) -> tuple[np.ndarray, np.ndarray, pa.Table | None] | None:
        """The spilled keys with ``lo <= code < hi``, or None when they exceed the budget."""
        codes: list[np.ndarray] = []
        positions: list[np.ndarray] = []
        keys: list[pa.Table] = []
        used = 0
        for batch in spill.read():
            self.guard.check("index")
            c = fixed_values(batch.column(0), np.uint64)
            mask = c >= np.uint64(lo)
            if hi is not None:
                mask &= c < np.uint64(hi)
            if not mask.any():
                continue
            codes.append(c[mask])
            positions.append(fixed_values(batch.column(1), np.int64)[mask])
            if not self.codec.exact:
                sub = pa.Table.from_batches([batch]).drop_columns(["__code", "__pos"])
                sub = sub.take(indices(np.flatnonzero(mask)))
                keys.append(sub)
                used += 2 * sub.nbytes
            used += int(mask.sum()) * INDEX_BYTES_PER_KEY
            if used > budget * 1.5 and (hi is None or hi - lo > 1):
                return None
        if not codes:
            empty_keys = None
            if not self.codec.exact:
                empty_keys = pa.schema([self.schema.field(k) for k in self.keys]).empty_table()
            return np.zeros(0, np.uint64), np.zeros(0, np.int64), empty_keys
        key_table = pa.concat_tables(keys).combine_chunks() if keys else None
        return np.concatenate(codes), np.concatenate(positions), key_table

    def _split_range(self, spill: IpcSpool, lo: int, hi: int | None) -> int:
        """A code between ``lo`` and ``hi`` that splits the spilled keys in that range."""
        sample = Reservoir(size=16_384, seed=lo % 2**31)
        for batch in spill.read():
            c = fixed_values(batch.column(0), np.uint64)
            mask = c >= np.uint64(lo)
            if hi is not None:
                mask &= c < np.uint64(hi)
            sample.add(c[mask])
        cuts = sample.splitters(2)
        top = hi if hi is not None else 2**64
        if cuts and lo < cuts[0] < top:
            return cuts[0]
        return lo + (top - lo) // 2

    def _scan_pass(self, index: KeyIndex, files: list[TargetFile], matched_src: BitSet) -> None:
        """Mark the target rows matching ``index`` in every file (several files at once)."""
        candidates = []
        for f in files:
            if f.num_row_groups and len(index) and index.may_contain_range(f.file_bounds()):
                candidates.append(f)
            else:
                self.guard.advance(f.rows)
        self._run_tasks([(f.rows, lambda f=f: self._scan_file(index, f)) for f in candidates])
        matched_src.set(index.positions[index.matched])

    def _scan_file(self, index: KeyIndex, f: TargetFile) -> None:
        with self.guard.slot(), self.afs.open_input_file(f.path) as fh:
            pf = pq.ParquetFile(fh, metadata=f.metadata, pre_buffer=False)
            for rg in range(f.num_row_groups):
                rows = int(f.rg_starts[rg + 1] - f.rg_starts[rg])
                if self.abort.is_set():
                    return
                self.guard.check("scan")
                if not index.may_contain_range(f.bounds[rg]):
                    self.guard.advance(rows)
                    continue
                f.key_scanned.add(rg)
                table = pf.read_row_group(rg, columns=list(self.keys), use_threads=False)
                table = conform_target_table(
                    table, pa.schema([self.schema.field(k) for k in self.keys]), f.path
                )
                arrays = self.codec.key_arrays(table)
                codes, valid = self.codec.codes(arrays)
                hit_rows, entries = index.lookup(codes, valid, arrays)
                if len(hit_rows):
                    f.mark(hit_rows + int(f.rg_starts[rg]))
                    index.matched[entries] = True
                self.guard.advance(rows)

    # -- phase 3: rewrite + write ------------------------------------------------------------

    def _write_phase(
        self,
        source: MergeSource,
        conformer: SourceConformer,
        state: _Ingested,
        matched_src: BitSet,
        dropped_src: BitSet,
        new_rows: OutputSink,
        direct: bool,
        sinks: list[OutputSink],
    ) -> None:
        files = self.dataset.files
        strategy = self.strategy
        n_src = state.rows
        n_matched_src = matched_src.count()
        n_dropped = dropped_src.count()
        matched_target = sum(f.matched for f in files)
        if strategy in ("upsert", "full_merge"):
            source_rows_out = n_src - n_dropped
        elif strategy == "insert":
            source_rows_out = n_src - n_matched_src - n_dropped
        elif strategy == "update":
            source_rows_out = n_matched_src
        else:
            source_rows_out = 0
        if strategy in ("upsert", "full_merge", "insert"):
            self.result.inserted = n_src - n_matched_src - n_dropped
        if strategy in ("upsert", "update", "full_merge"):
            self.result.updated = matched_target
        if strategy == "delete":
            self.result.deleted = matched_target
        elif strategy == "full_merge":
            self.result.deleted = self.dataset.rows - matched_target

        if strategy == "full_merge":
            replaced = list(files)
        elif strategy == "insert":
            replaced = []
        else:
            replaced = [f for f in files if f.matched]
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

        rewrite_rows = sum(f.rows for f in replaced if strategy != "full_merge")
        rewrite_rows += sum(f.rows for f in compact)
        write_rows = 0 if direct else max(0, source_rows_out - self._source_written)
        self.guard.set_total(self.guard.done + rewrite_rows + write_rows)

        small = max(1, self.opts.target_file_rows // _SMALL_FILE_FRACTION)
        tasks: list[tuple[int, Callable[[], None]]] = []
        # A source read again is validated as it is written: every row, even those the
        # strategy leaves out (and even when it leaves out all of them).
        validate_later = state.row_spool is None and source.rereadable and strategy != "delete"
        if self._early_write is None and not direct and (source_rows_out or validate_later):
            tasks.append(
                (
                    source_rows_out,
                    lambda: self._write_source(
                        source, conformer, state, matched_src, dropped_src, new_rows
                    ),
                )
            )
        if strategy != "full_merge":
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
        """Copy ``f``'s unmatched rows into ``sink``, a chunk at a time."""
        with self.guard.slot(), self.afs.open_input_file(f.path) as fh:
            pf = pq.ParquetFile(fh, metadata=f.metadata, pre_buffer=False)
            offset = 0
            batches = pf.iter_batches(
                batch_size=self.guard.chunk_rows, use_threads=self.workers == 1
            )
            for batch in batches:
                if self.abort.is_set():
                    return
                self.guard.check("rewrite")
                n = batch.num_rows
                table = pa.Table.from_batches([batch])
                mask = f.matched_mask(offset, offset + n)
                offset += n
                if mask.any():
                    # take() by index is several times cheaper than filter() by mask here.
                    table = table.take(indices(np.flatnonzero(~mask)))
                sink.write(conform_target_table(table, self.schema, f.path))
                self.guard.advance(n)
            if own:
                sink.close()
        crash_point("merge-rewrote-file")

    def _write_source(
        self,
        source: MergeSource,
        conformer: SourceConformer,
        state: _Ingested,
        matched_src: BitSet,
        dropped_src: BitSet,
        sink: OutputSink,
    ) -> None:
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
                keep = ~dropped_src.slice(pos, pos + n)
                if self.strategy == "insert":
                    keep &= ~matched_src.slice(pos, pos + n)
                elif self.strategy == "update":
                    keep &= matched_src.slice(pos, pos + n)
                pos += n
                table = conformer.conform(chunk) if conform else chunk
                if not keep.any():
                    continue
                if not keep.all():
                    table = table.take(indices(np.flatnonzero(keep)))
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
