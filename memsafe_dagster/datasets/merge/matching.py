"""Phase 2: build the key index and mark matched target rows and matched source rows."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from memsafe_dagster.datasets.arrays import fixed_values, indices
from memsafe_dagster.datasets.merge.index import KeyIndex
from memsafe_dagster.datasets.merge.plan import TargetFile
from memsafe_dagster.datasets.merge.spill import IpcSpool, Reservoir
from memsafe_dagster.datasets.merge.state import INDEX_BYTES_PER_KEY, BitSet, EngineState, Ingested
from memsafe_dagster.datasets.merge.validate import conform_target_table


class MatchPhase(EngineState):
    """Sort the source key codes into a ``KeyIndex`` (in passes over key ranges when they were
    spilled) and scan the target's key columns, row group by row group, skipping what the
    statistics rule out."""

    def _match(
        self,
        state: Ingested,
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

    def _match_spilled(self, state: Ingested, matched_src: BitSet, dropped_src: BitSet) -> None:
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
