"""Failures inside the merge's worker and writer threads: the first error surfaces, the others
stop, nothing is published, and no thread is left behind."""

from __future__ import annotations

import threading
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from merge_helpers import read_dataset, snapshot, write_files

from memsafe_dagster.datasets.merge import merge_dataset

FS = fsspec.filesystem("file")


def _target(tmp_path: Path, files: int = 6, rows: int = 20_000) -> Path:
    target = tmp_path / "t"
    ids = np.arange(files * rows, dtype=np.int64)
    table = pa.table({"id": ids, "small": pa.array(ids % 100, pa.int16())})
    write_files(target, [table.slice(i * rows, rows) for i in range(files)])
    return target


def _merge_threads() -> set[str]:
    return {t.name for t in threading.enumerate() if t.name.startswith("memsafe-merge")}


@pytest.mark.parametrize("workers", [1, 2])
def test_a_bad_row_deep_in_the_source_fails_the_merge_and_publishes_nothing(
    tmp_path: Path, workers: int
) -> None:
    target = _target(tmp_path)
    before = snapshot(target)
    ids = np.arange(0, 120_000, 3, dtype=np.int64)
    small = (ids % 100).astype(np.int64)
    small[-5] = 40_000  # does not fit the target's int16, in the source's last chunk
    source = pa.table({"id": ids, "small": small})
    with pytest.raises(ValueError, match="column 'small': cannot cast source int64"):
        merge_dataset(
            source,
            str(target),
            fs=FS,
            key_columns=["id"],
            workers=workers,
            merge_chunk_size_rows=5_000,
            merge_min_system_available_mb=0,
        )
    assert snapshot(target) == before
    assert not _merge_threads()


def test_a_failing_writer_thread_fails_the_merge(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = _target(tmp_path)
    before = snapshot(target)
    original = pq.ParquetWriter.write_table
    calls = {"n": 0}

    def flaky(self, table, row_group_size=None):
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError("disk full (simulated)")
        return original(self, table, row_group_size=row_group_size)

    monkeypatch.setattr(pq.ParquetWriter, "write_table", flaky)
    ids = np.arange(0, 120_000, 2, dtype=np.int64)
    with pytest.raises(OSError, match="disk full"):
        merge_dataset(
            pa.table({"id": ids, "small": pa.array(ids % 7, pa.int16())}),
            str(target),
            fs=FS,
            key_columns=["id"],
            row_group_size=4_096,
            background_writes=True,
            merge_min_system_available_mb=0,
        )
    assert calls["n"] >= 4
    assert snapshot(target) == before
    assert not _merge_threads()


def test_background_writes_give_the_same_files_as_foreground(tmp_path: Path) -> None:
    ids = np.arange(0, 120_000, 2, dtype=np.int64)
    source = pa.table({"id": ids, "small": pa.array(ids % 7, pa.int16())})
    outcomes = []
    for background in (False, True):
        target = _target(tmp_path / str(background))
        merge_dataset(
            source,
            str(target),
            fs=FS,
            key_columns=["id"],
            row_group_size=4_096,
            background_writes=background,
            merge_min_system_available_mb=0,
        )
        table = read_dataset(target).sort_by("id")
        sizes = sorted(
            tuple(
                pq.read_metadata(p).row_group(i).num_rows
                for i in range(pq.read_metadata(p).num_row_groups)
            )
            for p in target.glob("*.parquet")
        )
        outcomes.append((table, sizes))
    assert outcomes[0][0].equals(outcomes[1][0])
    assert outcomes[0][1] == outcomes[1][1]
