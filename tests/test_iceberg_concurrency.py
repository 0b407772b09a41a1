"""Concurrent writers and readers of one Iceberg table: no lost update, whole snapshots only.

- A commit that touched no data file (a property change) lands between the merge's read and
  its commit: pyiceberg retries the commit on the new head and the merge lands.
- One that added data lands there: the merge conflicts, is re-planned against the new
  snapshot (a source that can be read again) and lands with the other writer's rows in its
  result; a one-pass source or ``conflict_retries=0`` raises ``IcebergCommitConflictError``
  with the table as the other writer left it and none of the merge's files.
- Several processes merging into one table at once (overlapping keys): the final table is the
  oracle applied in the order the snapshots were committed, every merge landed exactly once.
- A reader scanning while a writer merges only ever sees one of the states between merges.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from iceberg_helpers import (
    HELPER,
    catalog_properties,
    check_metadata_complete,
    child_env,
    create_table,
    load_catalog_from,
    local_files,
    scan,
)
from merge_helpers import dict_rows_set, oracle, row_set, rows_of

from memsafe_dagster.datasets import merge_iceberg
from memsafe_dagster.datasets.iceberg import IcebergCommitConflictError, iceberg_dataset
from memsafe_dagster.datasets.stream import ChunkStream

SCHEMA = pa.schema([("k", pa.int64()), ("v", pa.string())])
ROOM = {"merge_min_system_available_mb": 0}


def rows(keys, tag: str) -> pa.Table:
    keys = list(keys)
    return pa.table({"k": keys, "v": [f"{tag}{k}" for k in keys]}, schema=SCHEMA)


@pytest.fixture
def props(tmp_path: Path) -> dict[str, str]:
    return catalog_properties(tmp_path / "cat")


@pytest.fixture
def table(props):
    catalog = load_catalog_from(props)
    catalog.create_namespace_if_not_exists("ns")
    return create_table(
        catalog, "ns.t", SCHEMA, [rows(range(0, 50), "t"), rows(range(50, 100), "t")]
    )


def other_writer(props: dict[str, str]):
    """The same table, loaded by another writer."""
    return load_catalog_from(props).load_table("ns.t")


def once(action):
    """A progress callback that runs ``action`` the first time it is called (the merge has
    read the table by then and has not committed yet)."""
    done = threading.Event()

    def progress(_done: int, _total: int) -> None:
        if not done.is_set():
            done.set()
            action()

    return progress


def test_a_concurrent_commit_without_data_is_retried_and_the_merge_lands(props, table) -> None:
    def set_property() -> None:
        with other_writer(props).transaction() as tx:
            tx.set_properties({"owner": "someone-else"})

    result = merge_iceberg(
        rows(range(40, 60), "s"),
        table,
        "upsert",
        "k",
        merge_progress_callback=once(set_property),
        **ROOM,
    )
    assert result.attempts == 1 and result.committed
    table.refresh()
    assert table.properties["owner"] == "someone-else", "the other commit is kept"
    assert table.current_snapshot().snapshot_id == result.snapshot_id
    expected, _ = oracle(
        rows_of(rows(range(100), "t"), ["k", "v"]),
        rows_of(rows(range(40, 60), "s"), ["k", "v"]),
        "upsert",
        ["k"],
    )
    assert row_set(scan(table)) == dict_rows_set(expected, ["k", "v"])


def test_a_concurrent_data_commit_replans_the_merge_against_the_new_snapshot(props, table) -> None:
    concurrent = rows(range(200, 210), "c")

    def append() -> None:
        other_writer(props).append(concurrent.cast(table.schema().as_arrow()))

    source = pa.concat_tables([rows(range(45, 55), "s"), rows(range(205, 215), "s")])
    result = merge_iceberg(
        source, table, "upsert", "k", merge_progress_callback=once(append), **ROOM
    )
    assert result.attempts == 2, "the first plan conflicted and was made again"
    # Keys 205-209 arrived concurrently: the re-planned merge updates them (no duplicates).
    expected, counts = oracle(
        rows_of(pa.concat_tables([rows(range(100), "t"), concurrent]), ["k", "v"]),
        rows_of(source, ["k", "v"]),
        "upsert",
        ["k"],
    )
    assert (result.updated, result.inserted) == (counts["updated"], counts["inserted"]) == (15, 5)
    assert row_set(scan(table.refresh())) == dict_rows_set(expected, ["k", "v"])
    assert [s.summary.operation.value for s in table.snapshots()][-2:] == ["append", "overwrite"]
    check_metadata_complete(table)


@pytest.mark.parametrize("why", ["one-pass source", "no retries"])
def test_a_conflict_that_cannot_be_replanned_is_a_clear_error(props, table, why: str) -> None:
    concurrent = rows(range(200, 210), "c")
    data_dir = Path(table.location().removeprefix("file://")) / "data"

    def append() -> None:
        other_writer(props).append(concurrent.cast(table.schema().as_arrow()))

    source = rows(range(45, 55), "s")
    kwargs = {"conflict_retries": 0} if why == "no retries" else {}
    data = ChunkStream.from_batches(source.to_batches()) if why == "one-pass source" else source
    files_before: set[str] = set()

    def snapshot_files_then_append() -> None:
        append()
        files_before.update(local_files(data_dir))

    with pytest.raises(
        IcebergCommitConflictError, match="conflicts with a concurrent commit"
    ) as info:
        merge_iceberg(
            data,
            table,
            "upsert",
            "k",
            merge_progress_callback=once(snapshot_files_then_append),
            **kwargs,
            **ROOM,
        )
    if why == "one-pass source":
        assert "read once" in str(info.value)
    table.refresh()
    # The table is as the other writer left it; the merge's own files are gone.
    assert row_set(scan(table)) == row_set(pa.concat_tables([rows(range(100), "t"), concurrent]))
    leftover = {p for p in local_files(data_dir) - files_before if "ins-" in p or "part-" in p}
    assert not leftover, leftover
    check_metadata_complete(table)


def test_processes_merging_at_once_lose_no_update(props, table, tmp_path: Path) -> None:
    """Four processes, three overlapping upserts each: replaying the oracle in commit order
    gives exactly the final table."""
    writers, merges_each = 4, 3
    sources: dict[str, pa.Table] = {}
    steps: list[list[list[str]]] = []
    for w in range(writers):
        mine = []
        for m in range(merges_each):
            keys = range(w * 20 + m * 5, w * 20 + m * 5 + 40)  # overlaps the next writer's
            t = rows(keys, f"w{w}m{m}-")
            path = tmp_path / f"src-{w}-{m}.parquet"
            pq.write_table(t, path)
            sources[str(path)] = t
            mine.append([str(path), "upsert"])
        steps.append(mine)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(HELPER),
                "merges",
                json.dumps(props),
                "ns.t",
                "k",
                json.dumps(mine),
                json.dumps({"conflict_retries": 50, **ROOM}),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=child_env(),
        )
        for mine in steps
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    results = [json.loads(line) for out, _ in outs for line in out.splitlines()[1:]]
    assert len(results) == writers * merges_each
    retried = sum(r["attempts"] > 1 for r in results)

    table.refresh()
    by_merge = {r["txn"]: r for r in results}
    committed = [
        (s.snapshot_id, s.summary.additional_properties.get("memsafe.merge-id"))
        for s in table.snapshots()[2:]  # after the two appends that made the table
    ]
    assert sorted(m for _, m in committed) == sorted(by_merge), "each merge landed once"
    # Replay the oracle in commit order: every snapshot is exactly the previous one with
    # that merge applied (a lost update would show up at the snapshot that lost it).
    state = rows_of(rows(range(100), "t"), ["k", "v"])
    for snapshot_id, merge_id in committed:
        source = sources[by_merge[merge_id]["source"]]
        state, _ = oracle(state, rows_of(source, ["k", "v"]), "upsert", ["k"])
        assert row_set(scan(table, snapshot_id)) == dict_rows_set(state, ["k", "v"])
    assert row_set(scan(table)) == dict_rows_set(state, ["k", "v"])
    check_metadata_complete(table)
    print(f"{len(results)} concurrent merges, {retried} re-planned after a conflict")


def test_a_reader_scanning_during_merges_sees_whole_snapshots(props, table, tmp_path: Path) -> None:
    """A writer process merges eight times; the reader (this process) scans all the while,
    through pyiceberg and through memsafe's snapshot dataset."""
    state = rows_of(rows(range(100), "t"), ["k", "v"])
    states = {frozenset(map(tuple, dict_rows_set(state, ["k", "v"])))}
    plan = []
    for m in range(8):
        strategy = ["upsert", "delete", "insert", "update"][m % 4]
        t = rows(range(m * 11, m * 11 + 30), f"m{m}-")
        path = tmp_path / f"step-{m}.parquet"
        pq.write_table(t, path)
        plan.append([str(path), strategy])
        state, _ = oracle(state, rows_of(t, ["k", "v"]), strategy, ["k"])
        states.add(frozenset(map(tuple, dict_rows_set(state, ["k", "v"]))))
    writer = subprocess.Popen(
        [
            sys.executable,
            str(HELPER),
            "merges",
            json.dumps(props),
            "ns.t",
            "k",
            json.dumps(plan),
            json.dumps({"target_file_rows": 16, **ROOM}),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(),
    )
    reader = load_catalog_from(props)
    scans = 0
    seen = set()
    while True:
        finished = writer.poll() is not None
        current = reader.load_table("ns.t")
        for got in (scan(current), iceberg_dataset(current).to_table()):
            key = frozenset(map(tuple, row_set(got)))
            assert key in states, f"scan {scans} saw a state between snapshots"
            seen.add(key)
            scans += 1
        if finished:
            break
    _, err = writer.communicate()
    assert writer.returncode == 0, err[-3000:]
    assert len(seen) >= 2, "the reader saw the table change"
    print(f"{scans} scans during 8 merges saw {len(seen)} of {len(states)} states")
