"""Memory: EMERGENCY in every phase stops the merge and leaves the target unchanged; a source
whose key index exceeds its budget is spilled and matched in passes; pressure adapts; progress
is reported throughout."""

from __future__ import annotations

from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pytest
from merge_helpers import (
    dict_rows_set,
    leftover_state,
    oracle,
    read_dataset,
    row_set,
    rows_of,
    snapshot,
    write_files,
)

from memsafe_dagster.datasets.merge import engine, merge_dataset
from memsafe_dagster.memory import (
    MemoryMonitor,
    MemoryPressureError,
    MemoryPressureLevel,
    detect_memory_limits,
)
from memsafe_dagster.memory.process import current_rss_bytes

FS = fsspec.filesystem("file")
NORMAL = MemoryPressureLevel.NORMAL
WARNING = MemoryPressureLevel.WARNING
EMERGENCY = MemoryPressureLevel.EMERGENCY


class FixedMonitor(MemoryMonitor):
    """Real readings, a scripted level: ``level`` (or EMERGENCY while ``emergency`` is set)."""

    def __init__(self, level: MemoryPressureLevel = NORMAL) -> None:
        super().__init__(max_pyarrow_mb=10_000, min_system_available_mb=0)
        self.level = level
        self.emergency = False

    def classify(self, reading) -> MemoryPressureLevel:
        return EMERGENCY if self.emergency else self.level


def _target(tmp_path: Path, rows: int = 3_000, files: int = 3) -> Path:
    target = tmp_path / "t"
    ids = np.arange(rows, dtype=np.int64) * 3
    table = pa.table({"id": ids, "v": pa.array([f"t{i}" for i in range(rows)])})
    per = rows // files
    write_files(target, [table.slice(i * per, per) for i in range(files)])
    return target


def _source(rows: int = 400) -> pa.Table:
    ids = np.arange(rows, dtype=np.int64) * 5  # every third one hits a target key
    return pa.table({"id": ids, "v": pa.array([f"s{i}" for i in range(rows)])})


PHASES = {
    "validation": "upsert",
    "ingest": "upsert",
    "index": "upsert",
    "scan": "upsert",
    "rewrite": "upsert",
    "write": "update",
    "commit": "delete",
}


@pytest.mark.parametrize("phase", sorted(PHASES))
def test_emergency_in_any_phase_raises_and_leaves_the_target_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, phase: str
) -> None:
    target = _target(tmp_path)
    before = snapshot(target)
    monitor = FixedMonitor()
    checked: list[str] = []
    original = engine.MergeGuard.check

    def check(self, name):
        checked.append(name)
        self.monitor.emergency = name == phase
        return original(self, name)

    monkeypatch.setattr(engine.MergeGuard, "check", check)
    source = _source()
    if phase == "write":
        source = pa.RecordBatchReader.from_batches(source.schema, source.to_batches(100))
    with pytest.raises(MemoryPressureError) as err:
        merge_dataset(
            source,
            str(target),
            fs=FS,
            strategy=PHASES[phase],
            key_columns=["id"],
            memory_monitor=monitor,
            merge_chunk_size_rows=100,
            workers=1,  # the scripted flag is per monitor: one thread at a time
        )
    assert f"phase '{phase}'" in str(err.value)
    assert "merge_chunk_size_rows" in str(err.value) or "will not help" in str(err.value)
    assert err.value.level is EMERGENCY and err.value.status["pressure"] == "emergency"
    assert phase in checked
    assert snapshot(target) == before


def test_a_real_budget_too_small_stops_before_anything_is_written(tmp_path: Path) -> None:
    target = _target(tmp_path)
    before = snapshot(target)
    with pytest.raises(MemoryPressureError, match="EMERGENCY") as err:
        merge_dataset(
            _source(),
            str(target),
            fs=FS,
            key_columns=["id"],
            merge_max_process_memory_mb=1,
            merge_min_system_available_mb=0,
        )
    assert snapshot(target) == before
    # The interpreter alone is over 1 MB: the advice says chunks are not the problem.
    assert "before the merge started" in str(err.value)
    assert "smaller chunks will not help: raise the memory budget" in str(err.value)


def test_a_missing_target_stays_missing_after_an_emergency(tmp_path: Path) -> None:
    with pytest.raises(MemoryPressureError):
        merge_dataset(
            _source(),
            str(tmp_path / "new"),
            fs=FS,
            key_columns=["id"],
            memory_monitor=FixedMonitor(EMERGENCY),
        )
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize(
    ("keys", "strategy", "on_duplicate"),
    [
        (["id"], "upsert", "error"),
        (["id"], "insert", "last"),
        (["name"], "update", "first"),
        (["id", "name"], "full_merge", "error"),
        (["name"], "delete", "error"),
    ],
)
def test_a_source_beyond_the_index_budget_is_spilled_and_matched_in_passes(
    tmp_path: Path, keys: list[str], strategy: str, on_duplicate: str
) -> None:
    rng = np.random.default_rng(3)
    target_ids = rng.choice(200_000, 30_000, replace=False).astype(np.int64)
    target_table = pa.table(
        {
            "id": target_ids,
            "name": pa.array([f"n{i}" for i in target_ids]),
            "v": np.zeros(len(target_ids), dtype=np.int64),
        }
    )
    target = tmp_path / "t"
    write_files(target, [target_table.slice(i * 10_000, 10_000) for i in range(3)])
    source_ids = rng.choice(200_000, 20_000, replace=False).astype(np.int64)
    if on_duplicate != "error":
        source_ids = np.concatenate([source_ids, source_ids[:500]])
    source = pa.table(
        {
            "id": source_ids,
            "name": pa.array([f"n{i}" for i in source_ids]),
            "v": np.arange(1, len(source_ids) + 1, dtype=np.int64),
        }
    )
    columns = ["id", "name", "v"]
    expected, counts = oracle(
        rows_of(target_table, columns), rows_of(source, columns), strategy, keys, on_duplicate
    )
    reader = pa.RecordBatchReader.from_batches(source.schema, source.to_batches(1_000))
    result = merge_dataset(
        reader,
        str(target),
        fs=FS,
        strategy=strategy,
        key_columns=keys,
        on_duplicate_keys=on_duplicate,
        index_memory_mb=0.1,
        merge_chunk_size_rows=1_000,
        merge_min_system_available_mb=0,
    )
    assert result.spilled and result.key_passes >= 2
    assert row_set(read_dataset(target)) == dict_rows_set(expected, columns)
    assert (result.inserted, result.updated, result.deleted) == (
        counts["inserted"],
        counts["updated"],
        counts["deleted"],
    )
    assert leftover_state(target) == []


def test_spilled_duplicates_are_refused_with_the_key(tmp_path: Path) -> None:
    target = _target(tmp_path)
    before = snapshot(target)
    ids = np.concatenate([np.arange(20_000), [12_345]]).astype(np.int64)
    with pytest.raises(ValueError, match="12345"):
        merge_dataset(
            pa.table({"id": ids, "v": pa.array(["x"] * len(ids))}),
            str(target),
            fs=FS,
            key_columns=["id"],
            index_memory_mb=0.1,
            merge_min_system_available_mb=0,
        )
    assert snapshot(target) == before


def test_critical_pressure_runs_one_file_at_a_time_and_shrinks_chunks_warning_does_neither(
    tmp_path: Path,
) -> None:
    target = _target(tmp_path, rows=30_000, files=6)
    for level, serial in ((WARNING, False), (MemoryPressureLevel.CRITICAL, True)):
        monitor = FixedMonitor(level)
        sizes: list[int] = []
        original = engine.MergeGuard.check

        def check(self, name, original=original, sizes=sizes, serial=serial):
            result = original(self, name)
            sizes.append(self.chunk_rows)
            assert (self.allowed_workers == 1) is (serial or self.workers == 1)
            return result

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(engine.MergeGuard, "check", check)
            result = merge_dataset(
                _source(4_000),
                str(target),
                fs=FS,
                key_columns=["id"],
                memory_monitor=monitor,
                merge_chunk_size_rows=50_000,
            )
        assert result.max_pressure is level
        assert (min(sizes) < 50_000) is serial
        assert min(sizes) >= 8_192, "chunks do not shrink below the useful floor"
        assert result.target_count_after == result.target_count_before + result.inserted


def test_progress_is_reported_in_every_phase(tmp_path: Path) -> None:
    target = _target(tmp_path, rows=6_000, files=3)
    calls: list[tuple[int, int]] = []
    result = merge_dataset(
        pa.RecordBatchReader.from_batches(_source(900).schema, _source(900).to_batches(100)),
        str(target),
        fs=FS,
        strategy="update",
        key_columns=["id"],
        merge_chunk_size_rows=100,
        merge_progress_callback=lambda done, total: calls.append((done, total)),
        merge_min_system_available_mb=0,
        row_group_size=500,
    )
    assert result.updated > 0
    dones = [d for d, _ in calls]
    assert dones == sorted(dones), "progress went backwards"
    assert all(0 <= d <= t for d, t in calls)
    assert calls[-1][0] == calls[-1][1] > 0
    assert len(calls) > 20


def test_peaks_and_pressure_are_reported(tmp_path: Path) -> None:
    result = merge_dataset(
        _source(),
        str(_target(tmp_path)),
        fs=FS,
        key_columns=["id"],
        merge_min_system_available_mb=0,
    )
    assert result.peak_rss_mb > 10
    assert result.max_pressure is NORMAL
    doc = result.to_dict()
    assert doc["max_pressure"] == "normal" and isinstance(doc["peak_rss_mb"], float)
    assert detect_memory_limits().limit_bytes > 0


def test_explicit_workers_are_a_maximum_under_a_tight_budget(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Four files at once that the budget cannot hold would end in EMERGENCY: fewer run, and
    the log says so; the merge completes."""
    target = _target(tmp_path, rows=8_000, files=8)
    chosen: list[int] = []
    original = engine._affordable_workers

    def spy(*args):
        chosen.append(original(*args))
        return chosen[-1]

    budget_mb = current_rss_bytes() / 2**20 + 200
    with caplog.at_level("WARNING", logger=engine.__name__):
        engine._affordable_workers = spy
        try:
            result = merge_dataset(
                _source(4_000),
                str(target),
                fs=FS,
                key_columns=["id"],
                workers=4,
                merge_max_process_memory_mb=budget_mb,
                merge_min_system_available_mb=0,
            )
        finally:
            engine._affordable_workers = original
    assert chosen and chosen[0] < 4
    assert f"workers=4 would not fit the {budget_mb:.0f} MB process budget" in caplog.text
    assert result.committed and read_dataset(target).num_rows == 8_000 + result.inserted
