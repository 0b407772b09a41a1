"""Snapshot reads: memsafe's readers see a dataset exactly as before or after a concurrent commit.

A writer process merges again and again, its apply slowed (a sleep after every file move, so
the commit window is wide enough to hit) while this process reads in a loop through
``PyarrowDatasetIO.read``, ``process_in_chunks`` and the IO manager, on local disk and on a
loopback S3. Each read must be one of the states the merges produce (row count, distinct keys
and values), never a mix, never a FileNotFoundError. Positive control: plain
``pyarrow.dataset.dataset(dir)`` in the same loop sees torn states. Then slow consumers across
a commit, ``kill -9`` mid-apply read without recovery, and the history cleanup (trash, log)
with the fence it must not weaken.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from merge_helpers import leftover_state

from memsafe_dagster.datasets import (
    ChunkedParquetWriter,
    CommitConflictError,
    PyarrowDatasetIO,
    commit,
    process_in_chunks,
)
from memsafe_dagster.datasets import snapshot as snapshot_module

CTX = multiprocessing.get_context("fork")
ROOM = {"merge_min_system_available_mb": 0}
BASE = 2_000  # keys of the first version
SPREAD = 7  # merge i updates every SPREAD-th key (so it rewrites every file) and adds 10


@dataclass
class Where:
    """A dataset location: its URL, fsspec filesystem, plain path and a PyarrowDatasetIO."""

    url: str
    fs: Any
    path: str
    io: PyarrowDatasetIO
    options: dict | None = None

    def plain_dataset(self) -> ds.Dataset:
        """What an outside reader does: pyarrow's own listing of the directory."""
        from memsafe_dagster.datasets.filesystem import arrow_filesystem

        return ds.dataset(self.path, filesystem=arrow_filesystem(self.fs), format="parquet")


def _table(keys: list[int], value: int) -> pa.Table:
    return pa.table(
        {"k": pa.array(keys, pa.int64()), "v": pa.array([value] * len(keys), pa.int64())}
    )


def _merge_keys(i: int) -> list[int]:
    return [k for k in range(BASE) if k % SPREAD == i % SPREAD] + list(
        range(BASE + 10 * i, BASE + 10 * i + 10)
    )


def _states(merges: int) -> dict[tuple[int, int, int], int]:
    """Fingerprint (rows, distinct keys, sum of values) of the state after each merge."""
    state = dict.fromkeys(range(BASE), 0)
    out = {}
    for i in range(merges + 1):
        if i:
            state.update(dict.fromkeys(_merge_keys(i), i))
        out[(len(state), len(state), sum(state.values()))] = i
    assert len(out) == merges + 1  # every state is told apart
    return out


def _fingerprint(table: pa.Table) -> tuple[int, int, int]:
    return (
        table.num_rows,
        pc.count_distinct(table.column("k")).as_py(),
        pc.sum(table.column("v")).as_py() or 0,
    )


def _setup(where: Where) -> None:
    where.io.write_dataset(_table(list(range(BASE)), 0), where.url, max_rows_per_file=250)


def _slow_moves(delay: float) -> None:
    """Widen the commit window: sleep after each file move of an apply (in the writer)."""
    move = commit._move

    def slow(fs, source, dest):
        move(fs, source, dest)
        time.sleep(delay)

    commit._move = slow


def _merge_loop(url: str, options: dict | None, merges: int, delay: float) -> None:
    _slow_moves(delay)
    io = PyarrowDatasetIO(storage_options=options)
    for i in range(1, merges + 1):
        io.merge(_table(_merge_keys(i), i), url, "upsert", "k", target_file_rows=250, **ROOM)
    os._exit(0)


def _read_loop(where: Where, merges: int, delay: float, readers: dict) -> dict:
    """Readers in turn while a child merges; returns per reader the states seen and errors."""
    states = _states(merges)
    seen: dict[str, dict] = {
        name: {"states": set(), "torn": 0, "errors": [], "reads": 0} for name in readers
    }
    child = CTX.Process(target=_merge_loop, args=(where.url, where.options, merges, delay))
    child.start()
    try:
        while child.is_alive():
            for name, read in readers.items():
                seen[name]["reads"] += 1
                try:
                    got = states.get(_fingerprint(read()))
                except (OSError, pa.ArrowInvalid) as exc:
                    seen[name]["errors"].append(f"{type(exc).__name__}: {exc}"[:200])
                    continue
                if got is None:
                    seen[name]["torn"] += 1
                else:
                    seen[name]["states"].add(got)
    finally:
        child.join(120)
    assert child.exitcode == 0
    final = states.get(_fingerprint(where.io.read(where.url)))
    assert final == merges
    return seen


def _memsafe_readers(where: Where) -> dict:
    def chunks() -> pa.Table:
        stream = process_in_chunks(
            where.url, chunk_size_rows=300, storage_options=where.options, adaptive=False
        )
        return pa.concat_tables(list(stream))

    return {"io.read": lambda: where.io.read(where.url), "process_in_chunks": chunks}


def _check(seen: dict, merges: int, label: str) -> None:
    plain = seen.pop("plain pyarrow")
    for name, got in seen.items():
        assert got["torn"] == 0 and not got["errors"], (label, name, got)
        assert len(got["states"]) >= 3, (label, name, got)  # the reads did overlap the merges
    torn = plain["torn"] + len(plain["errors"])
    print(
        f"{label}: memsafe readers saw only whole states "
        f"{ {n: (g['reads'], sorted(g['states'])) for n, g in seen.items()} } (reads, states); "
        f"plain pyarrow torn in {torn} of {plain['reads']} reads (mixed {plain['torn']}, "
        f"errors {len(plain['errors'])})"
    )
    assert torn > 0, "positive control: a plain reader sees the commit window"


# -- local disk ---------------------------------------------------------------------------------


@pytest.fixture
def local(tmp_path: Path) -> Where:
    where = Where(str(tmp_path / "ds"), fsspec.filesystem("file"), str(tmp_path / "ds"), None)
    where.io = PyarrowDatasetIO()
    _setup(where)
    return where


def test_reads_during_merges_see_before_or_after_on_local_disk(local: Where) -> None:
    merges = 12
    readers = {
        **_memsafe_readers(local),
        "plain pyarrow": lambda: local.plain_dataset().to_table(),
    }
    _check(_read_loop(local, merges, 0.01, readers), merges, "local")


def test_a_slow_consumer_across_a_commit_gets_the_state_before(local: Where) -> None:
    before = _fingerprint(local.io.read(local.url))
    stream = process_in_chunks(local.url, chunk_size_rows=100, adaptive=False)
    chunks = [next(iter(stream))]
    plain = local.plain_dataset()  # control: pyarrow's listing, taken at the same time
    local.io.merge(_table(_merge_keys(1), 1), local.url, "upsert", "k", **ROOM)
    local.io.write_dataset(_table([1], 9), local.url, mode="overwrite")  # removes every file
    chunks += list(stream)
    assert _fingerprint(pa.concat_tables(chunks)) == before
    with pytest.raises(FileNotFoundError):
        plain.to_table()
    # PyarrowDatasetIO.dataset is lazy too: opened before, read after another overwrite.
    lazy = local.io.dataset(local.url)
    local.io.write_dataset(_table([2, 3], 9), local.url, mode="overwrite")
    assert lazy.to_table().column("k").to_pylist() == [1]
    assert local.io.read(local.url).column("k").to_pylist() == [2, 3]


def test_files_replaced_under_the_same_name_read_as_before(tmp_path: Path) -> None:
    # ChunkedParquetWriter(dir, max_rows_per_file=...) writes part-00000.parquet, ... each
    # time: the names are reused, so a reader must notice that a name now holds another file.
    target = str(tmp_path / "ds")
    for value in (1, 2):
        with ChunkedParquetWriter(target, max_rows_per_file=100) as writer:
            writer.write(_table(list(range(300)), value))
        if value == 1:
            stream = process_in_chunks(target, chunk_size_rows=50, adaptive=False)
            first = next(iter(stream))
            names = sorted(p.name for p in Path(target).glob("*.parquet"))
    rest = list(stream)
    got = pa.concat_tables([first, *rest])
    assert sorted(p.name for p in Path(target).glob("*.parquet")) == names  # same names
    assert set(got.column("v").to_pylist()) == {1} and got.num_rows == 300
    # control: the names alone now hold the new rows
    assert set(pq.read_table(Path(target) / names[0]).column("v").to_pylist()) == {2}


def _crash_merge(url: str, options: dict | None, point: str) -> None:
    os.environ[commit.CRASH_ENV] = point
    PyarrowDatasetIO(storage_options=options).merge(
        _table(_merge_keys(1), 1), url, "upsert", "k", target_file_rows=250, **ROOM
    )
    os._exit(0)


def _kill_mid_apply(where: Where, points: tuple[str, ...]) -> None:
    states = _states(1)
    for point in points:
        url = f"{where.url}-{point}"
        path = f"{where.path}-{point}"
        where.io.write_dataset(_table(list(range(BASE)), 0), url, max_rows_per_file=250)
        child = CTX.Process(target=_crash_merge, args=(url, where.options, point))
        child.start()
        child.join(60)
        assert child.exitcode == -signal.SIGKILL, point
        assert commit.pending_commits(where.fs, path), point  # nobody recovered it
        plain = Where(url, where.fs, path, where.io).plain_dataset()
        assert states.get(_fingerprint(plain.to_table())) is None, point  # control: torn
        assert states.get(_fingerprint(where.io.read(url))) == 1, point
        chunks = pa.concat_tables(list(process_in_chunks(url, storage_options=where.options)))
        assert states.get(_fingerprint(chunks)) == 1, point
        assert commit.pending_commits(where.fs, path), point  # reads changed nothing
        where.io.recover(url)  # replayed with removed files already in the trash
        assert not commit.pending_commits(where.fs, path)
        assert states.get(_fingerprint(where.io.read(url))) == 1, point
        with pytest.raises(FileNotFoundError):
            plain.to_table()  # control: the torn listing's old files are gone from the tree


MID_APPLY = ("commit-moved-one", "commit-moved", "commit-removed-one")


def test_kill_9_mid_apply_then_read_without_recovery_on_local_disk(local: Where) -> None:
    _kill_mid_apply(local, MID_APPLY)


def test_the_io_manager_loads_a_snapshot(tmp_path: Path) -> None:
    import dagster as dg

    from memsafe_dagster.io_managers import ChunkedParquetIOManager

    @dg.asset
    def numbers() -> pa.Table:
        return _table(list(range(BASE)), 0)

    seen: list[tuple[int, int, int]] = []

    @dg.asset
    def downstream(numbers: pa.Table) -> None:
        seen.append(_fingerprint(numbers))

    io_manager = ChunkedParquetIOManager(base_path=str(tmp_path), max_rows_per_file=250)
    assert dg.materialize([numbers], resources={"io_manager": io_manager}).success
    url = str(tmp_path / "numbers")
    where = Where(url, fsspec.filesystem("file"), url, PyarrowDatasetIO())
    # a writer killed mid-apply: the IO manager's load reads it as after, without recovery
    child = CTX.Process(target=_crash_merge, args=(url, None, "commit-moved-one"))
    child.start()
    child.join(60)
    assert child.exitcode == -signal.SIGKILL
    assert states_of(where.plain_dataset().to_table()) is None  # control: torn on disk
    result = dg.materialize(
        [numbers.to_source_asset(), downstream], resources={"io_manager": io_manager}
    )
    assert result.success
    assert _states(1).get(seen[-1]) == 1
    assert commit.pending_commits(where.fs, url)  # loading recovered nothing


def test_a_commit_landing_during_the_listing_is_listed_again(
    local: Where, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Deterministically inside the window: after the snapshot read the version and the
    # records, a writer commits and dies half-way through applying; the data listing then
    # holds old and new files, and only the second read of the version tells.
    real = snapshot_module._committed_records
    calls: list[int] = []
    reader = os.getpid()  # the forked writer inherits the patch: only the reader acts on it

    def records_then_a_commit(fs, target, version):
        records = real(fs, target, version)
        if os.getpid() != reader:
            return records
        if not calls:
            child = CTX.Process(target=_crash_merge, args=(local.url, None, "commit-moved-one"))
            child.start()
            child.join(60)
            assert child.exitcode == -signal.SIGKILL
        calls.append(version)
        return records

    monkeypatch.setattr(snapshot_module, "_committed_records", records_then_a_commit)
    snap = snapshot_module.snapshot(local.fs, local.path)
    read = ds.dataset(list(snap.files), filesystem=snap.arrow_filesystem()).to_table()
    assert states_of(read) == 1
    assert calls == [1, 2] and snap.attempts == 2 and snap.version == 2
    assert states_of(local.plain_dataset().to_table()) is None  # control: the listing is torn


def test_a_writer_plans_only_on_the_version_it_read(local: Where) -> None:
    # A writer whose lock was broken mid-run (a stalled pod past its lease) must not plan on
    # a listing of another writer's version: base_files refuses, the fence alone would not
    # see a plan made from a listing taken after the other commit.
    txn = commit.DatasetTransaction(local.fs, local.path, operation="merge")
    with txn:
        planned = snapshot_module.base_files(txn)  # positive control: the version it read
        assert planned == list(snapshot_module.snapshot(local.fs, local.path).files)
        local.fs.rm_file(txn.lock.path)  # the lock is broken; another writer commits
        local.io.write_dataset(_table([BASE + 1], 9), local.url, mode="append")
        with pytest.raises(CommitConflictError, match="landed while this merge started"):
            snapshot_module.base_files(txn)


def states_of(table: pa.Table) -> int | None:
    return _states(1).get(_fingerprint(table))


# -- history: trash and log cleanup ---------------------------------------------------------------


def test_removed_files_stay_in_the_trash_within_the_retention(local: Where) -> None:
    local.io.merge(_table(_merge_keys(1), 1), local.url, "upsert", "k", **ROOM)
    trash = Path(local.path) / "_memsafe" / "trash"
    kept = [p for p in trash.rglob("*.parquet")]
    assert len(kept) == 8  # every file of the first version (all rewritten)
    assert {p.parent.name for p in kept} == {f"{2:012d}"}
    assert leftover_state(local.path) == []  # history, not leftovers ...
    (Path(local.path) / "_memsafe" / "staging").mkdir()
    (Path(local.path) / "_memsafe" / "staging" / "x").write_bytes(b"x")
    assert leftover_state(local.path) != []  # ... while staging is


def test_history_past_the_retention_is_deleted_under_the_lock(
    local: Where, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(1, 7):
        local.io.merge(_table(_merge_keys(i), i), local.url, "upsert", "k", **ROOM)
    log_dir = Path(local.path) / "_memsafe" / "log"
    trash = Path(local.path) / "_memsafe" / "trash"
    assert len(list(log_dir.iterdir())) == 7 and len(list(trash.iterdir())) == 6
    monkeypatch.setattr(commit, "LOG_KEEP_VERSIONS", 2)
    local.io.recover(local.url)  # young history stays, however many versions
    assert len(list(log_dir.iterdir())) == 7 and len(list(trash.iterdir())) == 6
    monkeypatch.setenv(commit.RETENTION_ENV, "0")
    local.io.merge(_table(_merge_keys(7), 7), local.url, "upsert", "k", **ROOM)
    assert sorted(int(p.stem) for p in log_dir.iterdir()) == [6, 7, 8]  # latest and 2 behind
    assert not trash.exists()
    assert _states(7).get(_fingerprint(local.io.read(local.url))) == 7
    assert commit.latest_version(local.fs, local.path) == 8


def test_the_fence_holds_after_the_log_was_cleaned(
    local: Where, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(commit, "LOG_KEEP_VERSIONS", 1)
    monkeypatch.setenv(commit.RETENTION_ENV, "0")
    fs = local.fs
    with commit.DatasetTransaction(fs, local.path, operation="test") as slow:
        assert slow.base_version == 1
        with fs.open(slow.new_file(), "wb") as fh:
            pq.write_table(_table([10**6], 99), fh)
        fs.rm_file(slow.lock.path)  # its lease is broken behind its back
        for i in range(1, 5):
            local.io.merge(_table(_merge_keys(i), i), local.url, "upsert", "k", **ROOM)
        # version 2, which this writer would create, was committed and then cleaned away:
        assert not fs.exists(commit.log_path(local.path, 2))  # an exclusive create would pass
        with pytest.raises(CommitConflictError, match="another writer committed version 5"):
            slow.commit()
    assert _states(4).get(_fingerprint(local.io.read(local.url))) == 4  # nothing of it


def test_a_dataset_that_keeps_changing_fails_with_a_clear_error(
    local: Where, monkeypatch: pytest.MonkeyPatch
) -> None:
    versions = iter(range(10**6))
    monkeypatch.setattr(commit, "latest_version", lambda fs, target: next(versions))
    with pytest.raises(snapshot_module.SnapshotError, match="no consistent listing"):
        snapshot_module.snapshot(local.fs, local.path, timeout_s=0.2)


def test_foreign_datasets_and_single_files_read_as_before(tmp_path: Path) -> None:
    # Written by another tool (no _memsafe): listed as is, extra files included.
    target = tmp_path / "foreign"
    target.mkdir()
    pq.write_table(_table([1, 2], 0), target / "a.parquet")
    pq.write_table(_table([3], 0), target / "b.parquet")
    io = PyarrowDatasetIO()
    assert sorted(io.read(str(target)).column("k").to_pylist()) == [1, 2, 3]
    snap = snapshot_module.snapshot(fsspec.filesystem("file"), str(target))
    assert snap.version == 0 and len(snap.files) == 2
    assert io.read(str(target / "b.parquet")).column("k").to_pylist() == [3]
    # memsafe's first commit to it (an overwrite) puts the foreign files in the trash ...
    stream = process_in_chunks(str(target), chunk_size_rows=1, adaptive=False)
    first = next(iter(stream))
    io.write_dataset(_table([7], 1), str(target), mode="overwrite")
    # ... and a reader that listed them first still gets them
    assert sorted(pa.concat_tables([first, *stream]).column("k").to_pylist()) == [1, 2, 3]
    assert io.read(str(target)).column("k").to_pylist() == [7]


def test_the_snapshot_filesystem_keeps_local_reads_native(local: Where) -> None:
    snap = snapshot_module.snapshot(local.fs, local.path)
    afs = snap.arrow_filesystem()
    assert snapshot_module.is_local_arrow(afs) and "memsafe-snapshot" in afs.type_name
    with afs.open_input_file(snap.files[0]) as fh:
        assert not isinstance(fh, pa.PythonFile)  # the native file, no Python in the reads
    dataset = local.io.dataset(local.url)
    from memsafe_dagster.datasets.source import fragment_scan_options

    assert fragment_scan_options(dataset) is not None  # local: no pre-buffering, as before
    assert json.loads(json.dumps(sorted(snap.files))) == sorted(snap.files)


# -- loopback S3 --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def endpoint():
    s3_helpers = pytest.importorskip("s3_helpers")
    with s3_helpers.loopback_s3() as url:
        yield url


@pytest.fixture
def s3(endpoint: str) -> Where:
    import s3_helpers
    import s3fs

    # 5 MB blocks (s3fs reads 50 MB by default): a file of a few MB is read in several requests
    options = {**s3_helpers.storage_options(endpoint), "default_block_size": 5 * 2**20}
    bucket = s3_helpers.new_bucket(endpoint)
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **options)
    where = Where(f"s3://{bucket}/ds", fs, f"{bucket}/ds", None, options)
    where.io = PyarrowDatasetIO(storage_options=options)
    _setup(where)
    return where


def test_reads_during_merges_see_before_or_after_on_s3(s3: Where) -> None:
    merges = 6
    readers = {
        **_memsafe_readers(s3),
        "plain pyarrow": lambda: s3.plain_dataset().to_table(),
    }
    _check(_read_loop(s3, merges, 0.05, readers), merges, "s3")


def _big_file(where: Where) -> None:
    """One 7.9 MB file: s3fs reads it in two 5 MB blocks, so a read can be cut between them."""
    keys = pa.array(range(400_000), pa.int64())
    where.io.write_dataset(
        pa.table({"k": keys, "v": keys}),
        where.url,
        mode="overwrite",
        row_group_size=20_000,
        compression=None,
    )


def test_a_slow_consumer_across_a_commit_gets_the_state_before_on_s3(s3: Where) -> None:
    _big_file(s3)
    before = _fingerprint(s3.io.read(s3.url))
    stream = iter(process_in_chunks(s3.url, chunk_size_rows=20_000, storage_options=s3.options))
    chunks = [next(stream)]  # the file is open, its first block read
    plain = s3.plain_dataset()
    s3.io.write_dataset(_table([1], 9), s3.url, mode="overwrite")  # the file to the trash
    chunks += list(stream)
    assert _fingerprint(pa.concat_tables(chunks)) == before
    with pytest.raises(FileNotFoundError):
        plain.to_table()  # control: pyarrow's listing, taken at the same time as the stream's


def test_an_open_file_moved_mid_read_is_reopened_on_s3(s3: Where) -> None:
    _big_file(s3)
    snap = snapshot_module.snapshot(s3.fs, s3.path)
    [path] = snap.files
    with snap.arrow_filesystem().open_input_file(path) as fh:
        head = fh.read(100)  # fetches the first 5 MB block
        s3.io.write_dataset(_table([1], 9), s3.url, mode="overwrite")
        assert not s3.fs.exists(path)  # moved to the trash while open
        rest = fh.read()  # the second block: a 404 at the old key, then the trash
    trashed = commit.trash_path(s3.path, snap.version + 1, path.rsplit("/", 1)[-1])
    assert head + rest == s3.fs.cat_file(trashed)
    # control: a plain s3fs file of a key moved mid-read fails
    s3.fs.copy(trashed, path)
    with s3.fs.open(path, "rb") as fh:
        fh.read(100)
        s3.fs.rm_file(path)
        with pytest.raises(FileNotFoundError):
            fh.read()


def test_kill_9_mid_apply_then_read_without_recovery_on_s3(s3: Where) -> None:
    _kill_mid_apply(s3, ("commit-moved-one", "commit-removed-one"))


def test_history_cleanup_on_s3(s3: Where, monkeypatch: pytest.MonkeyPatch) -> None:
    log_dir, trash = f"{s3.path}/_memsafe/log", f"{s3.path}/_memsafe/trash"
    s3.io.merge(_table(_merge_keys(1), 1), s3.url, "upsert", "k", **ROOM)
    assert len(s3.fs.ls(log_dir)) == 2 and len(s3.fs.find(trash)) == 8  # kept: young
    monkeypatch.setattr(commit, "LOG_KEEP_VERSIONS", 1)
    monkeypatch.setenv(commit.RETENTION_ENV, "0")
    for i in (2, 3):
        s3.io.merge(_table(_merge_keys(i), i), s3.url, "upsert", "k", **ROOM)
    names = sorted(p.rsplit("/", 1)[-1] for p in s3.fs.ls(log_dir))
    assert names == [f"{3:012d}.json", f"{4:012d}.json"]
    assert not s3.fs.find(trash)
    assert _states(3).get(_fingerprint(s3.io.read(s3.url))) == 3
