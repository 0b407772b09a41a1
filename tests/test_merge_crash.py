"""kill -9 a merging child process anywhere; after recovery the dataset holds exactly the rows
before or exactly the rows after the merge: never a mix, never a duplicate.

Random instants cover the whole merge (the child is slowed a little per chunk so that every
phase takes a measurable share); deterministic kills (``MEMSAFE_CRASH_AT``) hit each step of the
commit protocol, where random kills rarely land.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from merge_helpers import (
    child_env,
    data_files,
    leftover_state,
    merge_argv,
    read_dataset,
    start_merge,
    write_files,
)

from memsafe_dagster.datasets.commit import CRASH_POINTS, pending_commits, recover
from memsafe_dagster.datasets.merge import merge_dataset

FS = fsspec.filesystem("file")
MERGE_KWARGS = {
    "strategy": "upsert",
    "merge_chunk_size_rows": 2_000,
    "row_group_size": 1_000,
    "target_file_rows": 8_000,
    "merge_min_system_available_mb": 0,
}
SLOW = {"sleep_per_progress_s": 0.006}
ENGINE_POINTS = ("merge-ingested", "merge-scanned", "merge-rewrote-file")


def _table(ids: np.ndarray, tag: str) -> pa.Table:
    return pa.table({"id": ids, "v": pa.array([f"{tag}{i}" for i in ids]), "n": ids * 2})


@pytest.fixture(scope="module")
def crash_data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A 40k-row target in 4 files and a 12k-row source (half updates), and both row sets."""
    root = tmp_path_factory.mktemp("crash")
    rng = np.random.default_rng(11)
    ids = rng.choice(10**9, 40_000, replace=False).astype(np.int64)
    target = root / "target"
    write_files(target, [_table(ids[i::4], "t") for i in range(4)])
    source_ids = np.concatenate([ids[::7][:6_000], rng.choice(10**9, 6_000) + 10**9])
    source = root / "source"
    write_files(source, [_table(source_ids, "s")])
    before = _sorted(read_dataset(target))
    after_dir = root / "after"
    shutil.copytree(target, after_dir)
    merge_dataset(str(source), str(after_dir), fs=FS, key_columns=["id"], **MERGE_KWARGS)
    after = _sorted(read_dataset(after_dir))
    assert after.num_rows == 40_000 + 6_000
    return {"target": target, "source": source, "before": before, "after": after, "root": root}


def _sorted(table: pa.Table) -> pa.Table:
    return table.sort_by("id").combine_chunks()


def _state(directory: Path, data: dict) -> str:
    """'before' or 'after' (asserting it is exactly one of them)."""
    table = _sorted(read_dataset(directory))
    ids = table.column("id")
    assert pc.count_distinct(ids).as_py() == table.num_rows, "duplicate rows after recovery"
    if table.equals(data["before"]):
        return "before"
    if table.equals(data["after"]):
        return "after"
    raise AssertionError(
        f"dataset is neither before ({data['before'].num_rows} rows) nor after "
        f"({data['after'].num_rows} rows): {table.num_rows} rows"
    )


def _fresh_copy(data: dict, name: str) -> Path:
    work = data["root"] / name
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(data["target"], work)
    return work


def _clean(directory: Path) -> None:
    assert leftover_state(directory) == []
    assert pending_commits(FS, str(directory)) == []


@pytest.mark.slow
def test_kill_9_at_random_instants_then_recover(crash_data: dict) -> None:
    # How long the slowed merge runs after the child is ready.
    work = _fresh_copy(crash_data, "timing")
    proc = start_merge(crash_data["source"], work, "id", **MERGE_KWARGS, **SLOW)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    duration = json.loads(out.strip().splitlines()[-1])["duration_s"]
    assert _state(work, crash_data) == "after"

    rng = random.Random(20240601)
    outcomes = {"before": 0, "after": 0}
    kills = 20
    for _ in range(kills):
        work = _fresh_copy(crash_data, "kill")
        proc = start_merge(crash_data["source"], work, "id", **MERGE_KWARGS, **SLOW)
        time.sleep(rng.uniform(0, duration * 1.2))
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        recover(FS, str(work))
        outcomes[_state(work, crash_data)] += 1
        _clean(work)
    # Most kills land before the commit point (it comes last); the deterministic test below
    # covers every step after it.
    print(f"kill -9 outcomes after recovery: {outcomes}")
    assert outcomes["before"] >= 3, outcomes
    assert outcomes["before"] + outcomes["after"] == kills


@pytest.mark.slow
@pytest.mark.parametrize("point", ENGINE_POINTS + CRASH_POINTS)
def test_kill_at_each_protocol_step_then_recover(crash_data: dict, point: str) -> None:
    work = _fresh_copy(crash_data, f"step-{point}")
    proc = subprocess.run(
        merge_argv(crash_data["source"], work, "id", **MERGE_KWARGS),
        env=child_env(MEMSAFE_CRASH_AT=point),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr)
    committed = point not in ENGINE_POINTS and point != "commit-staged"
    assert bool(pending_commits(FS, str(work))) == (committed and point != "commit-record-deleted")
    report = recover(FS, str(work))
    assert report.lock_broken  # the dead child's lock was taken over
    assert _state(work, crash_data) == ("after" if committed else "before")
    _clean(work)


@pytest.mark.slow
def test_the_next_merge_recovers_on_its_own(crash_data: dict) -> None:
    work = _fresh_copy(crash_data, "next")
    proc = subprocess.run(
        merge_argv(crash_data["source"], work, "id", **MERGE_KWARGS),
        env=child_env(MEMSAFE_CRASH_AT="commit-moved-one"),
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL
    # A mix of old and new files is on disk until someone recovers ...
    names = {p.name for p in data_files(work)}
    assert any(n.startswith("ins-") for n in names) or any(n.startswith("part-2") for n in names)
    # ... and the next writer does it first: an upsert of the same source is then a no-op.
    result = merge_dataset(
        str(crash_data["source"]), str(work), fs=FS, key_columns=["id"], **MERGE_KWARGS
    )
    assert result.updated == result.source_count > 10_000 and result.inserted == 0
    assert _state(work, crash_data) == "after"
    _clean(work)
