"""``kill -9`` during an Iceberg merge: the table is at the snapshot before or the one after,
its metadata is complete (nothing it references is missing), and what the killed process
left behind is only unreferenced files, which ``remove_orphan_files`` deletes.

Trials kill a merging child at random instants over the whole merge (reading, rewriting,
writing manifests, the catalog commit), alternating two sources so every trial's before and
after states differ. Instants are drawn over the merge itself, timed from its first progress
step (the child reports each), so import time on a loaded machine does not move them; a third
fall near the end, in the manifests and the catalog commit. One more trial dies at a fixed
point, after the manifests are written and before the catalog commit.
"""

from __future__ import annotations

import datetime as dt
import random
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from iceberg_helpers import (
    catalog_properties,
    check_metadata_complete,
    child_env,
    create_table,
    load_catalog_from,
    local_files,
    scan,
    start_merge,
)
from merge_helpers import row_set

from memsafe_dagster.datasets.iceberg import remove_orphan_files
from memsafe_dagster.datasets.iceberg.orphans import referenced_files
from memsafe_dagster.datasets.iceberg.storage import TableStorage

pytestmark = pytest.mark.slow

SCHEMA = pa.schema([("k", pa.int64()), ("v", pa.string()), ("n", pa.int64())])
TARGET_ROWS, FILES, SOURCE_ROWS = 80_000, 4, 20_000
TRIALS = 12
KW = {
    "merge_min_system_available_mb": 0,
    "merge_chunk_size_rows": 4_000,
    "target_file_rows": 20_000,
    "sleep_per_progress_s": 0.02,
    "print_progress": True,
}


def rows(keys, tag: str) -> pa.Table:
    keys = pa.array(keys, pa.int64())
    return pa.table(
        {"k": keys, "v": pa.array([f"{tag}-{k}" for k in keys.to_pylist()]), "n": keys},
        schema=SCHEMA,
    )


@pytest.fixture
def setup(tmp_path: Path):
    props = catalog_properties(tmp_path / "cat")
    catalog = load_catalog_from(props)
    catalog.create_namespace_if_not_exists("ns")
    per = TARGET_ROWS // FILES
    table = create_table(
        catalog,
        "ns.t",
        SCHEMA,
        [rows(range(i * per, (i + 1) * per), "t") for i in range(FILES)],
    )
    sources = {}
    keys = list(range(0, TARGET_ROWS, TARGET_ROWS // (SOURCE_ROWS // 2)))[: SOURCE_ROWS // 2]
    keys += list(range(TARGET_ROWS, TARGET_ROWS + SOURCE_ROWS // 2))
    for tag in ("a", "b"):
        path = tmp_path / f"source-{tag}.parquet"
        pq.write_table(rows(keys, tag), path)
        sources[tag] = path
    return props, table, sources


def first_step(proc) -> None:
    """Wait for the child's first progress step: its imports are done, the merge has begun."""
    for line in proc.stdout:
        if line.startswith("PROGRESS"):
            return
    raise AssertionError(f"the merge ended before its first step: {proc.stderr.read()[-2000:]}")


def expected_after(before: pa.Table, source: pa.Table) -> list[tuple]:
    kept = before.filter(pa.compute.invert(pa.compute.is_in(before["k"], source["k"])))
    return row_set(pa.concat_tables([kept, source.cast(kept.schema)]))


def test_kill_9_at_random_instants_leaves_before_or_after_and_only_orphans(setup) -> None:
    props, table, sources = setup
    rng = random.Random(17)
    # Two merges to time one, from its first progress step (imports done) to its result line
    # (committed): the kill instants are drawn over that stretch of each trial. (The first
    # merge rewrites every target file; later ones find the source's keys in its new files.)
    for tag in ("a", "b"):
        probe = start_merge(props, "ns.t", sources[tag], "upsert", ["k"], env=child_env(), **KW)
        first_step(probe)
        started = time.perf_counter()
        for line in probe.stdout:
            if line.startswith("{"):
                break
        duration = time.perf_counter() - started
        assert probe.wait(timeout=300) == 0, probe.stderr.read()[-3000:]
    outcomes = {"before": 0, "after": 0, "finished": 0}
    for trial in range(TRIALS):
        tag = "b" if trial % 2 == 0 else "a"
        current = load_catalog_from(props).load_table("ns.t")
        before = scan(current)
        before_id = current.current_snapshot().snapshot_id
        after = expected_after(before, pq.read_table(sources[tag]))
        proc = start_merge(props, "ns.t", sources[tag], "upsert", ["k"], env=child_env(), **KW)
        first_step(proc)
        # Most instants anywhere in the merge, a third near its end (manifests, catalog).
        fraction = rng.uniform(0.85, 1.1) if trial % 3 == 0 else rng.uniform(0.0, 1.0)
        time.sleep(duration * fraction)
        proc.kill()
        proc.communicate(timeout=60)
        reloaded = load_catalog_from(props).load_table("ns.t")
        check_metadata_complete(reloaded)
        got = row_set(scan(reloaded))
        if proc.returncode == 0:
            outcomes["finished"] += 1
            assert got == after
        elif reloaded.current_snapshot().snapshot_id == before_id:
            outcomes["before"] += 1
            assert got == row_set(before)
        else:
            outcomes["after"] += 1
            assert reloaded.current_snapshot().parent_snapshot_id == before_id
            assert got == after, f"trial {trial}: neither before nor after"
    print(f"{TRIALS} kill -9 trials over a {duration:.2f} s merge: {outcomes}")
    assert outcomes["before"] >= 4, outcomes  # the kills did land inside merges

    # What the killed merges left is unreferenced; the sweep removes exactly that.
    table = load_catalog_from(props).load_table("ns.t")
    storage = TableStorage(table)
    root = table.location().removeprefix("file://")
    referenced = {storage.path(u) for u in referenced_files(table)}
    orphans = local_files(root) - referenced
    assert orphans, "killed merges leave files behind (the sweep has something to do)"
    removed = remove_orphan_files(table, older_than=dt.timedelta(0))
    assert set(removed) == orphans
    assert local_files(root) == referenced
    check_metadata_complete(table)
    for snapshot in table.snapshots():
        scan(table, snapshot.snapshot_id)


def test_kill_after_the_manifests_before_the_catalog_commit(setup) -> None:
    props, table, sources = setup
    before_id = table.current_snapshot().snapshot_id
    before = row_set(scan(table))
    root = table.location().removeprefix("file://")
    files_before = local_files(root)
    env = child_env(MEMSAFE_CRASH_AT="iceberg-manifests-written")
    proc = start_merge(props, "ns.t", sources["a"], "upsert", ["k"], env=env, **KW)
    proc.communicate(timeout=300)
    assert proc.returncode == -9
    reloaded = load_catalog_from(props).load_table("ns.t")
    assert reloaded.current_snapshot().snapshot_id == before_id
    assert row_set(scan(reloaded)) == before
    check_metadata_complete(reloaded)
    left = local_files(root) - files_before
    assert any(p.endswith(".avro") for p in left), "manifests were written"
    assert any(p.endswith(".parquet") for p in left), "data files were written"
    assert set(remove_orphan_files(reloaded, older_than=dt.timedelta(0))) == left
    assert local_files(root) == files_before
