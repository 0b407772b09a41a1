"""The dataset lock between two processes, stale locks, and the transaction API others use."""

from __future__ import annotations

import json
import os
import socket
import time
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
    start_merge,
    write_files,
)

from memsafe_dagster.datasets.commit import (
    DatasetLockedError,
    DatasetTransaction,
    pending_commits,
    recover,
)
from memsafe_dagster.datasets.merge import merge_dataset

FS = fsspec.filesystem("file")
SLOW_MERGE = {
    "merge_chunk_size_rows": 500,
    "row_group_size": 500,
    "merge_min_system_available_mb": 0,
    "sleep_per_progress_s": 0.02,
}


def _setup(tmp_path: Path) -> tuple[Path, Path, Path, pa.Table, pa.Table, pa.Table]:
    ids = np.arange(0, 10_000, dtype=np.int64)
    target_table = pa.table({"id": ids, "v": pa.array(["t"] * len(ids))})
    target = tmp_path / "target"
    write_files(target, [target_table.slice(0, 5_000), target_table.slice(5_000)])
    a = pa.table({"id": np.arange(0, 20_000, 4, dtype=np.int64), "v": pa.array(["a"] * 5_000)})
    b = pa.table({"id": np.arange(0, 20_000, 6, dtype=np.int64), "v": pa.array(["b"] * 3_334)})
    write_files(tmp_path / "a", [a])
    write_files(tmp_path / "b", [b])
    return target, tmp_path / "a", tmp_path / "b", target_table, a, b


def _wait_for_lock(target: Path, proc, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not (target / "_memsafe" / "lock").exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "the first writer never took the lock"
        time.sleep(0.01)


@pytest.mark.slow
def test_a_second_writer_gets_a_clear_error_and_the_first_finishes(tmp_path: Path) -> None:
    target, a_path, b_path, target_table, a, _b = _setup(tmp_path)
    first = start_merge(a_path, target, "id", **SLOW_MERGE)
    _wait_for_lock(target, first)
    with pytest.raises(DatasetLockedError) as err:
        merge_dataset(
            str(b_path),
            str(target),
            fs=FS,
            key_columns=["id"],
            lock_timeout_s=0.3,
            merge_min_system_available_mb=0,
        )
    message = str(err.value)
    assert f"pid {first.pid}" in message and "locked by another writer" in message
    assert "memsafe recover" in message
    _out, errors = first.communicate(timeout=120)
    assert first.returncode == 0, errors
    expected, _ = oracle(
        rows_of(target_table, ["id", "v"]), rows_of(a, ["id", "v"]), "upsert", ["id"]
    )
    assert row_set(read_dataset(target)) == dict_rows_set(expected, ["id", "v"])


@pytest.mark.slow
def test_a_waiting_writer_runs_after_the_first_never_interleaved(tmp_path: Path) -> None:
    target, a_path, b_path, target_table, a, b = _setup(tmp_path)
    first = start_merge(a_path, target, "id", **SLOW_MERGE)
    _wait_for_lock(target, first)
    second = start_merge(b_path, target, "id", lock_timeout_s=120, merge_min_system_available_mb=0)
    out_first, err_first = first.communicate(timeout=120)
    out_second, err_second = second.communicate(timeout=120)
    assert first.returncode == 0 and second.returncode == 0, (err_first, err_second)
    r1 = json.loads(out_first.strip().splitlines()[-1])
    r2 = json.loads(out_second.strip().splitlines()[-1])
    # The second saw the first's result as its starting point.
    assert r2["target_count_before"] == r1["target_count_after"]
    cols = ["id", "v"]
    after_a, _ = oracle(rows_of(target_table, cols), rows_of(a, cols), "upsert", ["id"])
    after_b, _ = oracle(after_a, rows_of(b, cols), "upsert", ["id"])
    assert row_set(read_dataset(target)) == dict_rows_set(after_b, cols)
    assert leftover_state(target) == []


@pytest.mark.slow
def test_a_lock_left_by_a_killed_writer_is_taken_over(tmp_path: Path) -> None:
    target, a_path, b_path, target_table, _a, b = _setup(tmp_path)
    first = start_merge(a_path, target, "id", **SLOW_MERGE)
    _wait_for_lock(target, first)
    first.kill()
    first.communicate(timeout=30)
    assert (target / "_memsafe" / "lock").exists()
    result = merge_dataset(
        str(b_path),
        str(target),
        fs=FS,
        key_columns=["id"],
        lock_timeout_s=5,
        merge_min_system_available_mb=0,
    )
    assert result.committed
    cols = ["id", "v"]
    expected, _ = oracle(rows_of(target_table, cols), rows_of(b, cols), "upsert", ["id"])
    assert row_set(read_dataset(target)) == dict_rows_set(expected, cols)


def _foreign_lock(target: Path) -> None:
    (target / "_memsafe").mkdir(parents=True, exist_ok=True)
    (target / "_memsafe" / "lock").write_text(
        json.dumps(
            {
                "token": "x",
                "pid": 1,
                "host": "elsewhere-" + socket.gethostname(),
                "acquired_at": time.time() - 60,
            }
        )
    )


def test_a_lock_held_on_another_host_blocks_until_broken(tmp_path: Path) -> None:
    target, _a, b_path, *_ = _setup(tmp_path)
    _foreign_lock(target)
    before = {p: d for p, d in snapshot(target).items() if not p.startswith("_")}
    with pytest.raises(DatasetLockedError, match="elsewhere"):
        merge_dataset(str(b_path), str(target), fs=FS, key_columns=["id"], lock_timeout_s=0.2)
    assert {p: d for p, d in snapshot(target).items() if not p.startswith("_")} == before
    with pytest.raises(DatasetLockedError):
        recover(FS, str(target), lock_timeout_s=0.1)
    report = recover(FS, str(target), break_lock=True)
    assert report.lock_broken
    assert leftover_state(target) == []
    assert merge_dataset(
        str(b_path), str(target), fs=FS, key_columns=["id"], merge_min_system_available_mb=0
    ).committed


def test_transaction_api_used_by_the_writers(tmp_path: Path) -> None:
    """DatasetTransaction(fs, target, operation=..., lock_timeout_s=...): new_file/remove/commit."""
    target = tmp_path / "t"
    write_files(target, [pa.table({"id": [1]}), pa.table({"id": [2]})])
    old = target / "part-00000.parquet"
    with DatasetTransaction(FS, str(target), operation="test", lock_timeout_s=1) as txn:
        staged = txn.new_file()
        assert "/_memsafe/staging/" in staged
        pa.parquet.write_table(pa.table({"id": [3]}), staged)
        txn.remove(str(old))
        assert not Path(txn.added[0]).exists()
        record = txn.commit({"why": "test"})
    assert record.info == {"why": "test"}
    assert not old.exists() and Path(txn.added[0]).exists()
    assert sorted(read_dataset(target).column("id").to_pylist()) == [2, 3]
    assert pending_commits(FS, str(target)) == []
    assert leftover_state(target) == []
    # An uncommitted transaction leaves nothing at all.
    before = snapshot(target)
    with (
        pytest.raises(RuntimeError, match="boom"),
        DatasetTransaction(FS, str(target), operation="test") as txn,
    ):
        pa.parquet.write_table(pa.table({"id": [4]}), txn.new_file())
        raise RuntimeError("boom")
    assert snapshot(target) == before


def test_recover_on_a_clean_or_missing_dataset_changes_nothing(tmp_path: Path) -> None:
    assert not recover(FS, str(tmp_path / "missing")).changed
    assert not (tmp_path / "missing").exists()
    target = tmp_path / "t"
    write_files(target, [pa.table({"id": [1]})])
    before = snapshot(target)
    assert not recover(FS, str(target)).changed
    assert snapshot(target) == before
    assert os.listdir(target) == ["part-00000.parquet"]
