"""Phase 2: build the key index and mark matched target rows and matched source rows.

The source's key codes are sorted into a ``KeyIndex`` (duplicates resolved by the request's
policy); the target's key columns are then scanned row group by row group, skipping every row
group (and file) whose key statistics cannot hold a source key. A spilled index is built and
matched in passes over key ranges, each pass within the index budget.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pyarrow as pa

from memsafe_dagster.datasets.arrays import fixed_values, indices
from memsafe_dagster.datasets.merge.bits import BitSet
from memsafe_dagster.datasets.merge.budget import INDEX_BYTES_PER_KEY
from memsafe_dagster.datasets.merge.context import Ingested, Matched, MergeRun
from memsafe_dagster.datasets.merge.index import KeyIndex
from memsafe_dagster.datasets.merge.spill import IpcSpool, Reservoir
from memsafe_dagster.datasets.merge.target import TargetFile
from memsafe_dagster.datasets.merge.validate import conform_target_table
from memsafe_dagster.datasets.reader import check_column_chunks, open_parquet


def match(
    run: MergeRun,
    state: Ingested,
    matched: Matched,
    on_index: Callable[[Matched], None] | None = None,
) -> None:
    """Mark the target rows whose key is in the source (in the target files) and the source
    rows whose key is in the target or that are dropped as duplicates (in ``matched``).
    ``on_index`` runs as soon as the (first) index exists: duplicates are known from then on,
    so the source rows to write are too."""
    files = run.dataset.files
    if state.key_spill is None:
        index, dropped = _build_in_memory(run, state)
        matched.dropped.set(dropped)
        if on_index is not None:
            on_index(matched)
        _scan_pass(run, index, files, matched.source)
        del index
        matched.key_passes = 1
    else:
        matched.key_passes = _match_spilled(run, state, matched)
    for f in files:
        f.finish_marking()
        matched.row_groups_pruned += f.num_row_groups - len(f.key_scanned)
        if not f.key_scanned:
            matched.files_pruned += 1


def _build(
    run: MergeRun,
    codes: np.ndarray,
    positions: np.ndarray | None,
    keys: pa.Table | None,
    lo: int | None = None,
    hi: int | None = None,
) -> tuple[KeyIndex, np.ndarray]:
    """The index of these codes and the positions of the source rows dropped as duplicates."""
    kwargs = {} if lo is None else {"lo": lo, "hi": hi}
    return KeyIndex.build(
        codes,
        positions,
        keys,
        exact=run.codec.exact,
        on_duplicate=run.request.on_duplicate,
        key_names=run.keys,
        key_type=run.schema.field(run.keys[0]).type,
        **kwargs,
    )


def _build_in_memory(run: MergeRun, state: Ingested) -> tuple[KeyIndex, np.ndarray]:
    run.guard.check("index")
    codes = np.concatenate(state.codes) if state.codes else np.zeros(0, dtype=np.uint64)
    state.codes.clear()
    keys = None
    if not run.codec.exact:
        keys = (
            pa.concat_tables(state.keys).combine_chunks()
            if state.keys
            else run.schema.empty_table().select(list(run.keys))
        )
        state.keys.clear()
    built = _build(run, codes, None, keys)
    del codes, keys
    run.guard.check("index")
    return built


def _match_spilled(run: MergeRun, state: Ingested, matched: Matched) -> int:
    """Match a spilled index in passes over key ranges; returns the number of passes."""
    assert state.key_spill is not None
    budget = run.budget.index_bytes
    parts = max(2, math.ceil(state.index_bytes * 1.25 / max(budget, 1)))
    cuts = state.reservoir.splitters(parts)
    bounds = [0, *cuts, None]
    ranges: list[tuple[int, int | None]] = [
        (bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)
    ]
    passes = 0
    while ranges:
        lo, hi = ranges.pop(0)
        run.guard.check("index")
        loaded = _load_range(run, state.key_spill, lo, hi, budget)
        if loaded is None:
            mid = _split_range(state.key_spill, lo, hi)
            ranges[:0] = [(lo, mid), (mid, hi)]
            continue
        codes, positions, keys = loaded
        index, dropped = _build(run, codes, positions, keys, lo, hi)
        del codes, positions, keys
        matched.dropped.set(dropped)
        run.guard.add_total(run.dataset.rows if passes else 0)
        _scan_pass(run, index, run.dataset.files, matched.source)
        del index
        passes += 1
    return passes


def _load_range(
    run: MergeRun, spill: IpcSpool, lo: int, hi: int | None, budget: int
) -> tuple[np.ndarray, np.ndarray, pa.Table | None] | None:
    """The spilled keys with ``lo <= code < hi``, or None when they exceed the budget."""
    exact = run.codec.exact
    codes: list[np.ndarray] = []
    positions: list[np.ndarray] = []
    keys: list[pa.Table] = []
    used = 0
    for batch in spill.read():
        run.guard.check("index")
        c = fixed_values(batch.column(0), np.uint64)
        mask = c >= np.uint64(lo)
        if hi is not None:
            mask &= c < np.uint64(hi)
        if not mask.any():
            continue
        codes.append(c[mask])
        positions.append(fixed_values(batch.column(1), np.int64)[mask])
        if not exact:
            sub = pa.Table.from_batches([batch]).drop_columns(["__code", "__pos"])
            sub = sub.take(indices(np.flatnonzero(mask)))
            keys.append(sub)
            used += 2 * sub.nbytes
        used += int(mask.sum()) * INDEX_BYTES_PER_KEY
        if used > budget * 1.5 and (hi is None or hi - lo > 1):
            return None
    if not codes:
        empty_keys = None
        if not exact:
            empty_keys = pa.schema([run.schema.field(k) for k in run.keys]).empty_table()
        return np.zeros(0, np.uint64), np.zeros(0, np.int64), empty_keys
    key_table = pa.concat_tables(keys).combine_chunks() if keys else None
    return np.concatenate(codes), np.concatenate(positions), key_table


def _split_range(spill: IpcSpool, lo: int, hi: int | None) -> int:
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


def _scan_pass(run: MergeRun, index: KeyIndex, files: list[TargetFile], matched: BitSet) -> None:
    """Mark the target rows matching ``index`` in every file (several files at once)."""
    candidates = []
    for f in files:
        if f.num_row_groups and len(index) and index.may_contain_range(f.file_bounds()):
            candidates.append(f)
        else:
            run.guard.advance(f.rows)
    run.run_tasks([(f.rows, lambda f=f: _scan_file(run, index, f)) for f in candidates])
    matched.set(index.positions[index.matched])


def _scan_file(run: MergeRun, index: KeyIndex, f: TargetFile) -> None:
    key_schema = pa.schema([run.schema.field(k) for k in run.keys])
    # A footer read only now (a table format's file) is checked before its rows are read.
    check_column_chunks(f.path, f.metadata, run.budget.work_bytes)
    with run.guard.slot(), run.afs.open_input_file(f.path) as fh:
        pf = open_parquet(fh, metadata=f.metadata)
        for rg in range(f.num_row_groups):
            rows = int(f.rg_starts[rg + 1] - f.rg_starts[rg])
            if run.abort.is_set():
                return
            run.guard.check("scan")
            if not index.may_contain_range(f.bounds[rg]):
                run.guard.advance(rows)
                continue
            f.key_scanned.add(rg)
            table = pf.read_row_group(rg, columns=list(run.keys), use_threads=False)
            table = conform_target_table(table, key_schema, f.path)
            arrays = run.codec.key_arrays(table)
            codes, valid = run.codec.codes(arrays)
            hit_rows, entries = index.lookup(codes, valid, arrays)
            if len(hit_rows):
                f.mark(hit_rows + int(f.rg_starts[rg]))
                index.matched[entries] = True
            run.guard.advance(rows)
