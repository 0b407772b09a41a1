"""Phase 1: read the source once, validate it, and turn its keys into codes."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from memsafe_dagster.datasets.arrays import from_numpy, indices
from memsafe_dagster.datasets.merge.spill import IpcSpool, SpillDir
from memsafe_dagster.datasets.merge.state import INDEX_BYTES_PER_KEY, EngineState, Ingested
from memsafe_dagster.datasets.merge.validate import SourceConformer
from memsafe_dagster.datasets.sink import OutputSink
from memsafe_dagster.datasets.source import TabularSource as MergeSource


class IngestPhase(EngineState):
    """Source chunks -> validated, cast rows (written directly, spooled, or dropped) and key
    codes (kept in memory up to ``index_memory_mb``, spilled to disk beyond)."""

    def _ingest(
        self,
        source: MergeSource,
        conformer: SourceConformer,
        direct_sink: OutputSink | None,
        spill_dir: SpillDir,
    ) -> Ingested:
        state = Ingested()
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

    def _spill_keys(self, state: Ingested, spill_dir: SpillDir) -> IpcSpool:
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
