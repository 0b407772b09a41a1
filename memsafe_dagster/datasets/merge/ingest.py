"""Phase 1: read the source once, validate it, and turn its keys into codes."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from memsafe_dagster.datasets.arrays import from_numpy, indices
from memsafe_dagster.datasets.merge.budget import INDEX_BYTES_PER_KEY
from memsafe_dagster.datasets.merge.context import Ingested, MergeRun
from memsafe_dagster.datasets.merge.spill import IpcSpool, SpillDir
from memsafe_dagster.datasets.merge.validate import SourceConformer
from memsafe_dagster.datasets.sink import OutputSink
from memsafe_dagster.datasets.source import TabularSource


def ingest(
    run: MergeRun,
    source: TabularSource,
    conformer: SourceConformer,
    direct_sink: OutputSink | None,
    spill_dir: SpillDir,
) -> Ingested:
    """Read the source once: validate and cast its rows (written to ``direct_sink``, spooled
    when they must be read twice, else dropped) and collect their key codes (kept in memory
    up to the index budget, spilled to disk beyond)."""
    state = Ingested()
    keep_rows = direct_sink is None and run.rule.writes_source and not source.rereadable
    if keep_rows:
        state.row_spool = IpcSpool(spill_dir.new_path("rows"), conformer.out_schema)
    budget = run.budget.index_bytes
    hashed = not run.codec.exact
    columns = None
    if direct_sink is None and state.row_spool is None:
        # Only the keys are needed now: the rows are read again when they are written
        # (and validated then, still before anything is published).
        columns = list(run.keys)
        conformer = SourceConformer(conformer.source, conformer.target, run.keys, keys_only=True)
    for chunk in source.chunks(lambda: run.guard.chunk_rows, columns=columns):
        run.guard.check("ingest")
        table = conformer.conform(chunk)
        n = table.num_rows
        if n == 0:
            continue
        arrays = run.codec.key_arrays(table)
        codes, _valid = run.codec.codes(arrays)
        state.reservoir.add(codes[:: max(1, n // 4096)])
        if state.key_spill is None:
            state.codes.append(codes)
            if hashed:
                keys = table.select(list(run.keys))
                state.keys.append(keys)
                state.index_bytes += 2 * keys.nbytes
            state.index_bytes += n * INDEX_BYTES_PER_KEY
            if run.request.streaming and state.index_bytes > budget:
                state.key_spill = _spill_keys(run, state, spill_dir)
        else:
            state.key_spill.write(_key_table(run, codes, state.rows, table))
        if direct_sink is not None:
            direct_sink.write(table)
        elif state.row_spool is not None:
            state.row_spool.write(table)
        state.rows += n
        run.guard.advance(n)
    if state.key_spill is not None:
        state.key_spill.finish()
    if state.row_spool is not None:
        state.row_spool.finish()
    return state


def _key_table(run: MergeRun, codes: np.ndarray, start: int, table: pa.Table | None) -> pa.Table:
    """Spilled keys: their codes, source positions and (hashed keys) values."""
    columns = {
        "__code": from_numpy(codes),
        "__pos": indices(np.arange(start, start + len(codes), dtype=np.int64)),
    }
    if not run.codec.exact and table is not None:
        for k in run.keys:
            columns[k] = table.column(k)
    return pa.table(columns)


def _spill_keys(run: MergeRun, state: Ingested, spill_dir: SpillDir) -> IpcSpool:
    """Move the in-memory key codes to a spill file; later chunks append to it."""
    fields = [pa.field("__code", pa.uint64()), pa.field("__pos", pa.int64())]
    if not run.codec.exact:
        fields += [run.schema.field(k) for k in run.keys]
    spill = IpcSpool(spill_dir.new_path("keys"), pa.schema(fields))
    start = 0
    for i, codes in enumerate(state.codes):
        keys = state.keys[i] if state.keys else None
        spill.write(_key_table(run, codes, start, keys))
        start += len(codes)
    state.codes.clear()
    state.keys.clear()
    return spill
